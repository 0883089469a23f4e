"""DDIM-η policy step (DESIGN.md §2.1–§2.2, §2.6): against diffusers' DDIMScheduler, against
independent Gaussian formulas, and against values worked out by hand."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from common.diffusion import (
    DDIMStepOutput,
    alpha_bars,
    ddim_mean,
    ddim_std,
    ddim_step_with_logprob,
    enhanced_prediction,
    gaussian_kl_equal_variance,
    gaussian_log_prob,
    policy_step,
    pred_x0,
    pred_x0_and_epsilon,
    prev_timestep,
    to_epsilon,
)

SHAPE = (2, 4, 8, 8)  # [B, C, h, w]
F64 = torch.float64


def make_scheduler(
    prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1, num_inference_steps=50, **kw
) -> DDIMScheduler:
    """A Stable-Diffusion-like DDIM scheduler (scaled_linear betas, 1000 train steps)."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=kw.pop("clip_sample", False),
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset,
        prediction_type=prediction_type,
        **kw,
    )
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def randn(*shape, seed, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pick_timestep(scheduler, position: str) -> int:
    index = {"first": 0, "middle": len(scheduler.timesteps) // 2, "last": -1}[position]
    return int(scheduler.timesteps[index])


def toy_model(scheduler):
    """A deterministic, per-sample, timestep-dependent stand-in for ε_θ(x, t, c)."""
    table = scheduler.alphas_cumprod.to(F64)

    def model_fn(x, t):
        a = table[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return 0.7 * (1 - a).sqrt() * x + 0.2 * torch.tanh(x) + 1e-3 * t.to(x.dtype).view_as(a)

    return model_fn


def oracle_model(scheduler, x0, bias=0.0):
    """Exact model for a known clean latent x0: returns the true noise of x (as ε or v), + bias."""
    table = scheduler.alphas_cumprod.to(F64)
    prediction_type = scheduler.config.prediction_type

    def model_fn(x, t):
        a = table[t].view(-1, *([1] * (x.dim() - 1)))
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out + bias

    return model_fn


class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


# --------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("num_inference_steps,steps_offset", [(20, 0), (50, 1)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_matches_diffusers_step(
    eta, position, prediction_type, set_alpha_to_one, num_inference_steps, steps_offset
):
    scheduler = make_scheduler(prediction_type, set_alpha_to_one, steps_offset, num_inference_steps)
    t = pick_timestep(scheduler, position)
    sample, model_output, z = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)

    out = ddim_step_with_logprob(scheduler, model_output, t, sample, eta, variance_noise=z)
    ref = scheduler.step(model_output, t, sample, eta=eta, variance_noise=z)

    torch.testing.assert_close(out.prev_sample, ref.prev_sample, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.pred_original_sample, ref.pred_original_sample, atol=1e-5, rtol=0
    )
    t_prev = t - 1000 // num_inference_steps
    expected_std = eta * scheduler._get_variance(t, t_prev).to(F64).sqrt()
    torch.testing.assert_close(out.std, expected_std.expand(2), atol=1e-6, rtol=0)
    assert out.prev_timestep.tolist() == [t_prev] * 2 and out.timestep.tolist() == [t] * 2
    assert out.log_prob.shape == (2,) and torch.isfinite(out.log_prob).all()
    # x_{t'} = μ + σ·z with σ in float64, cast to the sample's dtype
    torch.testing.assert_close(
        out.prev_sample, out.mean + out.std.view(-1, 1, 1, 1) * z, atol=1e-12, rtol=0
    )


def test_same_generator_gives_same_sample_as_diffusers():
    scheduler = make_scheduler()
    t = pick_timestep(scheduler, "middle")
    sample, model_output = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    out = ddim_step_with_logprob(
        scheduler, model_output, t, sample, 1.0, generator=torch.Generator().manual_seed(7)
    )
    ref = scheduler.step(
        model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, atol=1e-5, rtol=0)


def test_clip_sample_honoured_as_diffusers():
    scheduler = make_scheduler(clip_sample=True, clip_sample_range=0.5)
    t = pick_timestep(scheduler, "middle")
    sample, model_output, z = (
        randn(*SHAPE, seed=0),
        3 * randn(*SHAPE, seed=1),
        randn(*SHAPE, seed=2),
    )
    out = ddim_step_with_logprob(scheduler, model_output, t, sample, 0.7, variance_noise=z)
    ref = scheduler.step(model_output, t, sample, eta=0.7, variance_noise=z)
    assert out.pred_original_sample.abs().max() <= 0.5
    torch.testing.assert_close(
        out.pred_original_sample, ref.pred_original_sample, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, atol=1e-5, rtol=0)


def test_thresholding_is_not_implemented():
    scheduler = make_scheduler(thresholding=True)
    with pytest.raises(NotImplementedError, match="thresholding"):
        ddim_step_with_logprob(scheduler, randn(*SHAPE, seed=1), 981, randn(*SHAPE, seed=0), 1.0)


# --------------------------------------------------------------------------- log-prob
def test_log_prob_is_the_gaussian_log_pdf():
    scheduler = make_scheduler(prediction_type="v_prediction")
    t = torch.tensor([pick_timestep(scheduler, "first"), pick_timestep(scheduler, "middle")])
    sample, model_output = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    action = randn(*SHAPE, seed=3)  # any action, not one sampled from this step
    out = ddim_step_with_logprob(scheduler, model_output, t, sample, 0.8, prev_sample=action)

    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1))
    expected = normal.log_prob(action).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-12)
    assert out.prev_sample is action


