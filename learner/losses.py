"""The learner's loss, as small pure functions (DESIGN.md §2.3, §2.5, §2.6; paper §4.2.4).

    L = (1/m) Σ_i [ a_i·L_diff,i + b_i·L_rl,i ] + β_KL·(1/m) Σ_i L_KL,i

with (a_i, b_i) = (1 − w_i, w_i) in the paper's adaptive mode (eq. 10; other modes in
:mod:`learner.modes`), w_i the difficulty weight, L_rl the PPO clipped surrogate, L_diff the
supervised diffusion loss on the ground truth and L_KL the KL to the reference policy.

Every function returns per-sample values [B] so the learner can micro-batch: the loss is linear in
them, and :func:`total_loss` takes the full batch size ``num_samples`` as its 1/m, so the
micro-batch losses of one batch sum to the full-batch loss (gradient accumulation is exact).

Shapes: B samples, T trained steps per sample, C×h×w a latent, H×W×3 an RGB image, R rewarded
steps. Images are uint8 (0–255) or float in [0, 1].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from common.diffusion import DETERMINISTIC_STD, gaussian_kl_equal_variance
from learner.modes import LossTerms

__all__ = [
    "PPOLoss",
    "SFTInputs",
    "TotalLoss",
    "difficulty_weights",
    "kl_loss",
    "ppo_clipped_loss",
    "reconstruction_distance",
    "reconstruction_reward",
    "sample_sft_timesteps",
    "select_train_steps",
    "sft_diffusion_loss",
    "sft_inputs",
    "total_loss",
]

#: Float images may overshoot [0, 1] by this much (decoder rounding) before it is an error.
_RANGE_TOL = 1e-3


# --------------------------------------------------------------------------- images and rewards
def _unit_rgb(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (0–255) or float in [0, 1] → float32 in [0, 1]; anything else is an error."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: expected uint8 (0-255) or float in [0, 1], got dtype {images.dtype}"
        )
    images = images.detach().to(torch.float32)
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if not (-_RANGE_TOL <= lo and hi <= 1 + _RANGE_TOL):  # also catches NaN
            raise ValueError(
                f"{name}: expected float RGB in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                "(images in [-1, 1] must be mapped to [0, 1] first)"
            )
    return images


def reconstruction_distance(images: torch.Tensor, gt_images: torch.Tensor) -> torch.Tensor:
    """RMSE over the last three dims (H, W, 3 — or 3, H, W: same layout for both) in [0, 1].

    ``images`` [B, ..., H, W, 3], ``gt_images`` [B, H, W, 3]; extra dims of ``images`` after B
    (e.g. R reward steps) are broadcast against the one ground truth per sample → [B, ...].
    Never carries a gradient. float32.
    """
    x = _unit_rgb(images, "images")
    g = _unit_rgb(gt_images, "gt_images").to(x.device)
    if g.dim() < 4 or x.dim() < g.dim() or x.shape[0] != g.shape[0] or x.shape[-3:] != g.shape[-3:]:
        raise ValueError(
            f"images {list(x.shape)} and gt_images {list(g.shape)}: expected [B, ..., H, W, 3] "
            "and [B, H, W, 3] with the same B, H, W"
        )
    g = g.reshape(g.shape[:1] + (1,) * (x.dim() - g.dim()) + g.shape[1:])  # [B, 1.., H, W, 3]
    return (x - g).square().mean(dim=(-3, -2, -1)).sqrt()


def difficulty_weights(
    final_images: torch.Tensor, gt_images: torch.Tensor, *, max_distance: float | None = None
) -> torch.Tensor:
    """w_i = d_i / max_j d_j, d_i = RMSE(y_i, g_i) over RGB in [0, 1] (§2.5, paper eq. 9).

    Args:
        final_images: [B, H, W, 3] y_i, the restored outputs (``Trajectory.final_images``).
        gt_images: [B, H, W, 3] g_i, their ground truths.
        max_distance: max_j d_j over the whole learner batch when this call sees only part of it
            (data-parallel learners all-reduce it); default: the max over these B samples.

    Returns:
        float32 [B] in [0, 1], no gradient. If every distance is 0 (all outputs equal their ground
        truth) the weights are all 0: nothing is hard, so in ``adaptive`` mode SFT gets weight 1.
    """
    d = reconstruction_distance(final_images, gt_images)  # [B]
    if d.dim() != 1:
        raise ValueError(f"final_images: expected [B, H, W, 3], got {list(final_images.shape)}")
    d_max = float(d.max()) if max_distance is None else float(max_distance)
    if d_max < float(d.max()) - 1e-6:
        raise ValueError(
            f"max_distance ({d_max}) is below this batch's largest distance {float(d.max())}"
        )
    if d_max <= 0.0:
        return torch.zeros_like(d)
    return (d / d_max).clamp(0.0, 1.0)


def reconstruction_reward(x0_images: torch.Tensor, gt_images: torch.Tensor) -> torch.Tensor:
    """r_{i,k} = −RMSE(x̂0_img_{i,k}, g_i) over RGB in [0, 1] (§2.3 ablation "with Rec.", §4.2.3).

    ``x0_images`` [B, R, H, W, 3] (``Trajectory.reward_images``), ``gt_images`` [B, H, W, 3]
    → float32 [B, R], in [−1, 0].
    """
    if torch.as_tensor(x0_images).dim() != 5:
        raise ValueError(f"x0_images: expected [B, R, H, W, 3], got {list(x0_images.shape)}")
    return -reconstruction_distance(x0_images, gt_images)


# --------------------------------------------------------------------------- which steps to train
def select_train_steps(
    num_steps: int,
    deterministic: torch.Tensor,
    timestep_fraction: float,
    generator: torch.Generator | None = None,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """The denoising steps to train on (§2.1, §2.6 ``timestep_fraction``), sorted ascending.

    Deterministic steps (σ_t < 1e-8: no log-prob) are never chosen. Of the M others,
    n = max(1, ⌊fraction·M⌋) are drawn uniformly without replacement — independently per sample
    when ``batch_size`` is given (as DDPO permutes the steps per sample).

    Args:
        num_steps: K. deterministic: bool [K] (``Trajectory.deterministic``).
        timestep_fraction: in (0, 1]. generator: the learner's seeded RNG (CPU).

    Returns:
        int64 [n], or [batch_size, n] — step indices k in [0, K).
    """
    det = torch.as_tensor(deterministic).cpu()
    if det.dtype != torch.bool or det.shape != (num_steps,):
        raise ValueError(
            f"deterministic: expected bool [{num_steps}] (num_steps), "
            f"got {det.dtype} {list(det.shape)}"
        )
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"timestep_fraction: expected a value in (0, 1], got {timestep_fraction}")
    candidates = torch.nonzero(~det).flatten()  # [M] int64
    m = candidates.numel()
    if m == 0:
        raise ValueError(
            f"all {num_steps} steps are deterministic (σ_t < {DETERMINISTIC_STD}): "
            "nothing to train "
            "with RL; sample with rollout.eta > 0"
        )
    n = max(1, math.floor(timestep_fraction * m + 1e-9))  # 1e-9: 0.29·100 must give 29
    rows = 1 if batch_size is None else batch_size
    if rows < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    order = torch.rand(rows, m, generator=generator).argsort(dim=1)[:, :n]  # [rows, n]
    picked = candidates[order].sort(dim=1).values  # [rows, n]
    return picked[0] if batch_size is None else picked


# --------------------------------------------------------------------------- PPO
class PPOLoss(NamedTuple):
    """Per-sample PPO loss and cleanRL-style diagnostics (over the masked steps, no gradient).

    Attributes:
        loss: [B] — L_rl,i, mean over sample i's trained steps (0 for a sample with none).
        approx_kl: [] — mean of (ρ − 1) − log ρ (Schulman's low-variance KL estimator).
        old_approx_kl: [] — mean of −log ρ.
        clipfrac: [] — fraction of steps with |ρ − 1| > ε.
    """

    loss: torch.Tensor
    approx_kl: torch.Tensor
    old_approx_kl: torch.Tensor
    clipfrac: torch.Tensor


def ppo_clipped_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    mask: torch.Tensor | None = None,
) -> PPOLoss:
    """L_rl,i = mean_t max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logπ_θ − logπ_old) (§2.6).

    The negated PPO clipped surrogate (paper eq. 4), minimised. Log-probs are the per-element
    means of :func:`common.diffusion.gaussian_log_prob`, hence the tiny default ε (1e-4).

    Args:
        log_prob_new: [B, T] log π_θ, differentiable. log_prob_old: [B, T] log π_old (detached).
        advantages: [B, T] (detached). clip_range: ε > 0.
        mask: bool [B, T], True on trained steps; default all True. Masked-out entries (e.g. a
            deterministic step) contribute nothing, not even a NaN.
    """
    if (
        log_prob_new.dim() != 2
        or log_prob_old.shape != log_prob_new.shape
        or advantages.shape != log_prob_new.shape
    ):
        raise ValueError(
            f"log_prob_new {list(log_prob_new.shape)}, log_prob_old {list(log_prob_old.shape)}, "
            f"advantages {list(advantages.shape)}: expected the same [B, T]"
        )
    if not clip_range > 0:
        raise ValueError(f"clip_range: expected ε > 0, got {clip_range}")
    if mask is None:
        mask = torch.ones_like(log_prob_new, dtype=torch.bool)
    elif mask.dtype != torch.bool or mask.shape != log_prob_new.shape:
        raise ValueError(
            f"mask: expected bool {list(log_prob_new.shape)}, got {mask.dtype} {list(mask.shape)}"
        )
    dtype = torch.promote_types(log_prob_new.dtype, torch.float32)

    log_ratio = log_prob_new.to(dtype) - log_prob_old.detach().to(dtype)  # [B, T]
    log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))  # masked: ρ = 1
    ratio = log_ratio.exp()  # [B, T]
    adv = torch.where(mask, advantages.detach().to(dtype), torch.zeros_like(log_ratio))  # [B, T]
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_step = torch.maximum(pg_loss1, pg_loss2)  # [B, T], 0 where masked
    counts = mask.sum(dim=1)  # [B]
    loss = per_step.sum(dim=1) / counts.clamp_min(1).to(dtype)  # [B]

    with torch.no_grad():
        total = mask.sum().clamp_min(1).to(dtype)
        approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / total
        old_approx_kl = (-log_ratio * mask).sum() / total
        clipfrac = (((ratio - 1.0).abs() > clip_range) & mask).sum().to(dtype) / total
    return PPOLoss(loss, approx_kl, old_approx_kl, clipfrac)


# --------------------------------------------------------------------------- SFT
class SFTInputs(NamedTuple):
    """The supervised diffusion loss's model input and regression target.

    Attributes:
        noisy_latents: [B, C, h, w] x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (the forward process, DDPM eq. 4).
        target: [B, C, h, w] what the model should output at (x_t, t): ε for ``epsilon``,
            v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 for ``v_prediction``, x0 for ``sample``.
    """

    noisy_latents: torch.Tensor
    target: torch.Tensor


def sample_sft_timesteps(
    num_train_timesteps: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t ~ U{0, …, T−1} per sample, as in diffusers' training scripts → int64 [B] on ``device``."""
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    return t.to(device)


