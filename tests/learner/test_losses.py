"""Learner loss pieces (DESIGN.md §2.3, §2.5, §2.6) against values worked out by hand, the SFT
targets against diffusers, and the modes / Table 6 rows against the paper (§6.2)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from common.config import apply_overrides, parse_config
from learner.losses import (
    difficulty_weights,
    kl_loss,
    ppo_clipped_loss,
    reconstruction_reward,
    sample_sft_timesteps,
    select_train_steps,
    sft_diffusion_loss,
    sft_inputs,
    total_loss,
)
from learner.modes import MODES, TABLE6_ROWS, loss_terms, table6_overrides


def full(value, shape=(1, 2, 2, 3), dtype=torch.uint8):
    return torch.full(shape, value, dtype=dtype)


# ------------------------------------------------------------------------------ difficulty
def test_difficulty_weights_hand_worked():
    gt = torch.zeros(3, 2, 2, 3, dtype=torch.uint8)
    # every pixel off by 51/255 = 0.2 → d = 0.2; by 102/255 = 0.4 → d = 0.4; exact → d = 0
    y = torch.cat([full(51), full(102), full(0)])
    w = difficulty_weights(y, gt)
    # w = d / max d = [0.2/0.4, 0.4/0.4, 0/0.4]
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-6)
    # half of the 12 values off by 1.0, half exact: MSE = 0.5 → d = √0.5 ≈ 0.7071
    half = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    half[:, 0] = 255
    w = difficulty_weights(torch.cat([full(51), half]), torch.zeros(2, 2, 2, 3, dtype=torch.uint8))
    assert w.tolist() == pytest.approx([0.2 / math.sqrt(0.5), 1.0], abs=1e-6)
    # a max over the whole (data-parallel) batch: d / 0.8 = [0.25, 0.5, 0]
    w = difficulty_weights(y, gt, max_distance=0.8)
    assert w.tolist() == pytest.approx([0.25, 0.5, 0.0], abs=1e-6)


def test_difficulty_weights_float_input_no_grad_and_all_zero():
    y = torch.tensor([0.2, 0.4]).view(2, 1, 1, 1).expand(2, 2, 2, 3).clone().requires_grad_(True)
    w = difficulty_weights(y, torch.zeros(2, 2, 2, 3))
    assert w.tolist() == pytest.approx([0.5, 1.0], abs=1e-6)
    assert not w.requires_grad
    # every output equals its ground truth: nothing is hard → all weights 0 (no 0/0)
    assert difficulty_weights(full(9, (2, 2, 2, 3)), full(9, (2, 2, 2, 3))).tolist() == [0.0, 0.0]


def test_difficulty_weights_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        difficulty_weights(torch.full((1, 2, 2, 3), -1.0), torch.zeros(1, 2, 2, 3))
    with pytest.raises(ValueError, match="same B, H, W"):
        difficulty_weights(full(0, (2, 2, 2, 3)), full(0, (2, 4, 2, 3)))
    with pytest.raises(ValueError, match="uint8"):
        difficulty_weights(torch.zeros(1, 2, 2, 3, dtype=torch.int32), full(0))


def test_reconstruction_reward_hand_worked():
    gt = full(100)  # [B=1, H, W, 3]
    # reward step 0: exact → −0; step 1: every value off by 51/255 = 0.2 → −0.2
    x0 = torch.stack([full(100)[0], full(151)[0]])[None]  # [B=1, R=2, H, W, 3]
    r = reconstruction_reward(x0, gt)
    assert r.shape == (1, 2) and r.dtype == torch.float32
    assert r.flatten().tolist() == pytest.approx([0.0, -0.2], abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B, R, H, W, 3\]"):
        reconstruction_reward(full(0), gt)


# ------------------------------------------------------------------------------ train steps
def test_select_train_steps_skips_deterministic_and_respects_fraction():
    deterministic = torch.tensor([False, False, False, False, True])  # last step σ = 0
    g = torch.Generator().manual_seed(0)
    # M = 4 stochastic steps, fraction 0.5 → n = 2 per sample, never step 4
    picked = select_train_steps(5, deterministic, 0.5, g, batch_size=64)
    assert picked.shape == (64, 2) and picked.dtype == torch.int64
    assert not (picked == 4).any()
    assert (picked[:, 0] < picked[:, 1]).all()  # sorted, no repeats
    assert set(picked.flatten().tolist()) == {0, 1, 2, 3}  # every stochastic step gets drawn
    assert len({tuple(row) for row in picked.tolist()}) > 1  # independent per sample
    # fraction 1 → every stochastic step; a tiny fraction → still one step
    assert select_train_steps(5, deterministic, 1.0, g).tolist() == [0, 1, 2, 3]
    assert select_train_steps(5, deterministic, 0.01, g).shape == (1,)
    # ⌊0.29·100⌋ = 29 despite 0.29·100 = 28.999999999999996 in floating point
    assert select_train_steps(100, torch.zeros(100, dtype=torch.bool), 0.29, g).shape == (29,)
    # the same seed gives the same steps
    a = select_train_steps(5, deterministic, 0.5, torch.Generator().manual_seed(3), batch_size=4)
    b = select_train_steps(5, deterministic, 0.5, torch.Generator().manual_seed(3), batch_size=4)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="deterministic"):
        select_train_steps(3, torch.ones(3, dtype=torch.bool), 1.0, g)
    with pytest.raises(ValueError, match="timestep_fraction"):
        select_train_steps(3, torch.zeros(3, dtype=torch.bool), 0.0, g)
    with pytest.raises(ValueError, match="bool"):
        select_train_steps(3, torch.zeros(4, dtype=torch.bool), 1.0, g)


# ------------------------------------------------------------------------------ PPO
def ppo_case():
    """2 samples × 2 steps, ε = 0.2, ratios ρ = [[1.5, 0.5], [1.5, 1.1]], A = [[1, −1], [−1, 2]]."""
    ratio = torch.tensor([[1.5, 0.5], [1.5, 1.1]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    new = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    return new, old, adv


def test_ppo_clipped_loss_hand_worked():
    new, old, adv = ppo_case()
    out = ppo_clipped_loss(new, old, adv, clip_range=0.2)
    # max(−A·ρ, −A·clip(ρ, 0.8, 1.2)) per step:
    #   [0,0] A=+1, ρ=1.5: max(−1.5, −1.2) = −1.2   (clipped: no credit beyond 1+ε)
    #   [0,1] A=−1, ρ=0.5: max( 0.5,  0.8) =  0.8   (clipped)
    #   [1,0] A=−1, ρ=1.5: max( 1.5,  1.2) =  1.5   (unclipped: the pessimistic side)
    #   [1,1] A=+2, ρ=1.1: max(−2.2, −2.2) = −2.2   (inside the clip range)
    # per sample: [(−1.2 + 0.8)/2, (1.5 − 2.2)/2] = [−0.2, −0.35]
    assert out.loss.tolist() == pytest.approx([-0.2, -0.35], abs=1e-12)
    # clipfrac: |ρ − 1| > 0.2 for 1.5, 0.5, 1.5 but not 1.1 → 3/4
    assert float(out.clipfrac) == pytest.approx(0.75)
    # approx_kl = mean((ρ − 1) − log ρ); old_approx_kl = mean(−log ρ)
    rhos = [1.5, 0.5, 1.5, 1.1]
    assert float(out.approx_kl) == pytest.approx(sum(r - 1 - math.log(r) for r in rhos) / 4)
    assert float(out.old_approx_kl) == pytest.approx(sum(-math.log(r) for r in rhos) / 4)
    # gradient w.r.t. log π_θ: 0 where the clipped branch wins; else ∂(−A·ρ)/∂logπ = −A·ρ, / T=2
    #   [1,0]: −(−1)·1.5/2 = 0.75;  [1,1]: −2·1.1/2 = −1.1
    out.loss.sum().backward()
    assert new.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.75, -1.1], abs=1e-12)


def test_ppo_clipped_loss_mask_and_ratio_one():
    new, old, adv = ppo_case()
    nan_new = new.detach().clone()
    nan_new[1, 1] = float("nan")  # a masked-out entry must not leak NaN
    nan_new.requires_grad_(True)
    mask = torch.tensor([[True, True], [True, False]])
    out = ppo_clipped_loss(nan_new, old, adv, clip_range=0.2, mask=mask)
    # sample 1 keeps only step 0: 1.5 / 1
    assert out.loss.tolist() == pytest.approx([-0.2, 1.5], abs=1e-12)
    assert float(out.clipfrac) == pytest.approx(1.0)  # 3 of 3 trained steps clipped
    out.loss.sum().backward()
    assert torch.isfinite(nan_new.grad).all() and nan_new.grad[1, 1] == 0
    # ρ = 1 (before the first update): loss = −mean_t A, nothing clipped, KL estimates 0
    out = ppo_clipped_loss(old.clone(), old, adv, clip_range=1e-4)
    assert out.loss.tolist() == pytest.approx([0.0, -0.5])
    assert float(out.clipfrac) == 0.0 and float(out.approx_kl) == 0.0
    with pytest.raises(ValueError, match="same"):
        ppo_clipped_loss(new, old[:, :1], adv, 0.2)


# ------------------------------------------------------------------------------ SFT
def two_step_scheduler(prediction_type):
    # β = [0.36, 0.4375] → ᾱ_0 = 0.64 (√ = 0.8, √(1−ᾱ) = 0.6), ᾱ_1 = 0.64·0.5625 = 0.36 (0.6, 0.8)
    return DDIMScheduler(
        num_train_timesteps=2, trained_betas=[0.36, 0.4375], prediction_type=prediction_type
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sft_inputs_hand_worked(prediction_type):
    x0 = torch.ones(2, 1, 1, 1)
    eps = torch.full((2, 1, 1, 1), 2.0)
    noisy, target = sft_inputs(two_step_scheduler(prediction_type), x0, eps, torch.tensor([0, 1]))
    # x_t = √ᾱ·x0 + √(1−ᾱ)·ε: t=0: 0.8 + 0.6·2 = 2.0;  t=1: 0.6 + 0.8·2 = 2.2
    assert noisy.flatten().tolist() == pytest.approx([2.0, 2.2], abs=1e-6)
    # v = √ᾱ·ε − √(1−ᾱ)·x0: t=0: 0.8·2 − 0.6 = 1.0;  t=1: 0.6·2 − 0.8 = 0.4
    want = {"epsilon": [2.0, 2.0], "v_prediction": [1.0, 0.4], "sample": [1.0, 1.0]}[
        prediction_type
    ]
    assert target.flatten().tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sft_inputs_match_diffusers(prediction_type):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = sample_sft_timesteps(1000, 4, g)
    assert t.dtype == torch.int64 and t.shape == (4,) and 0 <= int(t.min()) and int(t.max()) < 1000
    noisy, target = sft_inputs(scheduler, x0, eps, t)
    torch.testing.assert_close(noisy, scheduler.add_noise(x0, eps, t), atol=1e-6, rtol=1e-5)
    want = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    torch.testing.assert_close(target, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="timesteps"):
        sft_inputs(scheduler, x0, eps, torch.tensor([0, 1, 2, 1000]))


def test_sft_diffusion_loss_hand_worked():
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    # mean over non-batch dims of (out − 0)²: [(1 + 4)/2, (9 + 16)/2] = [2.5, 12.5]
    loss = sft_diffusion_loss(out.view(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    assert loss.tolist() == [2.5, 12.5]
    loss.sum().backward()
    assert out.grad.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # ∂/∂o mean(o²) = 2o/2


# ------------------------------------------------------------------------------ KL
def test_kl_loss_hand_worked():
    mean_theta = torch.ones(3, 1, 2, 2, requires_grad=True)
    mean_ref = torch.zeros(3, 1, 2, 2, requires_grad=True)
    # (1 − 0)²/(2σ²) per element: σ = 0.5 → 1/0.5 = 2; σ = 1 → 0.5; σ = 0 (deterministic) → 0
    kl = kl_loss(mean_theta, mean_ref, torch.tensor([0.5, 1.0, 0.0]))
    assert kl.tolist() == pytest.approx([2.0, 0.5, 0.0])
    kl.sum().backward()
    assert mean_ref.grad is None  # the reference is frozen
    # ∂/∂μ_θ of mean_e (μ_θ−μ_ref)²/(2σ²) = (μ_θ−μ_ref)/(σ²·4 elements): σ=0.5 → 1, σ=1 → 0.25
    assert mean_theta.grad[:, 0, 0, 0].tolist() == pytest.approx([1.0, 0.25, 0.0])


# ------------------------------------------------------------------------------ total & modes
# Per-sample losses shared by the mode tests: w = [0.2, 1.0], L_rl = [2.0, −1.0],
# L_diff = [0.5, 0.3], L_KL = [0.1, 0.5], β_KL = 0.5 → β·mean(L_KL) = 0.5·0.3 = 0.15.
W, RL, SFT, KL, BETA = [0.2, 1.0], [2.0, -1.0], [0.5, 0.3], [0.1, 0.5], 0.5
EXPECTED = {
    # (total, rl part, sft part, kl part)
    # adaptive: ½[(0.8·0.5 + 0.2·2.0) + (0·0.3 + 1·(−1.0))] + 0.15 = ½(−0.2) + 0.15 = 0.05
    "adaptive": (0.05, 0.5 * (0.2 * 2.0 + 1.0 * -1.0), 0.5 * (0.8 * 0.5 + 0.0 * 0.3), 0.15),
    # no_weights (w/o w_i): ½[(0.5 + 2.0) + (0.3 − 1.0)] + 0.15 = 0.9 + 0.15 = 1.05
    "no_weights": (1.05, 0.5, 0.4, 0.15),
    # sft_only (+Diff.SFT): ½(0.2·0.5 + 1.0·0.3) = 0.2, no RL, no KL
    "sft_only": (0.2, 0.0, 0.2, 0.0),
    # rl_only: ½(2.0 − 1.0) + 0.15 = 0.65
    "rl_only": (0.65, 0.5, 0.0, 0.15),
    # sft: ½(0.5 + 0.3) = 0.4
    "sft": (0.4, 0.0, 0.4, 0.0),
}


@pytest.mark.parametrize("mode", MODES)
def test_total_loss_per_mode_hand_worked(mode):
    rl, sft = torch.tensor(RL, requires_grad=True), torch.tensor(SFT, requires_grad=True)
    out = total_loss(
        loss_terms(mode), weights=torch.tensor(W), rl=rl, sft=sft, kl=torch.tensor(KL), kl_coef=BETA
    )
    total, rl_part, sft_part, kl_part = EXPECTED[mode]
    parts = torch.stack([out.loss, out.rl, out.sft, out.kl]).detach()
    assert parts.tolist() == pytest.approx([total, rl_part, sft_part, kl_part], abs=1e-6)
    # the raw parts are logged whatever the mode
    metrics = out.metrics()
    assert metrics["losses/rl_raw"] == pytest.approx(0.5) and metrics[
        "losses/kl_raw"
    ] == pytest.approx(0.3)
    # ∂L/∂L_rl,i = b_i/m and ∂L/∂L_diff,i = a_i/m (m = 2), 0 for a term that is off:
    #   adaptive: b = w → [0.1, 0.5], a = 1 − w → [0.4, 0.0]
    #   no_weights: [0.5, 0.5] both;  sft_only: a = w → [0.1, 0.5];  rl_only: b = 1;  sft: a = 1
    out.loss.backward()
    rl_want, sft_want = {
        "adaptive": ([0.1, 0.5], [0.4, 0.0]),
        "no_weights": ([0.5, 0.5], [0.5, 0.5]),
        "sft_only": ([0.0, 0.0], [0.1, 0.5]),
        "rl_only": ([0.5, 0.5], [0.0, 0.0]),
        "sft": ([0.0, 0.0], [0.5, 0.5]),
    }[mode]

    def grad(x):
        return (x.grad if x.grad is not None else torch.zeros(2)).tolist()

    assert grad(rl) == pytest.approx(rl_want) and grad(sft) == pytest.approx(sft_want)


def test_total_loss_micro_batches_sum_to_the_full_batch():
    terms = loss_terms("adaptive")
    full_batch = total_loss(
        terms,
        weights=torch.tensor(W),
        rl=torch.tensor(RL),
        sft=torch.tensor(SFT),
        kl=torch.tensor(KL),
        kl_coef=BETA,
    )
    parts = [
        total_loss(
            terms,
            weights=torch.tensor(W[i : i + 1]),
            rl=torch.tensor(RL[i : i + 1]),
            sft=torch.tensor(SFT[i : i + 1]),
            kl=torch.tensor(KL[i : i + 1]),
            kl_coef=BETA,
            num_samples=2,
        )
        for i in range(2)
    ]
    assert float(sum(p.loss for p in parts)) == pytest.approx(float(full_batch.loss))


def test_total_loss_requires_the_terms_the_mode_uses():
    w, rl, sft = torch.tensor(W), torch.tensor(RL), torch.tensor(SFT)
    with pytest.raises(ValueError, match="sft"):
        total_loss(loss_terms("adaptive"), weights=w, rl=rl, kl=torch.tensor(KL), kl_coef=BETA)
    with pytest.raises(ValueError, match="weights"):
        total_loss(loss_terms("adaptive"), rl=rl, sft=sft, kl=torch.tensor(KL), kl_coef=BETA)
    with pytest.raises(ValueError, match="kl"):
        total_loss(loss_terms("rl_only"), rl=rl, kl_coef=BETA)
    with pytest.raises(ValueError, match=r"\[2\]"):
        total_loss(loss_terms("sft"), sft=sft, rl=torch.zeros(3))
    # constant-weight modes need no w; β_KL = 0 needs no KL
    assert float(
        total_loss(loss_terms("no_weights"), rl=rl, sft=sft, kl_coef=0.0).loss
    ) == pytest.approx(0.9)


def test_loss_terms_agree_with_the_config_and_the_paper():
    from common.config import AlgorithmConfig

    for mode in MODES:
        terms = loss_terms(mode)
        config = AlgorithmConfig(mode=mode)
        assert terms.uses_rl == config.uses_rl and terms.needs_rollout == config.uses_rollout
    assert loss_terms("sft_only").needs_rollout and not loss_terms("sft_only").needs_reward
    assert not loss_terms("sft").use_kl and not loss_terms("sft_only").use_kl
    with pytest.raises(ValueError, match="algorithm.mode"):
        loss_terms("ppo")


def test_table6_rows_are_original_with_one_change_and_valid_overrides():
    original = TABLE6_ROWS["Original"]
    changed = {
        "with Rec.": ("algorithm.reward", "reconstruction"),
        "w/o w_i": ("algorithm.mode", "no_weights"),
        "with x_{t-1}": ("algorithm.policy_target", "standard"),
        "Reward x0": ("algorithm.reward_steps", "last"),
        "Norm. from track": ("algorithm.advantage_norm", "track"),
        "Base +Diff.SFT": ("algorithm.mode", "sft_only"),
    }
    for row, (key, value) in changed.items():
        diff = {k: v for k, v in TABLE6_ROWS[row].items() if original.get(k) != v}
        assert diff == {key: value}, row
    for row in TABLE6_ROWS:
        config = parse_config(apply_overrides({}, table6_overrides(row)), source=row)
        for item in table6_overrides(row):
            key, _, value = item.partition("=")
            field = config
            for part in key.split("."):  # e.g. reward.iqa_train.refresh_every ("with Iter. RL")
                field = getattr(field, part)
            assert str(field) == value, (row, key)
    assert table6_overrides("Base") == []
    with pytest.raises(ValueError, match="not an algorithm setting"):
        table6_overrides("with Q-align")