def test_gaussian_log_prob_hand_value():
    # σ = 2, x − μ = 2 everywhere: log N = −½·1 − log 2 − ½·log 2π
    value, mean = torch.full((1, 3), 3.0, dtype=F64), torch.full((1, 3), 1.0, dtype=F64)
    expected = -0.5 - math.log(2.0) - 0.5 * math.log(2 * math.pi)
    assert gaussian_log_prob(value, mean, 2.0).item() == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("policy_target", ["standard", "enhanced"])
def test_recomputed_log_prob_gives_ratio_exactly_one(policy_target):
    # float32, as in rollout/learner: the recorded action's log-prob is recomputed bit for bit
    scheduler = make_scheduler()
    model_fn = toy_model(scheduler)
    sample = randn(*SHAPE, seed=0, dtype=torch.float32)
    for position in ("first", "middle", "last"):
        t = pick_timestep(scheduler, position)
        old = policy_step(
            scheduler,
            model_fn,
            sample,
            t,
            1.0,
            policy_target=policy_target,
            generator=torch.Generator().manual_seed(5),
        )
        new = policy_step(
            scheduler,
            model_fn,
            sample,
            t,
            1.0,
            policy_target=policy_target,
            prev_sample=old.prev_sample.clone(),
        )
        assert old.log_prob.dtype == torch.float32 and old.prev_sample.dtype == torch.float32
        assert torch.equal(new.log_prob, old.log_prob)
        assert torch.equal(torch.exp(new.log_prob - old.log_prob), torch.ones(2))


# --------------------------------------------------------------------------- deterministic steps
def test_eta_zero_while_evaluating_an_action_is_an_error():
    scheduler = make_scheduler()
    sample, model_output = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    with pytest.raises(ValueError, match=r"eta=0 .*rollout\.eta > 0"):
        ddim_step_with_logprob(scheduler, model_output, 981, sample, 0.0, prev_sample=sample)


def test_eta_zero_sampling_is_plain_ddim():
    scheduler = make_scheduler()
    sample, model_output = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    out = ddim_step_with_logprob(scheduler, model_output, 981, sample, 0.0, generator=generator)
    ref = scheduler.step(model_output, 981, sample, eta=0.0)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, atol=1e-5, rtol=0)
    assert torch.equal(out.prev_sample, out.mean)
    assert out.deterministic.all() and torch.equal(out.log_prob, torch.zeros(2, dtype=F64))
    assert torch.equal(generator.get_state(), state)  # no noise drawn, like diffusers