def sft_inputs(
    scheduler, clean_latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> SFTInputs:
    """Noisy latent and target for L_diff at per-sample timesteps t (§2.6).

    Coefficients in float64 from the scheduler's float32 ᾱ (as :mod:`common.diffusion`), cast to
    the latents' dtype; equals diffusers' ``add_noise`` / ``get_velocity`` up to float32 rounding.

    Args:
        scheduler: a diffusers scheduler (``alphas_cumprod``, ``config.prediction_type``).
        clean_latents: [B, C, h, w] x0 = the VAE latent of g_i (scaled by ``scaling_factor``).
        noise: [B, C, h, w] ε ~ N(0, I). timesteps: int64 [B] in [0, num_train_timesteps).
    """
    if noise.shape != clean_latents.shape:
        raise ValueError(
            f"noise: expected shape {list(clean_latents.shape)}, got {list(noise.shape)}"
        )
    t = torch.as_tensor(timesteps)
    batch = clean_latents.shape[0]
    if t.dtype != torch.int64 or t.shape != (batch,):
        raise ValueError(f"timesteps: expected int64 [{batch}], got {t.dtype} {list(t.shape)}")
    num_train = scheduler.config.num_train_timesteps
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_train):
        raise ValueError(f"timesteps: expected values in [0, {num_train}), got {t.tolist()}")

    alpha_bar = scheduler.alphas_cumprod.to(device=clean_latents.device, dtype=torch.float64)[
        t.to(clean_latents.device)
    ]  # [B] float64
    shape = (batch,) + (1,) * (clean_latents.dim() - 1)
    sqrt_a = alpha_bar.sqrt().to(clean_latents.dtype).view(shape)  # [B, 1, 1, 1]
    sqrt_1ma = (1 - alpha_bar).sqrt().to(clean_latents.dtype).view(shape)  # [B, 1, 1, 1]
    noise = noise.to(clean_latents.dtype)

    noisy = sqrt_a * clean_latents + sqrt_1ma * noise  # [B, C, h, w]
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = sqrt_a * noise - sqrt_1ma * clean_latents  # Salimans & Ho 2022, §4
    elif prediction_type == "sample":
        target = clean_latents
    else:
        raise ValueError(
            f"scheduler.config.prediction_type: expected 'epsilon', 'v_prediction' or 'sample', "
            f"got {prediction_type!r}"
        )
    return SFTInputs(noisy, target)


