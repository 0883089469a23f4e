"""benchmarks.gradient_snr: the signal share of batch gradients, by hand and on a tiny policy."""

import math

import numpy as np
import pytest
import torch

from benchmarks.gradient_snr import batch_gradients, gradient_snr


def test_gradient_snr_by_hand():
    same = gradient_snr(torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0]]), batch_size=16)
    assert same["rho"] == pytest.approx(1.0) and same["critical_batch"] == pytest.approx(0.0)
    assert same["cos_to_rest_mean"] == pytest.approx(1.0) and same["grad_norm_mean"] == pytest.approx(5.0)
    # Signal (1, 0) plus noise ±(0, 1): g1 = (1, 1), g2 = (1, -1): <g1, g2> = 0, |g|^2 = 2 -> rho = 0.
    half = gradient_snr(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), batch_size=16)
    assert half["rho"] == pytest.approx(0.0) and half["critical_batch"] is None
    # g = (2, 1), (2, -1): cross 3, power 5 -> rho 0.6, critical batch 16 * 0.4 / 0.6.
    sig = gradient_snr(torch.tensor([[2.0, 1.0], [2.0, -1.0]]), batch_size=16)
    assert sig["rho"] == pytest.approx(0.6) and sig["critical_batch"] == pytest.approx(16 * 0.4 / 0.6)
    assert sig["cos_to_rest_mean"] == pytest.approx(3 / 5)  # cos((2, 1), (2, -1)) = 3 / 5
    opposed = gradient_snr(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), batch_size=4)
    assert opposed["rho"] == pytest.approx(-1.0) and opposed["critical_batch"] is None
    with pytest.raises(ValueError, match="n >= 2"):
        gradient_snr(torch.ones(1, 3), batch_size=4)


def _tiny_cfg():
    from common.config import load_config
    from deploy.demo import DEMO_CONFIG

    return load_config(DEMO_CONFIG, [
        "data.resolution=32", "data.num_synthetic=4", "data.num_test=1", "rollout.num_inference_steps=2",
        "rollout.batch_size=4", "rollout.samples_per_input=2", "algorithm.mode=rl_only",
        "reward.backend=pyiqa", "reward.pyiqa_metric=entropy", "logging.progress=false"])


def test_batch_gradients_are_the_rl_gradient_of_the_untouched_policy():
    """A reward that tells the samples apart gives a non-zero gradient; a constant reward gives
    zero advantages, and at the untouched policy the KL's gradient is zero too: an exact zero."""
    cfg = _tiny_cfg()
    brightness = lambda images: np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)) / 255.0
    grads = batch_gradients(cfg, 2, brightness)
    assert grads.dim() == 2 and grads.shape[0] == 2 and torch.isfinite(grads).all()
    assert float(grads.norm(dim=1).min()) > 0
    assert not torch.equal(grads[0], grads[1])  # two batches: other inputs, other noise
    flat = batch_gradients(cfg, 2, lambda images: np.full(len(images), 0.5))
    assert flat.shape == grads.shape and float(flat.abs().max()) == 0.0
    assert math.isfinite(gradient_snr(grads, cfg.rollout.batch_size)["rho"])


def test_term_signal_by_hand():
    from benchmarks.gradient_snr import term_signal

    # RL: signal (1, 0) with noise ±(0, 2), noise larger than signal; SFT: (0, 3) without noise.
    rl = torch.tensor([[1.0, 2.0], [1.0, -2.0]])
    sft = torch.tensor([[0.0, 3.0], [0.0, 3.0]])
    t = term_signal(rl, sft)
    assert t["rl_signal_norm"] is None  # <rl_1, rl_2> = 1 - 4 < 0: no RL signal within its noise
    assert t["sft_signal_norm"] == pytest.approx(3.0) and t["rl_over_sft_signal"] is None
    assert t["rl_noise_norm"] == pytest.approx(math.sqrt(5.0))  # power 5, no signal: all of it noise
    assert t["rl_rho"] == pytest.approx(-3.0 / 5.0) and t["sft_rho"] == pytest.approx(1.0)
    rl = torch.tensor([[2.0, 1.0], [2.0, -1.0]])  # cross 3 -> |mean RL| ≈ √3; power 5 -> noise √2
    sft = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]])  # |mean SFT| 1, pointing against RL's x
    t = term_signal(rl, sft)
    assert t["rl_signal_norm"] == pytest.approx(math.sqrt(3.0)) and t["sft_signal_norm"] == pytest.approx(1.0)
    assert t["rl_noise_norm"] == pytest.approx(math.sqrt(2.0))
    assert t["rl_over_sft_signal"] == pytest.approx(math.sqrt(3.0))
    # <rl_i, sft_j> (i ≠ j) = -2 for both pairs: cos = -2 / (√3 · 1)
    assert t["rl_sft_signal_cos"] == pytest.approx(-2.0 / math.sqrt(3.0))
    with pytest.raises(ValueError, match="n >= 2"):
        term_signal(torch.ones(1, 2), torch.ones(1, 2))


def test_split_terms_add_up_to_the_update_and_a_constant_reward_leaves_only_sft():
    """Each term's gradient alone on the same batch and draws: RL + SFT is the update's gradient
    (the loss is linear in its terms), and a constant reward leaves the SFT term only."""
    from common.config import load_config
    from deploy.demo import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, [
        "data.resolution=32", "data.num_synthetic=4", "data.num_test=1", "rollout.num_inference_steps=2",
        "rollout.batch_size=4", "rollout.samples_per_input=2", "algorithm.mode=adaptive",
        "reward.backend=pyiqa", "reward.pyiqa_metric=entropy", "logging.progress=false"])
    brightness = lambda images: np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)) / 255.0
    parts = batch_gradients(cfg, 2, brightness, split_terms=True)
    assert set(parts) == {"total", "rl", "sft"} and all(g.shape == parts["total"].shape for g in parts.values())
    assert float(parts["rl"].norm(dim=1).min()) > 0 and float(parts["sft"].norm(dim=1).min()) > 0
    scale = float(parts["total"].abs().max())
    torch.testing.assert_close(parts["rl"] + parts["sft"], parts["total"], atol=1e-5 * scale, rtol=0)
    # The same batches without splitting: the "total" part is the plain update's gradient.
    plain = batch_gradients(cfg, 2, brightness)
    torch.testing.assert_close(parts["total"], plain, atol=1e-6 * scale, rtol=0)
    flat = batch_gradients(cfg, 2, lambda images: np.full(len(images), 0.5), split_terms=True)
    assert float(flat["rl"].abs().max()) == 0.0
    torch.testing.assert_close(flat["sft"], flat["total"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not mix"):
        batch_gradients(_tiny_cfg(), 2, brightness, split_terms=True)