def test_last_step_with_alpha_one_is_deterministic_with_finite_zero_log_prob():
    scheduler = make_scheduler(set_alpha_to_one=True)
    t = pick_timestep(scheduler, "last")  # t' < 0 → ᾱ_{t'} = 1 → σ = 0
    sample = randn(*SHAPE, seed=0)
    model_output = randn(*SHAPE, seed=1).requires_grad_()
    sampled = ddim_step_with_logprob(
        scheduler, model_output, t, sample, 1.0, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.deterministic.all() and torch.equal(sampled.std, torch.zeros(2, dtype=F64))
    assert torch.equal(sampled.log_prob, torch.zeros(2, dtype=F64))
    # evaluating a recorded action there: still 0, and no NaN gradient leaks into the model
    recorded = ddim_step_with_logprob(
        scheduler, model_output, t, sample, 1.0, prev_sample=sampled.prev_sample.detach() + 0.1
    )
    assert torch.equal(recorded.log_prob, torch.zeros(2, dtype=F64))
    recorded.log_prob.sum().backward()
    assert torch.isfinite(model_output.grad).all()


def test_mixed_batch_flags_only_the_deterministic_sample():
    scheduler = make_scheduler(set_alpha_to_one=True)
    t = torch.tensor([pick_timestep(scheduler, "middle"), pick_timestep(scheduler, "last")])
    out = ddim_step_with_logprob(
        scheduler,
        randn(*SHAPE, seed=1),
        t,
        randn(*SHAPE, seed=0),
        1.0,
        prev_sample=randn(*SHAPE, seed=2),
    )
    assert out.deterministic.tolist() == [False, True]
    assert out.log_prob[1] == 0 and out.log_prob[0] < 0


# --------------------------------------------------------------------------- KL
def test_kl_closed_form_matches_monte_carlo():
    mean_p, mean_q = randn(2, 16, seed=0), randn(2, 16, seed=1)
    std = torch.tensor([0.5, 1.3], dtype=F64)
    kl = gaussian_kl_equal_variance(mean_p, mean_q, std)  # [B]

    n = 20_000
    x = mean_p + std.view(2, 1) * randn(n, 2, 16, seed=2)  # x ~ p, [N, B, D]
    log_ratio = torch.distributions.Normal(mean_p, std.view(2, 1)).log_prob(
        x
    ) - torch.distributions.Normal(mean_q, std.view(2, 1)).log_prob(x)
    kl_mc = log_ratio.mean(dim=(0, 2))  # [B]
    # per element, log p − log q = Δ²/(2σ²) + (Δ/σ)·z: standard error of the mean over N·D draws
    se = ((mean_p - mean_q) / std.view(2, 1)).square().sum(dim=1).sqrt() / (16 * math.sqrt(n))
    assert ((kl - kl_mc).abs() < 5 * se).all(), (kl, kl_mc, se)  # tolerance: 5 standard errors
    # and the hand form: mean of Δ²/(2σ²)
    torch.testing.assert_close(kl, ((mean_p - mean_q) ** 2 / (2 * std.view(2, 1) ** 2)).mean(dim=1))


def test_kl_deterministic_entries_are_zero():
    mean_p, mean_q = randn(3, 4, 4, seed=0), randn(3, 4, 4, seed=1)
    kl = gaussian_kl_equal_variance(mean_p, mean_q, torch.tensor([1.0, 0.0, 1e-9], dtype=F64))
    assert kl[0] > 0 and kl[1] == 0 and kl[2] == 0
    assert torch.equal(gaussian_kl_equal_variance(mean_p, mean_p, 0.3), torch.zeros(3, dtype=F64))


# --------------------------------------------------------------------------- enhanced target
# Hand-worked scheduler: 4 train steps, betas [0.36, 0.25, 0.25, 0.25]
#   → ᾱ = [0.64, 0.48, 0.36, 0.27];
# 2 inference steps, leading spacing, offset 0 → timesteps [2, 0], step ratio 2.
# Step t=2 → t'=0: ᾱ_t = 0.36 (√ = 0.6, √(1−ᾱ_t) = 0.8), ᾱ_{t'} = 0.64 (√ = 0.8, √(1−ᾱ_{t'}) = 0.6).
# η = 1: σ² = (0.36/0.64)·(1 − 0.36/0.64) = 0.5625·0.4375 = 0.24609375; √(1 − 0.64 − σ²) = 0.3375.
def hand_scheduler(prediction_type="epsilon"):
    scheduler = DDIMScheduler(
        num_train_timesteps=4,
        trained_betas=[0.36, 0.25, 0.25, 0.25],
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [2, 0]
    return scheduler


def test_hand_worked_scalar_standard_and_enhanced():
    scheduler = hand_scheduler()
    x_t = torch.tensor([[1.0]], dtype=F64)  # [B=1, 1]

    def model_fn(x, t):  # ε̂ = 0.5 at t=2 (first call), 0.25 at t'=0 (second call)
        return torch.where(t.view(-1, 1) == 2, 0.5, 0.25).to(x.dtype).expand_as(x)

    z = torch.ones_like(x_t)
    std = policy_step(scheduler, model_fn, x_t, 2, 1.0, policy_target="standard", variance_noise=z)
    # x̂0 = (1 − 0.8·0.5)/0.6 = 1;  μ = 0.8·1 + 0.3375·0.5 = 0.96875;  x' = μ + σ·1
    sigma = math.sqrt(0.24609375)
    assert std.pred_original_sample.item() == pytest.approx(1.0, abs=1e-6)
    assert std.std.item() == pytest.approx(sigma, abs=1e-6)
    assert std.mean.item() == pytest.approx(0.96875, abs=1e-6)
    assert std.prev_sample.item() == pytest.approx(0.96875 + sigma, abs=1e-6)
    # log N at one σ from the mean: −½ − log σ − ½ log 2π
    assert std.log_prob.item() == pytest.approx(
        -0.5 - math.log(sigma) - 0.5 * math.log(2 * math.pi), abs=1e-6
    )

    enh = policy_step(scheduler, model_fn, x_t, 2, 1.0, policy_target="enhanced", variance_noise=z)
    # x̃ = 0.8·1 + 0.6·0.5 = 1.1;  x̂0⁺ = (1.1 − 0.6·0.25)/0.8 = 1.1875
    # ε̂⁺ = (1 − 0.6·1.1875)/0.8 = 0.359375;  μ = 0.8·1.1875 + 0.3375·0.359375 = 1.0712890625
    assert enh.refined.tolist() == [True]
    assert enh.pred_original_sample.item() == pytest.approx(1.1875, abs=1e-6)
    assert enh.pred_epsilon.item() == pytest.approx(0.359375, abs=1e-6)
    assert enh.mean.item() == pytest.approx(1.0712890625, abs=1e-6)
    assert enh.std.item() == pytest.approx(sigma, abs=1e-6)

    # last step t=0 → t'=−2: ᾱ_{t'} = 1, σ = 0, no second evaluation (standard fallback):
    # x̂0 = (1 − √(1−0.64)·0.25)/√0.64 = 1.0625 = μ
    counted = CallCounter(model_fn)
    last = policy_step(scheduler, counted, x_t, 0, 1.0, policy_target="enhanced")
    assert (
        counted.calls == 1
        and last.refined.tolist() == [False]
        and last.deterministic.tolist() == [True]
    )
    assert last.mean.item() == pytest.approx(1.0625, abs=1e-6) and last.log_prob.item() == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_enhanced_with_an_exact_model_equals_standard(prediction_type):
    scheduler = make_scheduler(prediction_type)
    x0, noise = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    t = pick_timestep(scheduler, "middle")
    a_t, _ = alpha_bars(scheduler, t)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    model_fn = oracle_model(scheduler, x0)

    std = policy_step(
        scheduler, model_fn, x_t, t, 1.0, policy_target="standard", variance_noise=noise
    )
    enh = policy_step(
        scheduler, model_fn, x_t, t, 1.0, policy_target="enhanced", variance_noise=noise
    )
    torch.testing.assert_close(std.pred_original_sample, x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(enh.pred_original_sample, x0, atol=1e-12, rtol=0)  # x̂0⁺ = x0
    torch.testing.assert_close(enh.pred_epsilon, noise, atol=1e-12, rtol=0)
    torch.testing.assert_close(enh.mean, std.mean, atol=1e-12, rtol=0)
    assert enh.refined.all()


def test_enhanced_with_a_biased_model_makes_exactly_two_calls_and_differs():
    scheduler = make_scheduler()
    x0, noise = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    t = pick_timestep(scheduler, "middle")
    a_t, _ = alpha_bars(scheduler, t)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    biased = CallCounter(oracle_model(scheduler, x0, bias=0.3))

    std = policy_step(
        scheduler, biased, x_t, t, 1.0, policy_target="standard", variance_noise=noise
    )
    assert biased.calls == 1
    enh = policy_step(
        scheduler, biased, x_t, t, 1.0, policy_target="enhanced", variance_noise=noise
    )
    assert biased.calls == 1 + 2
    assert (enh.pred_original_sample - std.pred_original_sample).abs().max() > 1e-2
    assert (enh.mean - std.mean).abs().max() > 1e-3
    # the pieces compose: ddim_step_with_logprob(model_output, model_fn=...) = one extra call
    model_output = biased(x_t, torch.tensor([t, t]))
    calls = biased.calls
    again = ddim_step_with_logprob(
        scheduler,
        model_output,
        t,
        x_t,
        1.0,
        variance_noise=noise,
        policy_target="enhanced",
        model_fn=biased,
    )
    assert biased.calls == calls + 1 and torch.equal(again.mean, enh.mean)


def test_enhanced_pieces_compose_to_the_step_mean():
    scheduler = make_scheduler(prediction_type="v_prediction")
    model_fn = toy_model(scheduler)
    x_t, t = randn(*SHAPE, seed=0), pick_timestep(scheduler, "first")
    x0, eps = pred_x0_and_epsilon(scheduler, model_fn(x_t, torch.tensor([t, t])), x_t, t)
    x0_plus, eps_plus, refined = enhanced_prediction(scheduler, model_fn, x_t, t, x0, eps)
    a_t, a_prev = alpha_bars(scheduler, torch.tensor([t, t]))
    mean = ddim_mean(x0_plus, eps_plus, a_prev, ddim_std(a_t, a_prev, 0.5))
    out = policy_step(scheduler, model_fn, x_t, t, 0.5, policy_target="enhanced", prev_sample=x_t)
    assert refined.all() and torch.equal(out.mean, mean)


def test_enhanced_log_prob_is_differentiable_through_both_calls():
    scheduler = make_scheduler()
    t = pick_timestep(scheduler, "middle")
    x_t, action = randn(1, 2, 3, 3, seed=0), randn(1, 2, 3, 3, seed=1)

    def log_prob(w, policy_target):
        def model_fn(x, tt):
            return w * x + 0.1 * w**2

        return policy_step(
            scheduler, model_fn, x_t, t, 1.0, policy_target=policy_target, prev_sample=action
        ).log_prob

    w = torch.tensor(0.4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: log_prob(w, "enhanced"), (w,))
    grad_enh = torch.autograd.grad(log_prob(w, "enhanced").sum(), w)[0]
    grad_std = torch.autograd.grad(log_prob(w, "standard").sum(), w)[0]
    assert not torch.allclose(grad_enh, grad_std)


# --------------------------------------------------------------------------- per-sample timesteps
@pytest.mark.parametrize("policy_target", ["standard", "enhanced"])
def test_per_sample_timesteps_equal_per_sample_calls(policy_target):
    scheduler = make_scheduler(set_alpha_to_one=True, steps_offset=1)
    model_fn = toy_model(scheduler)
    t = torch.tensor([pick_timestep(scheduler, p) for p in ("first", "middle", "last")])  # [B=3]
    x_t, action = randn(3, 4, 8, 8, seed=0), randn(3, 4, 8, 8, seed=1)

    batched = policy_step(
        scheduler, model_fn, x_t, t, 0.9, policy_target=policy_target, prev_sample=action
    )
    assert batched.deterministic.tolist() == [False, False, True]
    assert batched.refined.tolist() == (
        [True, True, False] if policy_target == "enhanced" else [False] * 3
    )
    for i in range(3):
        single = policy_step(
            scheduler,
            model_fn,
            x_t[i : i + 1],
            int(t[i]),
            0.9,
            policy_target=policy_target,
            prev_sample=action[i : i + 1],
        )
        for name in DDIMStepOutput._fields:
            torch.testing.assert_close(
                getattr(batched, name)[i : i + 1],
                getattr(single, name),
                atol=1e-12,
                rtol=0,
                msg=name,
            )


def test_timestep_as_int_0d_and_batch_tensor_agree():
    scheduler = make_scheduler()
    x_t, model_output, z = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    outs = [
        ddim_step_with_logprob(scheduler, model_output, t, x_t, 1.0, variance_noise=z)
        for t in (481, torch.tensor(481), torch.tensor([481, 481]))
    ]
    for out in outs[1:]:
        for name in DDIMStepOutput._fields:
            assert torch.equal(getattr(out, name), getattr(outs[0], name)), name


# ------------------------------------------------------------------------ helpers, dtypes, errors
def test_helpers():
    scheduler = make_scheduler(prediction_type="v_prediction", set_alpha_to_one=False)
    assert prev_timestep(scheduler, 981) == 961 and prev_timestep(scheduler, 1) == -19
    a_t, a_prev = alpha_bars(scheduler, torch.tensor([981, 1]))
    assert a_t.dtype == F64 and a_prev.dtype == F64
    assert a_t.tolist() == scheduler.alphas_cumprod[[981, 1]].to(F64).tolist()
    assert a_prev.tolist() == [
        float(scheduler.alphas_cumprod[961]),
        float(scheduler.final_alpha_cumprod),
    ]
    a_t0, _ = alpha_bars(scheduler, 981)
    assert a_t0.dim() == 0

    x_t, v = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    a = a_t0.item()
    torch.testing.assert_close(
        to_epsilon(scheduler, v, x_t, 981), a**0.5 * v + (1 - a) ** 0.5 * x_t
    )
    torch.testing.assert_close(pred_x0(scheduler, v, x_t, 981), a**0.5 * x_t - (1 - a) ** 0.5 * v)


def test_float32_and_bfloat16_dtypes():
    scheduler = make_scheduler()
    for dtype, stat in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        x_t, model_output = randn(*SHAPE, seed=0, dtype=dtype), randn(*SHAPE, seed=1, dtype=dtype)
        out = ddim_step_with_logprob(
            scheduler, model_output, 481, x_t, 1.0, generator=torch.Generator().manual_seed(0)
        )
        assert out.prev_sample.dtype == dtype and out.mean.dtype == dtype
        assert out.log_prob.dtype == stat and out.std.dtype == stat
        assert torch.isfinite(out.log_prob).all()


def test_bad_inputs_get_clear_errors():
    scheduler = make_scheduler()
    x, mo = randn(*SHAPE, seed=0), randn(*SHAPE, seed=1)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), mo, 10, x, 1.0)
    with pytest.raises(ValueError, match=r"timestep: .*shape \[2\]"):
        ddim_step_with_logprob(scheduler, mo, torch.tensor([981, 961, 941]), x, 1.0)
    with pytest.raises(ValueError, match=r"timestep: expected values in \[0, 1000\)"):
        ddim_step_with_logprob(scheduler, mo, 1000, x, 1.0)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, mo, 981, x, 1.5)
    with pytest.raises(ValueError, match="policy_target"):
        ddim_step_with_logprob(scheduler, mo, 981, x, 1.0, policy_target="better")
    with pytest.raises(ValueError, match="model_fn"):
        ddim_step_with_logprob(scheduler, mo, 981, x, 1.0, policy_target="enhanced")
    with pytest.raises(ValueError, match="prev_sample"):
        ddim_step_with_logprob(scheduler, mo, 981, x, 1.0, prev_sample=x, variance_noise=mo)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        ddim_step_with_logprob(
            scheduler, mo, 981, x, 1.0, generator=torch.Generator(), variance_noise=mo
        )
    with pytest.raises(ValueError, match="std"):
        gaussian_log_prob(x, mo, torch.ones(3))
