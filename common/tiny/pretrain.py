"""Pre-training of the tiny policy's VAE, so the CPU demo's outputs can look like photographs.

The tiny policy (:func:`common.tiny.policy.build_tiny_policy`) is seeded and random. A random
``AutoencoderKL`` does not reconstruct images: decode(encode(x)) is coloured noise, so even a
perfect latent denoiser would decode to garbage. This module trains the tiny VAE as a plain
autoencoder on random crops of the *training* photographs of the synthetic dataset
(:data:`common.data.TRAIN_PHOTOS`; the test photos are never seen) and caches it as a diffusers
folder that ``model.tiny.vae_dir`` points at.

Recipe (:class:`VAEPretrainSettings`): crops of 40–100 % of a photo's shorter side rendered at
the data resolution, a random ``crop``² window of that, mirrored / rotated by k·90°, with a random
gamma (exposure) jitter; loss L1 + L2 between x and decode(posterior mean); AdamW with a linear
warm-up and cosine decay. The KL term of a VAE is left out: encode uses the posterior mean
(deterministic SFT targets, :meth:`common.controlnet_policy.ControlNetPolicy.encode_images`). Afterwards the
latent mean and standard deviation over training crops set ``shift_factor`` and
``scaling_factor`` (as Stable Diffusion's 0.18215), so a scaled latent has unit variance — what
the diffusion schedule assumes of x_0.

    vae_dir = ensure_tiny_vae(".cache/restore-rl/tiny_vae", seed=0, latent_channels=4,
                              vae_block_out_channels=(32, 64), resolution=64)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "VAEPretrainSettings",
    "ensure_tiny_vae",
    "photo_crops",
    "reconstruction_psnr",
    "tiny_vae_dir",
    "tiny_vae_key",
    "train_tiny_vae",
    "warmup_cosine",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the recipe changes in a way the settings do not capture (invalidates caches).
RECIPE_VERSION = 1
#: Written beside the weights: settings, photos, PSNR before/after, seconds.
INFO_FILE = "pretrain.json"


@dataclass(frozen=True)
class VAEPretrainSettings:
    """How the tiny VAE is trained (every field is part of the cache key)."""

    steps: int = 250
    """Optimizer steps."""
    batch_size: int = 16
    """Crops per step."""
    crop: int = 32
    """Side of a training crop (px); the VAE is convolutional, so small crops train it for any size."""
    lr: float = 3e-3
    """Peak AdamW learning rate (1/step), after a linear warm-up over 10 % of the steps."""
    warmup_fraction: float = 0.1
    """Fraction of the steps spent warming up the learning rate."""


# ---------------------------------------------------------------------------------- data
def photo_crops(
    photos: Sequence[np.ndarray],
    n: int,
    rng: np.random.Generator,
    *,
    resolution: int,
    crop: int,
) -> torch.Tensor:
    """``n`` augmented crops -> float32 [n, 3, crop, crop] in [0, 1].

    Each: a random square of 40–100 % of a random photo's shorter side, resized (bicubic) to
    ``resolution``² — the scale of the dataset's pairs — then a random ``crop``² window, a random
    mirror and k·90° rotation, and an exposure jitter x**γ with log γ ~ U(log 0.7, log 1.4).
    """
    from PIL import Image

    if crop > resolution:
        raise ValueError(f"crop: got {crop}; expected at most resolution ({resolution})")
    out = np.empty((n, crop, crop, 3), dtype=np.float32)
    for k in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        H, W = photo.shape[:2]
        side = max(min(H, W, resolution), int(rng.uniform(0.4, 1.0) * min(H, W)))
        y0, x0 = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
        img = Image.fromarray(np.ascontiguousarray(photo[y0 : y0 + side, x0 : x0 + side]))
        img = np.asarray(img.resize((resolution, resolution), Image.Resampling.BICUBIC))
        y1, x1 = rng.integers(0, resolution - crop + 1, size=2)
        x = img[y1 : y1 + crop, x1 : x1 + crop].astype(np.float32) / 255.0
        if rng.random() < 0.5:
            x = x[:, ::-1]
        x = np.rot90(x, int(rng.integers(4)))
        out[k] = np.power(x, math.exp(rng.uniform(math.log(0.7), math.log(1.4))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _train_photos() -> list[np.ndarray]:
    from common.data import TRAIN_PHOTOS, _photo

    return [_photo(name) for name in TRAIN_PHOTOS]


# ------------------------------------------------------------------------------- metrics
@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor | np.ndarray) -> float:
    """Mean PSNR (dB, peak 1) of decode(posterior mean(encode(x))) against x over the images.

    ``images``: uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1].
    """
    from common.policy import images_to_tensor

    x = images_to_tensor(images)
    was_training = vae.training
    vae.eval()
    z = vae.encode(x * 2 - 1).latent_dist.mean
    y = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
    vae.train(was_training)
    mse = (y - x).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


# ------------------------------------------------------------------------------ training
def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_fraction: float):
    """LambdaLR: linear warm-up over ``warmup_fraction`` of ``steps``, then cosine decay to 0."""
    warm = max(1, int(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_tiny_vae(
    vae: AutoencoderKL,
    settings: VAEPretrainSettings,
    *,
    resolution: int,
    seed: int = 0,
    photos: Sequence[np.ndarray] | None = None,
    log_every: int = 50,
) -> list[float]:
    """Train ``vae`` in place as an autoencoder (module docstring); returns the loss per step.

    Then sets ``shift_factor`` / ``scaling_factor`` in its config from 64 training crops at
    ``resolution`` (unit-variance scaled latents). Deterministic given ``seed`` on one machine.
    """
    photos = _train_photos() if photos is None else photos
    rng = np.random.default_rng([seed, RECIPE_VERSION])
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, settings.steps, settings.warmup_fraction)
    losses = []
    vae.train()
    t0 = time.perf_counter()
    for step in range(settings.steps):
        x = photo_crops(photos, settings.batch_size, rng, resolution=resolution, crop=settings.crop)
        x = x * 2 - 1  # the VAE works in [-1, 1]
        z = vae.encode(x).latent_dist.mean  # [B, C, crop/s, crop/s]
        err = vae.decode(z).sample - x
        loss = err.abs().mean() + err.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            logger.info(
                "tiny VAE step %d/%d: loss %.4f (%.0f s)",
                step + 1,
                settings.steps,
                np.mean(losses[-log_every:]),
                time.perf_counter() - t0,
            )
    vae.eval()
    with torch.no_grad():
        x = photo_crops(photos, 64, rng, resolution=resolution, crop=resolution)
        z = vae.encode(x * 2 - 1).latent_dist.mean
    # SD's convention: latents = (z − shift) · scaling_factor have unit variance.
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return losses


# --------------------------------------------------------------------------------- cache
def tiny_vae_key(
    *,
    seed: int,
    latent_channels: int,
    vae_block_out_channels: Sequence[int],
    resolution: int,
    settings: VAEPretrainSettings,
) -> str:
    """12 hex digits naming a trained tiny VAE: shape, seed, resolution, recipe and photos."""
    from common.data import TRAIN_PHOTOS

    blob = json.dumps(
        {
            "seed": seed,
            "latent_channels": latent_channels,
            "vae_block_out_channels": list(vae_block_out_channels),
            "resolution": resolution,
            "settings": asdict(settings),
            "recipe": RECIPE_VERSION,
            "photos": list(TRAIN_PHOTOS),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_vae_dir(
    cache_dir: str | Path,
    *,
    seed: int = 0,
    latent_channels: int = 4,
    vae_block_out_channels: Sequence[int] = (32, 64),
    resolution: int = 64,
    settings: VAEPretrainSettings | None = None,
) -> Path:
    """Where :func:`ensure_tiny_vae` keeps the VAE of these arguments: ``<cache_dir>/vae-<key>``."""
    key = tiny_vae_key(
        seed=seed,
        latent_channels=latent_channels,
        vae_block_out_channels=vae_block_out_channels,
        resolution=resolution,
        settings=settings or VAEPretrainSettings(),
    )
    return Path(cache_dir) / f"vae-{key}"


def ensure_tiny_vae(
    cache_dir: str | Path,
    *,
    seed: int = 0,
    latent_channels: int = 4,
    vae_block_out_channels: Sequence[int] = (32, 64),
    resolution: int = 64,
    settings: VAEPretrainSettings | None = None,
) -> Path:
    """The folder of the trained tiny VAE for these arguments: reused when cached, else trained.

    ``<cache_dir>/vae-<key>/`` (:func:`tiny_vae_dir`) holds a diffusers ``AutoencoderKL`` and
    :data:`INFO_FILE`. It is written to a temporary folder and renamed into place, so a crash
    never leaves a half-written cache and two concurrent callers both end with a complete one.
    """
    from common.data import SyntheticRestorationDataset
    from common.tiny.policy import tiny_vae

    settings = settings or VAEPretrainSettings()
    final = tiny_vae_dir(
        cache_dir,
        seed=seed,
        latent_channels=latent_channels,
        vae_block_out_channels=vae_block_out_channels,
        resolution=resolution,
        settings=settings,
    )
    if (final / INFO_FILE).is_file():
        return final
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae(
            resolution,
            latent_channels=latent_channels,
            vae_block_out_channels=tuple(vae_block_out_channels),
        )
    # Held-out photos (the synthetic test split's ground truths) only measure the result.
    held_out = np.stack(
        [p.gt for p in SyntheticRestorationDataset(8, resolution, split="test", seed=seed)]
    )
    psnr_before = reconstruction_psnr(vae, held_out)
    t0 = time.perf_counter()
    losses = train_tiny_vae(vae, settings, resolution=resolution, seed=seed)
    seconds = time.perf_counter() - t0
    psnr_after = reconstruction_psnr(vae, held_out)
    info = {
        "key": final.name.removeprefix("vae-"),
        "seed": seed,
        "resolution": resolution,
        "settings": asdict(settings),
        "recipe": RECIPE_VERSION,
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-10:])),
        "psnr_held_out_before_db": round(psnr_before, 3),
        "psnr_held_out_after_db": round(psnr_after, 3),
        "seconds": round(seconds, 1),
        "shift_factor": vae.config.shift_factor,
        "scaling_factor": vae.config.scaling_factor,
    }
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: keep its folder
        if not (final / INFO_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "tiny VAE pre-trained in %.0f s: held-out PSNR %.2f -> %.2f dB (%s)",
        seconds,
        psnr_before,
        psnr_after,
        final,
    )
    return final
