"""Seeded tiny policies for tests and the CPU demo (the shapes of :class:`common.config.TinyModelConfig`).

The same diffusers classes as a real SD + ControlNet policy, at a size a CPU trains in minutes:
:func:`build_tiny_policy`, and its VAE (:func:`tiny_vae`, random; :func:`load_tiny_vae`, the
trained one that :mod:`common.tiny.pretrain` writes).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.controlnet_policy import ControlNetPolicy, cond_embedding_channels
from common.model_folders import from_pretrained_local, require_model_folder
from common.policy import DEFAULT_LORA_TARGETS, DType, Finetune, PolicyLoadError
from common.policy_loading import apply_init_checkpoint

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler

__all__ = ["build_tiny_policy", "load_tiny_vae", "tiny_vae"]

logger = logging.getLogger(__name__)


def _tiny_scheduler(num_train_timesteps: int, prediction_type: str) -> DDIMScheduler:
    from diffusers import DDIMScheduler

    # Stable Diffusion's schedule (scaled-linear β from 0.00085 to 0.012, "leading" spacing).
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_vae(
    resolution: int = 64,
    *,
    latent_channels: int = 4,
    vae_block_out_channels: tuple[int, ...] = (32, 64),
) -> AutoencoderKL:
    """The tiny policy's ``AutoencoderKL`` (latent downscale 2**(levels-1)), drawing its random
    initial weights from the global torch RNG (callers seed or fork it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels),
        block_out_channels=tuple(vae_block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, math.gcd(*vae_block_out_channels)),
        sample_size=resolution,
    )


def load_tiny_vae(
    vae_dir: str | Path, *, latent_channels: int, vae_block_out_channels: tuple[int, ...]
) -> AutoencoderKL:
    """A trained tiny VAE (a diffusers folder, e.g. from :mod:`common.tiny.pretrain`), checked
    against the tiny shape it must replace."""
    from diffusers import AutoencoderKL

    path = Path(vae_dir)
    variant = require_model_folder(path, "tiny VAE", weights_stem="diffusion_pytorch_model")
    vae = from_pretrained_local(AutoencoderKL, path, "tiny VAE", variant)
    got = (vae.config.latent_channels, list(vae.config.block_out_channels))
    want = (latent_channels, list(vae_block_out_channels))
    if got != want:
        raise PolicyLoadError(
            f"model.tiny.vae_dir {path}: the VAE has latent_channels {got[0]}, block_out_channels "
            f"{got[1]}; model.tiny expects latent_channels {want[0]}, vae_block_out_channels {want[1]}"
        )
    return vae


def build_tiny_policy(
    resolution: int = 64,
    *,
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    latent_channels: int = 4,
    vae_block_out_channels: tuple[int, ...] = (32, 64),
    text_seq_len: int = 8,
    num_train_timesteps: int = 1000,
    prediction_type: str = "epsilon",
    finetune: Finetune = "lora",
    lora_rank: int = 4,
    lora_alpha: float = 4.0,
    lora_target_modules: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
    init_checkpoint: str | Path | None = None,
    vae_dir: str | Path | None = None,
    dtype: DType = "float32",
) -> ControlNetPolicy:
    """Seeded tiny UNet + ControlNet + VAE (bit-identical for equal arguments).

    The VAE is random unless ``vae_dir`` names a trained one (:func:`load_tiny_vae`; the CPU demo
    pre-trains it with :mod:`common.tiny.pretrain`): a random VAE does not reconstruct images, so
    only a trained one makes the policy's outputs look like photographs.

    Level 0 of the UNet has no attention (the 2× larger token grid); deeper levels cross-attend
    to the prompt. ``attention_head_dim`` is the width of one head (heads = channels / width).
    The ControlNet's zero-initialised convolutions get N(0, 0.02²) weights (a stand-in for a
    trained ControlNet, see :func:`_zero_initialised_parts`).
    The prompt embedding is a seeded N(0, 1) tensor [1, text_seq_len, cross_attention_dim]: a
    tiny model has no text encoder, and a fixed random "prompt" conditions it just as well.
    ``resolution`` only sets ``sample_size`` in the configs; any multiple of the downscale works.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    levels = len(block_out_channels)
    groups = min(32, math.gcd(*block_out_channels))
    vae_scale = 2 ** (len(vae_block_out_channels) - 1)
    for c in block_out_channels:
        if c % attention_head_dim:
            raise ValueError(
                f"attention_head_dim: {attention_head_dim} does not divide block channels {c}"
            )
    down = (
        ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        if levels > 1
        else ("CrossAttnDownBlock2D",)
    )
    up = (
        ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
        if levels > 1
        else ("CrossAttnUpBlock2D",)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=resolution // vae_scale,
            in_channels=latent_channels,
            out_channels=latent_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            # diffusers' UNet reads `attention_head_dim` as the number of heads per block.
            attention_head_dim=tuple(c // attention_head_dim for c in block_out_channels),
            norm_num_groups=groups,
        )
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=cond_embedding_channels(vae_scale)
        )
        # A tiny ControlNet stands in for a trained one: its zero-initialised convolutions get
        # small weights, so the control image steers the UNet and LoRA adapters get gradient.
        for conv in (
            controlnet.controlnet_cond_embedding.conv_out,
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ):
            nn.init.normal_(conv.weight, std=0.02)
        vae = (
            tiny_vae(
                resolution,
                latent_channels=latent_channels,
                vae_block_out_channels=tuple(vae_block_out_channels),
            )
            if vae_dir is None
            else load_tiny_vae(
                vae_dir,
                latent_channels=latent_channels,
                vae_block_out_channels=tuple(vae_block_out_channels),
            )
        )
    gen = torch.Generator().manual_seed(seed)
    prompt_embeds = torch.randn(1, text_seq_len, cross_attention_dim, generator=gen)
    controlnet = apply_init_checkpoint(unet, controlnet, init_checkpoint)
    return ControlNetPolicy(
        unet,
        controlnet,
        vae,
        _tiny_scheduler(num_train_timesteps, prediction_type),
        prompt_embeds,
        finetune=finetune,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_target_modules=lora_target_modules,
        dtype=dtype,
        seed=seed,
    )