def sft_diffusion_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_diff,i = mean over non-batch dims of (model_output − target)² → [B] (≥ float32).

    With ``target`` from :func:`sft_inputs` this is the ε-prediction MSE (or v-/x0-prediction
    MSE, matching the scheduler's ``prediction_type``).
    """
    if model_output.shape != target.shape:
        raise ValueError(
            f"model_output {list(model_output.shape)} and target {list(target.shape)}: "
            "expected equal shapes"
        )
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    diff = model_output.to(dtype) - target.detach().to(dtype)
    return diff.square().reshape(diff.shape[0], -1).mean(dim=1)


# --------------------------------------------------------------------------- KL
def kl_loss(
    mean_theta: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float
) -> torch.Tensor:
    """L_KL at one step: ‖μ_θ − μ_ref‖²/(2σ_t²), mean over latent elements → [B] (§2.6).

    The exact KL(π_θ ‖ π_ref) of two Gaussians with the same σ_t
    (:func:`common.diffusion.gaussian_kl_equal_variance`); 0 on deterministic steps. The reference
    mean is detached: the reference policy is frozen.

    Args:
        mean_theta: [B, C, h, w] μ_θ (``DDIMStepOutput.mean``). mean_ref: [B, C, h, w] μ_ref.
        std: [B] or scalar σ_t (``DDIMStepOutput.std``).
    """
    if mean_theta.shape != mean_ref.shape:
        raise ValueError(
            f"mean_theta {list(mean_theta.shape)} and mean_ref {list(mean_ref.shape)}: "
            "expected equal shapes"
        )
    return gaussian_kl_equal_variance(mean_theta, mean_ref.detach(), std)


# --------------------------------------------------------------------------- the total
class TotalLoss(NamedTuple):
    """The loss and its parts. ``loss = rl + sft + kl`` exactly; the ``*_raw`` parts are the
    unweighted per-sample means, detached, for logging (also for terms the mode switches off).

    Attributes:
        loss: [] — what the learner backpropagates.
        rl: [] — (1/m) Σ b_i·L_rl,i (0 when off).
        sft: [] — (1/m) Σ a_i·L_diff,i (0 when off).
        kl: [] — β_KL·(1/m) Σ L_KL,i (0 when off).
        rl_raw, sft_raw, kl_raw: [] — mean_i of the per-sample losses given (None when not given).
    """

    loss: torch.Tensor
    rl: torch.Tensor
    sft: torch.Tensor
    kl: torch.Tensor
    rl_raw: torch.Tensor | None
    sft_raw: torch.Tensor | None
    kl_raw: torch.Tensor | None

    def metrics(self) -> dict[str, float]:
        """``losses/<part>`` → float, for metrics.jsonl and ``learner_loss{part}``; parts not
        given are left out."""
        return {
            f"losses/{name}": float(value.detach())
            for name, value in self._asdict().items()
            if value is not None
        }


def _per_sample_tensor(x: torch.Tensor | None, name: str, batch: int) -> torch.Tensor | None:
    if x is not None and (x.dim() != 1 or x.shape[0] != batch):
        raise ValueError(f"{name}: expected a per-sample [{batch}] tensor, got {list(x.shape)}")
    return x


def total_loss(
    terms: LossTerms,
    *,
    weights: torch.Tensor | None = None,
    rl: torch.Tensor | None = None,
    sft: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_samples: int | None = None,
) -> TotalLoss:
    """L = (1/m) Σ_i [ a(w)_i·L_diff,i + b(w)_i·L_rl,i ] + β_KL·(1/m) Σ_i L_KL,i (§2.6, eq. 10).

    ``terms`` (from :func:`learner.modes.loss_terms`) picks a, b and whether the KL is on.
    A term that is on must be given; one that is off may be given (it is logged, not added).

    Args:
        weights: [B] difficulty weights w_i (required when ``terms.needs_weights``).
        rl: [B] L_rl,i (:func:`ppo_clipped_loss`). sft: [B] L_diff,i (:func:`sft_diffusion_loss`).
        kl: [B] L_KL,i, the KL averaged over sample i's trained steps (:func:`kl_loss`).
        kl_coef: β_KL ≥ 0; with 0 the KL may be omitted even when on.
        num_samples: m, the learner batch size; default B. Pass the full batch's m when calling
            per micro-batch so that the micro-batch losses sum to the full-batch loss.
    """
    given = [x for x in (weights, rl, sft, kl) if x is not None]
    if not given:
        raise ValueError("total_loss: no per-sample losses given")
    if given[0].dim() != 1:
        raise ValueError(
            f"total_loss: expected per-sample [B] tensors, got shape {list(given[0].shape)}"
        )
    batch = given[0].shape[0]
    weights = _per_sample_tensor(weights, "weights", batch)
    rl = _per_sample_tensor(rl, "rl", batch)
    sft = _per_sample_tensor(sft, "sft", batch)
    kl = _per_sample_tensor(kl, "kl", batch)
    m = batch if num_samples is None else num_samples
    if m < batch:
        raise ValueError(f"num_samples: expected >= {batch} (this call's batch), got {m}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef: expected β_KL >= 0, got {kl_coef}")
    if weights is None:
        if terms.needs_weights:
            raise ValueError("weights: this mode weights its losses by difficulty; pass w [B]")
        weights = torch.zeros(batch)  # unread: the mode's weight functions are constant
    ref = given[0]
    zero = torch.zeros((), dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device)
    weights = weights.detach().to(device=ref.device, dtype=zero.dtype)

    def term(fn, values, name):
        if fn is None:
            return zero
        if values is None:
            raise ValueError(f"{name}: the mode's loss includes L_{name}; pass it as a [B] tensor")
        return (fn(weights) * values).sum() / m

    rl_part = term(terms.rl_weight_fn, rl, "rl")
    sft_part = term(terms.sft_weight_fn, sft, "sft")
    if terms.use_kl and kl_coef > 0:
        if kl is None:
            raise ValueError(
                "kl: the mode's loss includes β_KL·L_KL with β_KL > 0; pass it as a [B] tensor"
            )
        kl_part = kl_coef * kl.sum() / m
    else:
        kl_part = zero

    def raw(values):
        return None if values is None else values.detach().mean().to(zero.dtype)

    return TotalLoss(
        loss=rl_part + sft_part + kl_part,
        rl=rl_part,
        sft=sft_part,
        kl=kl_part,
        rl_raw=raw(rl),
        sft_raw=raw(sft),
        kl_raw=raw(kl),
    )
