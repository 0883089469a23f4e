"""DDIM-η policy step with log-probabilities (DESIGN.md §2.1, §2.2, §2.6).

Pure functions on tensors, shared by the rollout sampler (sample an action, record its log-prob)
and the learner (recompute the log-prob of a recorded action differentiably, KL to the reference).

Notation follows diffusers' ``DDIMScheduler``: ᾱ = ``scheduler.alphas_cumprod``; t is the current
timestep and t' = t − num_train_timesteps // num_inference_steps the previous one (the formula of
``DDIMScheduler.step`` for every ``timestep_spacing``), with
ᾱ_{t'} = ``scheduler.final_alpha_cumprod`` when t' < 0 (``set_alpha_to_one``).
Shapes: B is the batch, ``...`` the latent dims (C, h, w).

Precision: diffusers keeps ``alphas_cumprod`` in float32. Every scheduler coefficient here (ᾱ, their
square roots, σ_t) is computed in float64 from those float32 values and cast to the sample's dtype
only where it multiplies a tensor. Log-probabilities and KLs are computed in at least float32
(float64 for float64 samples), so a bf16/fp16 latent still gives a usable PPO ratio. Compared with
``DDIMScheduler.step`` (which takes the square roots in float32) results differ by float32 rounding
of the coefficients, ~1e-7 relative.

Timesteps may be a Python int, a 0-d tensor, or an int64 [B] tensor (one timestep per sample: the
learner trains random steps per sample); scheduler coefficients are broadcast over ``...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "DETERMINISTIC_STD",
    "POLICY_TARGETS",
    "DDIMStepOutput",
    "EnhancedPrediction",
    "ModelFn",
    "PolicyTarget",
    "alpha_bars",
    "ddim_mean",
    "ddim_std",
    "ddim_step_with_logprob",
    "enhanced_prediction",
    "gaussian_kl_equal_variance",
    "gaussian_log_prob",
    "policy_step",
    "pred_x0",
    "pred_x0_and_epsilon",
    "prev_timestep",
    "to_epsilon",
]

#: σ_t below this is a deterministic step: sampled, but its log-prob is 0 and the learner excludes
#: it from the RL loss (DESIGN.md §2.1). E.g. the last step when ᾱ_{t'} = 1 gives σ_t = 0.
DETERMINISTIC_STD = 1e-8

PolicyTarget = Literal["standard", "enhanced"]
POLICY_TARGETS: tuple[str, ...] = ("standard", "enhanced")

#: ``model_fn(x, t) -> model output`` (same shape as x, in the scheduler's ``prediction_type``);
#: t is an int64 [B] tensor on x's device. Condition c is closed over by the caller.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class DDIMStepOutput(NamedTuple):
    """One DDIM-η policy step x_t → x_{t'} (DESIGN.md §2.1).

    Attributes:
        prev_sample: [B, ...] sample dtype — x_{t'}: the sampled action, or the recorded action
            that was passed in as ``prev_sample``.
        log_prob: [B] float32 (float64 for float64 samples) — log π(x_{t'} | x_t, c), mean over the
            latent elements; exactly 0 where ``deterministic``.
        mean: [B, ...] sample dtype — μ_t = √ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'}−σ_t²)·ε̂.
        std: [B] float32 (float64 for float64 samples) — σ_t(η).
        pred_original_sample: [B, ...] — the x̂0 that formed μ_t (x̂0⁺ where ``refined``); clipped
            when ``scheduler.config.clip_sample``. The reward decodes this one (§2.3).
        pred_epsilon: [B, ...] — the ε̂ that formed μ_t (ε̂⁺ where ``refined``).
        timestep: int64 [B] — t.
        prev_timestep: int64 [B] — t' (negative on the last step).
        deterministic: bool [B] — σ_t < 1e-8 (always True when η = 0): no log-prob, no RL loss.
        refined: bool [B] — the enhanced target's second model evaluation was used (§2.2).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_original_sample: torch.Tensor
    pred_epsilon: torch.Tensor
    timestep: torch.Tensor
    prev_timestep: torch.Tensor
    deterministic: torch.Tensor
    refined: torch.Tensor


class EnhancedPrediction(NamedTuple):
    """(x̂0⁺, ε̂⁺) of the enhanced action target (DESIGN.md §2.2).

    Attributes:
        pred_original_sample: [B, ...] — x̂0⁺ (the input x̂0 where not ``refined``).
        pred_epsilon: [B, ...] — ε̂⁺ (the input ε̂ where not ``refined``).
        refined: bool [B] — False where t' < 0 (last step: standard fallback).
    """

    pred_original_sample: torch.Tensor
    pred_epsilon: torch.Tensor
    refined: torch.Tensor


# --------------------------------------------------------------------------- scheduler helpers
def _step_ratio(scheduler) -> int:
    if scheduler.num_inference_steps is None:
        raise ValueError(
            "scheduler.num_inference_steps is None: call scheduler.set_timesteps(K) first"
        )
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def prev_timestep(scheduler, timestep: int | torch.Tensor) -> int | torch.Tensor:
    """t' = t − num_train_timesteps // num_inference_steps, as in ``DDIMScheduler.step``.

    An int gives an int, a tensor a tensor; t' < 0 on the last step.
    """
    return timestep - _step_ratio(scheduler)


def _as_timesteps(scheduler, timestep, device: torch.device | None = None) -> torch.Tensor:
    """int / 0-d / [B] timestep → int64 tensor of the same shape on ``device``, range-checked."""
    t = torch.as_tensor(timestep)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"timestep: expected an integer timestep, got dtype {t.dtype}")
    if t.dim() > 1:
        raise ValueError(
            f"timestep: expected an int, a 0-d tensor or a [B] tensor, got shape {list(t.shape)}"
        )
    n = scheduler.config.num_train_timesteps
    if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"timestep: expected values in [0, {n}), got {t.tolist()}")
    return t.to(device=device if device is not None else t.device, dtype=torch.int64)


def _batch_timesteps(scheduler, timestep, sample: torch.Tensor) -> torch.Tensor:
    """int / 0-d / [B] timestep → int64 [B] on the sample's device."""
    t = _as_timesteps(scheduler, timestep, sample.device)
    batch = sample.shape[0]
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape[0] != batch:
        raise ValueError(
            f"timestep: a per-sample tensor needs shape [{batch}] (the batch), got {list(t.shape)}"
        )
    return t


def _alpha_table(scheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas_cumprod [T], final_alpha_cumprod []) in float64 on ``device``."""
    table = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod).to(device=device, dtype=torch.float64)
    return table, final


def alpha_bars(
    scheduler, timestep: int | torch.Tensor, prev_timestep: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t'}) as float64 tensors shaped like ``timestep`` (0-d for an int), on its device.

    ᾱ_{t'} = ``final_alpha_cumprod`` where t' < 0 (diffusers' ``set_alpha_to_one``).
    ``prev_timestep`` defaults to t − num_train_timesteps // num_inference_steps.
    """
    t = _as_timesteps(scheduler, timestep)
    if prev_timestep is None:
        t_prev = t - _step_ratio(scheduler)
    else:
        t_prev = torch.as_tensor(prev_timestep, device=t.device, dtype=torch.int64)
    table, final = _alpha_table(scheduler, t.device)
    alpha_prod_t = table[t]
    alpha_prod_t_prev = torch.where(t_prev >= 0, table[t_prev.clamp_min(0)], final)
    return alpha_prod_t, alpha_prod_t_prev


def ddim_std(
    alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, eta: float
) -> torch.Tensor:
    """σ_t(η) = η·√((1−ᾱ_{t'})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t'}) — DDIM eq. 16; float64 in, float64 out.

    Equals η·√(``DDIMScheduler._get_variance(t, t')``). The clamp only absorbs rounding
    (ᾱ_{t'} ≥ ᾱ_t).
    """
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    return eta * variance.clamp_min(0).sqrt()


def _unsqueeze_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, ..., 1] with ``like``'s number of dims."""
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 [B] coefficient → [B, 1, ..., 1] in ``like``'s dtype; the cast happens here, last."""
    return _unsqueeze_like(coef.to(like.dtype), like)


# --------------------------------------------------------------------------- x̂0 and ε̂
def _split_model_output(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a model output at a timestep with ᾱ_t = ``alpha_prod_t`` (float64 [B]).

    DDIM eq. 12 "predicted x0"; v-prediction and sample-prediction are converted as diffusers does.
    x̂0 is clipped to ±clip_sample_range when ``clip_sample`` (ε̂ is not re-derived, as diffusers
    with ``use_clipped_model_output=False``).
    """
    config = scheduler.config
    if config.thresholding:
        raise NotImplementedError(
            "scheduler.config.thresholding=True: dynamic thresholding of x̂0 is not supported by "
            "common.diffusion (latent diffusion models do not use it); build the scheduler with "
            "thresholding=False"
        )
    model_output = model_output.to(sample.dtype)
    sqrt_a = _per_sample(alpha_prod_t.sqrt(), sample)  # [B, 1, ...]
    sqrt_1ma = _per_sample((1 - alpha_prod_t).sqrt(), sample)  # [B, 1, ...]
    if config.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif config.prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif config.prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(
            f"scheduler.config.prediction_type: expected 'epsilon', 'v_prediction' or 'sample', "
            f"got {config.prediction_type!r}"
        )
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0, eps


def pred_x0_and_epsilon(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, timestep: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂), each [B, ...] in the sample's dtype, from a model output at x_t = ``sample``."""
    t = _batch_timesteps(scheduler, timestep, sample)
    table, _ = _alpha_table(scheduler, sample.device)
    return _split_model_output(scheduler, model_output, sample, table[t])


def pred_x0(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, timestep: int | torch.Tensor
) -> torch.Tensor:
    """x̂0 [B, ...], clipped as the scheduler's config says: what the reward decodes (§2.3)."""
    return pred_x0_and_epsilon(scheduler, model_output, sample, timestep)[0]


def to_epsilon(
    scheduler, model_output: torch.Tensor, sample: torch.Tensor, timestep: int | torch.Tensor
) -> torch.Tensor:
    """ε̂ [B, ...]: the model output converted to ε-prediction (identity for ``epsilon``)."""
    return pred_x0_and_epsilon(scheduler, model_output, sample, timestep)[1]


# --------------------------------------------------------------------------- Gaussian pieces
def ddim_mean(
    pred_original_sample: torch.Tensor,
    pred_epsilon: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """μ_t = √ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'}−σ_t²)·ε̂ — DDIM eq. 12 without the noise term.

    ``alpha_prod_t_prev`` and ``std`` are float64 [B]; x̂0, ε̂ are [B, ...]. 1−ᾱ_{t'}−σ² ≥ 0 for
    η ≤ 1; the clamp only absorbs rounding.
    """
    coef_x0 = _per_sample(alpha_prod_t_prev.sqrt(), pred_original_sample)
    coef_eps = _per_sample((1 - alpha_prod_t_prev - std**2).clamp_min(0).sqrt(), pred_epsilon)
    return coef_x0 * pred_original_sample + coef_eps * pred_epsilon


def _std_per_sample(std: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Scalar or [B] σ → float64 [B]."""
    s = torch.as_tensor(std, device=device, dtype=torch.float64)
    if s.dim() == 0:
        return s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(
            f"std: expected a scalar or one σ per sample, shape [{batch}], got {list(s.shape)}"
        )
    return s


def _stat_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32 for log-probs and KLs (float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def gaussian_log_prob(
    value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float
) -> torch.Tensor:
    """log N(value; mean, σ²) per element, averaged over the non-batch dims → [B].

    ``std``: scalar or [B] (one σ per sample). Entries with σ < 1e-8 are deterministic: their
    log-prob is exactly 0 (never NaN/inf, and no NaN gradient), so the learner can mask them.
    Computed in at least float32.
    """
    batch = value.shape[0]
    dtype = _stat_dtype(value, mean)
    std64 = _std_per_sample(std, batch, value.device)  # [B] float64
    deterministic = std64 < DETERMINISTIC_STD  # [B]
    safe_std = torch.where(deterministic, torch.ones_like(std64), std64)  # [B]
    diff = value.to(dtype) - mean.to(dtype)  # [B, ...]
    mean_sq = (diff / _per_sample(safe_std, diff)).square().reshape(batch, -1).mean(dim=1)  # [B]
    log_prob = -0.5 * mean_sq - safe_std.log().to(dtype) - _HALF_LOG_2PI  # [B]
    return torch.where(deterministic, torch.zeros_like(log_prob), log_prob)


def gaussian_kl_equal_variance(
    mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor | float
) -> torch.Tensor:
    """KL(N(μ_p, σ²) ‖ N(μ_q, σ²)) = (μ_p−μ_q)²/(2σ²) per element, mean over non-batch dims → [B].

    Exact for two Gaussians with the same σ (DESIGN.md §2.6 L_KL). ``std``: scalar or [B];
    deterministic entries (σ < 1e-8) give 0. Computed in at least float32.
    """
    batch = mean_p.shape[0]
    dtype = _stat_dtype(mean_p, mean_q)
    std64 = _std_per_sample(std, batch, mean_p.device)  # [B] float64
    deterministic = std64 < DETERMINISTIC_STD
    safe_std = torch.where(deterministic, torch.ones_like(std64), std64)
    diff = mean_p.to(dtype) - mean_q.to(dtype)  # [B, ...]
    kl = 0.5 * (diff / _per_sample(safe_std, diff)).square().reshape(batch, -1).mean(dim=1)  # [B]
    return torch.where(deterministic, torch.zeros_like(kl), kl)


# --------------------------------------------------------------------------- enhanced target
def enhanced_prediction(
    scheduler,
    model_fn: ModelFn,
    sample: torch.Tensor,
    timestep: int | torch.Tensor,
    pred_original_sample: torch.Tensor,
    pred_epsilon: torch.Tensor,
) -> EnhancedPrediction:
    """Refine (x̂0, ε̂) with one extra model evaluation: the "better direction" target (§2.2).

    This is OUR READING of an under-specified passage of the paper (arXiv 2511.01645 §4.2.2,
    "Policy Modeling with A Better Direction", which only says that an additional denoising step
    applied to x_t gives an enhanced x̂_{t−1} closer to x0 that serves as the action target):

    1. deterministic DDIM proposal (η = 0, eq. 12): x̃ = √ᾱ_{t'}·x̂0 + √(1−ᾱ_{t'})·ε̂
    2. second evaluation at t': x̂0⁺ = x̂0(model_fn(x̃, t'), x̃, ᾱ_{t'})   (v/sample → converted)
    3. ε̂⁺ = (x_t − √ᾱ_t·x̂0⁺)/√(1−ᾱ_t): the noise that maps x̂0⁺ back onto the *current* x_t,
       so that the step stays a DDIM step from x_t, now aimed at the refined clean estimate.
    The caller forms μ_t = √ᾱ_{t'}·x̂0⁺ + √(1−ᾱ_{t'}−σ²)·ε̂⁺ (:func:`ddim_mean`).

    With an exact model (ε̂ is the true noise of a fixed x0) x̂0⁺ = x̂0 = x0 and the target equals
    the standard one. Both model calls stay in the autograd graph: the learner recomputes the
    log-prob of a recorded action through them.

    Last step (t' < 0, ᾱ_{t'} = final_alpha_cumprod): there is no timestep to evaluate the model
    at, so those samples fall back to the standard target (x̂0, ε̂) and ``refined`` is False. If
    every sample is on its last step the model is not called; if only some are (per-sample
    timesteps), the model is called for the whole batch with t' clamped to 0 and the clamped
    entries' outputs are discarded (wasted compute, but the condition batch stays aligned).

    Args:
        model_fn: ``model_fn(x, t)`` → model output in the scheduler's ``prediction_type``; t is an
            int64 [B] tensor on x's device.
        sample: [B, ...] x_t. ``timestep``: int, 0-d or [B].
        pred_original_sample, pred_epsilon: [B, ...] the first (x̂0, ε̂), from ε_θ(x_t, t, c).
    """
    t = _batch_timesteps(scheduler, timestep, sample)  # [B]
    t_prev = t - _step_ratio(scheduler)  # [B]
    refined = t_prev >= 0  # [B] bool
    if not bool(refined.any()):  # host sync on GPU timesteps: one per step, negligible
        return EnhancedPrediction(pred_original_sample, pred_epsilon, refined)

    table, _ = _alpha_table(scheduler, sample.device)
    t_model = t_prev.clamp_min(0)  # [B] — a valid timestep for the second evaluation
    alpha_prod_t = table[t]  # [B] float64
    alpha_prod_model = table[t_model]  # [B] float64 (= ᾱ_{t'} where refined)

    # 1. deterministic proposal x̃ — DDIM eq. 12 with σ = 0                       [B, ...]
    x_tilde = (
        _per_sample(alpha_prod_model.sqrt(), sample) * pred_original_sample
        + _per_sample((1 - alpha_prod_model).sqrt(), sample) * pred_epsilon
    )
    # 2. second evaluation ε_θ(x̃, t', c) → x̂0⁺                                    [B, ...]
    x0_plus, _ = _split_model_output(
        scheduler, model_fn(x_tilde, t_model), x_tilde, alpha_prod_model
    )
    # 3. ε̂⁺ consistent with x_t and x̂0⁺                                          [B, ...]
    eps_plus = (sample - _per_sample(alpha_prod_t.sqrt(), sample) * x0_plus) / _per_sample(
        (1 - alpha_prod_t).sqrt(), sample
    )
    # 4. last-step fallback: the standard target where t' < 0
    keep = _unsqueeze_like(refined, sample)  # [B, 1, ...] bool
    return EnhancedPrediction(
        torch.where(keep, x0_plus, pred_original_sample),
        torch.where(keep, eps_plus, pred_epsilon),
        refined,
    )


# --------------------------------------------------------------------------- the policy step
def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    variance_noise: torch.Tensor | None = None,
    *,
    policy_target: PolicyTarget = "standard",
    model_fn: ModelFn | None = None,
) -> DDIMStepOutput:
    """One DDIM-η step x_t → x_{t'} with its Gaussian log-prob (DESIGN.md §2.1).

    Sampling (``prev_sample=None``): x_{t'} = μ_t + σ_t·z with z = ``variance_noise`` or drawn
    from ``generator`` (drawn only when η > 0, exactly like ``DDIMScheduler.step``, so the same
    generator gives the same x_{t'}). Evaluating (``prev_sample`` given): ``prev_sample`` is the
    recorded action; nothing is sampled. Either way the log-prob is computed from the action
    tensor, so recomputing a recorded action with the same model output gives the identical value
    (PPO ratio exactly 1 before the first update).

    η = 0 is plain DDIM: allowed for sampling (every sample ``deterministic``, ``log_prob`` = 0),
    a ``ValueError`` when evaluating an action (a trained step needs η > 0). Any step with
    σ_t < 1e-8 (e.g. the last one when ᾱ_{t'} = 1) is flagged ``deterministic`` with log-prob 0.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps``.
        model_output: [B, ...] ε_θ(x_t, t, c) in the scheduler's ``prediction_type``.
        timestep: t — int, 0-d tensor, or int64 [B] (per-sample timesteps).
        sample: [B, ...] x_t; its dtype is the dtype of the returned latents.
        eta: η ∈ [0, 1].
        prev_sample: [B, ...] a recorded action x_{t'} whose log-prob to evaluate.
        generator, variance_noise: the noise source when sampling (at most one of them).
        policy_target: ``"standard"`` (the DDIM step) or ``"enhanced"`` (§2.2, one extra call of
            ``model_fn``; see :func:`enhanced_prediction`).
        model_fn: required for ``"enhanced"``.
    """
    # 0. arguments
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected η in [0, 1], got {eta}")
    if prev_sample is not None and eta == 0:
        raise ValueError(
            "eta=0 with prev_sample: a DDIM step with η = 0 is deterministic and has no log-prob; "
            "a trained step needs η > 0 (DESIGN.md §2.1: set rollout.eta > 0)"
        )
    if policy_target not in POLICY_TARGETS:
        raise ValueError(f"policy_target: expected one of {POLICY_TARGETS}, got {policy_target!r}")
    if policy_target == "enhanced" and model_fn is None:
        raise ValueError(
            "policy_target='enhanced' needs model_fn for the second model evaluation (§2.2)"
        )
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output: expected shape {list(sample.shape)} (the sample's), "
            f"got {list(model_output.shape)}"
        )
    if prev_sample is not None:
        if variance_noise is not None or generator is not None:
            raise ValueError(
                "prev_sample is the action to evaluate: pass no variance_noise or generator with it"
            )
        if prev_sample.shape != sample.shape:
            raise ValueError(
                f"prev_sample: expected shape {list(sample.shape)}, got {list(prev_sample.shape)}"
            )
    if variance_noise is not None and generator is not None:
        raise ValueError("pass either generator or variance_noise, not both")
    if variance_noise is not None and variance_noise.shape != sample.shape:
        raise ValueError(
            f"variance_noise: expected shape {list(sample.shape)}, got {list(variance_noise.shape)}"
        )

    # 1. previous timestep t' = t − T/K (diffusers' DDIMScheduler.step)                    [B]
    t = _batch_timesteps(scheduler, timestep, sample)
    t_prev = t - _step_ratio(scheduler)

    # 2. ᾱ_t, ᾱ_{t'} in float64; ᾱ_{t'} = final_alpha_cumprod where t' < 0                  [B]
    alpha_prod_t, alpha_prod_t_prev = alpha_bars(scheduler, t, t_prev)

    # 3. "predicted x0" of DDIM eq. 12 (v-prediction converted; clip_sample honoured)  [B, ...]
    x0, eps = _split_model_output(scheduler, model_output, sample, alpha_prod_t)
    refined = torch.zeros_like(t, dtype=torch.bool)

    # 3b. §2.2 enhanced action target: refine (x̂0, ε̂) with a second evaluation at t'
    if policy_target == "enhanced":
        x0, eps, refined = enhanced_prediction(scheduler, model_fn, sample, t, x0, eps)

    # 4. σ_t(η) — DDIM eq. 16                                                          [B] f64
    std = ddim_std(alpha_prod_t, alpha_prod_t_prev, eta)
    deterministic = std < DETERMINISTIC_STD

    # 5. μ_t = √ᾱ_{t'}·x̂0 + "direction pointing to x_t" — DDIM eq. 12 without noise   [B, ...]
    mean = ddim_mean(x0, eps, alpha_prod_t_prev, std)

    # 6. x_{t'} = μ_t + σ_t·z — or the recorded action                                [B, ...]
    if prev_sample is None:
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
                )
            prev_sample = mean + _per_sample(std, sample) * variance_noise.to(sample.dtype)
        else:
            prev_sample = mean

    # 7. log π(x_{t'} | x_t, c): mean over latent elements; 0 where deterministic          [B]
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    stat_dtype = log_prob.dtype

    return DDIMStepOutput(
        prev_sample=prev_sample,
        log_prob=log_prob,
        mean=mean,
        std=std.to(stat_dtype),
        pred_original_sample=x0,
        pred_epsilon=eps,
        timestep=t,
        prev_timestep=t_prev,
        deterministic=deterministic,
        refined=refined,
    )


def policy_step(
    scheduler,
    model_fn: ModelFn,
    sample: torch.Tensor,
    timestep: int | torch.Tensor,
    eta: float,
    *,
    policy_target: PolicyTarget,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    variance_noise: torch.Tensor | None = None,
) -> DDIMStepOutput:
    """The policy π_θ(x_{t'} | x_t, c) in one call, for rollout and learner alike (§2.1–§2.2).

    Calls ``model_fn(x_t, t)`` (t as int64 [B]) and then :func:`ddim_step_with_logprob`, which calls
    ``model_fn`` once more for ``policy_target="enhanced"`` (except on the last step): one model
    evaluation for ``"standard"``, two for ``"enhanced"``. Rollout: ``prev_sample=None`` and a
    generator. Learner: ``prev_sample`` = the recorded action, gradients flow through every call.
    """
    t = _batch_timesteps(scheduler, timestep, sample)
    model_output = model_fn(sample, t)
    return ddim_step_with_logprob(
        scheduler,
        model_output,
        t,
        sample,
        eta,
        prev_sample=prev_sample,
        generator=generator,
        variance_noise=variance_noise,
        policy_target=policy_target,
        model_fn=model_fn,
    )
