"""The diffusion restoration policy π_θ(x_{t'} | x_t, c): its contract (DESIGN.md §2.7).

A policy predicts the model output (ε, or v for v-prediction models) from the noisy latent x_t,
the timestep t and the condition c (the LQ image). The DDIM step math that turns this output into
a Gaussian action lives in :mod:`common.diffusion`; the denoising loop lives in ``rollout/``.

This module holds what every role relies on: the :class:`Policy` protocol, the image/latent
conventions and their helpers, and :func:`build_policy`, the one place that reads a
:class:`common.config.ModelConfig`. The implementation is :class:`common.controlnet_policy.
ControlNetPolicy`; its builders are :func:`common.policy_loading.load_pretrained_policy` (a
local SD-2.1-style folder; nothing is ever downloaded) and :func:`common.tiny.policy.
build_tiny_policy` (seeded tiny models; tests and the CPU demo).

Conventions used throughout (B batch, C latent channels, h×w latent, H×W image, s = H/h):

* latents: float32 [B, C, h, w], already multiplied by the VAE ``scaling_factor``;
* control: float [B, 3, H, W] in [0, 1] — RGB, not normalised (as diffusers' ControlNet
  pipelines feed their condition image);
* uint8 images: [B, H, W, 3] (the layout of :class:`common.types.Trajectory`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from common.types import ShapeError

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

    from common.config import ModelConfig
    from common.controlnet_policy import ControlNetPolicy

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "PROMPT_EMBEDS_FILE",
    "DType",
    "Finetune",
    "Policy",
    "PolicyLoadError",
    "build_policy",
    "cast_module",
    "dtype_of",
    "encode_prompt",
    "images_to_tensor",
    "images_to_uint8",
    "torch_dtype",
]

Finetune = Literal["lora", "controlnet_full", "full"]
DType = Literal["float32", "bfloat16", "float16"]

#: File written by :meth:`ControlNetPolicy.save_pretrained` with the fixed prompt embedding
#: (used by :func:`load_pretrained_policy` when the folder has no text encoder).
PROMPT_EMBEDS_FILE = "prompt_embeds.safetensors"
_LORA_CONFIG_FILE = "adapter_config.json"
#: Sub-folders of a ``full`` trainable-weights folder (each a diffusers model folder).
_FULL_PARTS = ("unet", "controlnet")
_ADAPTER = "default"  # peft's adapter name


#: ControlNet modules that get LoRA adapters unless the config says otherwise.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")



class PolicyLoadError(ValueError):
    """A model folder or checkpoint that cannot be used; the message names the path."""


# ----------------------------------------------------------------------------------- protocol
@runtime_checkable
class Policy(Protocol):
    """What rollout and learner need from a diffusion restoration policy.

    Attributes:
        scheduler: the policy's own ``DDIMScheduler`` (its ``alphas_cumprod`` define §2.1). It is
            stateful (``set_timesteps``): a caller that changes the step count takes a copy with
            ``DDIMScheduler.from_config(policy.scheduler.config)``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` — what :meth:`predict` returns.
        vae_scale_factor: H / h.
    """

    scheduler: DDIMScheduler
    prediction_type: str
    vae_scale_factor: int

    def predict(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, control: torch.Tensor
    ) -> torch.Tensor:
        """Model output [B, C, h, w] from x_t [B, C, h, w], t (int or [B]), control [B, 3, H, W]."""
        ...

    def encode_images(
        self, images: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1] -> latents float32 [B, C, h, w]."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> float32 images [B, 3, H, W] in [0, 1]."""
        ...

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a resolution × resolution image."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def trainable_state_dict(self, clone: bool = True) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def reference(self) -> contextlib.AbstractContextManager[None]:
        """Within the context :meth:`predict` runs the frozen initial policy (KL term, §2.6)."""
        ...

    def save_trainable(self, directory: str | Path) -> Path: ...

    def load_trainable(self, directory: str | Path) -> None: ...

    def train(self, mode: bool = True) -> Policy: ...

    def eval(self) -> Policy: ...

    def to(self, device: torch.device | str) -> Policy: ...


# ------------------------------------------------------------------------------ image helpers
def images_to_tensor(
    images: torch.Tensor | np.ndarray, device: torch.device | str | None = None
) -> torch.Tensor:
    """Images -> float32 [B, 3, H, W] in [0, 1] on ``device``.

    Accepts uint8 [B, H, W, 3] (numpy or torch; the Trajectory / dataset layout) or a float
    tensor/array [B, 3, H, W] already in [0, 1] (returned as float32, not rescaled).
    """
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise ShapeError(
            f"images: expected a torch.Tensor or np.ndarray, got {type(images).__name__}"
        )
    if t.dim() != 4:
        raise ShapeError(
            f"images: expected 4 dims (uint8 [B,H,W,3] or float [B,3,H,W]), got shape {list(t.shape)}"
        )
    if t.dtype == torch.uint8:
        if t.shape[-1] != 3:
            raise ShapeError(f"images: uint8 images must be [B,H,W,3], got shape {list(t.shape)}")
        t = t.to(device).permute(0, 3, 1, 2).float() / 255.0
    elif t.is_floating_point():
        if t.shape[1] != 3:
            raise ShapeError(
                f"images: float images must be [B,3,H,W] in [0,1], got shape {list(t.shape)}"
            )
        t = t.to(device=device, dtype=torch.float32)
    else:
        raise ShapeError(f"images: expected uint8 or a float dtype, got {t.dtype}")
    return t.contiguous()


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (clamped, rounded), on the same device."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ShapeError(f"images: expected float [B,3,H,W], got shape {list(images.shape)}")
    return (
        (images.detach().float().clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .contiguous()
    )


def encode_prompt(text_encoder: nn.Module, tokenizer: Any, prompt: str) -> torch.Tensor:
    """The prompt embedding [1, L, D] exactly as diffusers' Stable Diffusion pipelines compute it.

    Padded to ``tokenizer.model_max_length``; the last hidden state of the CLIP text encoder (SD-2.x
    checkpoints already ship the text encoder cut at the penultimate layer).
    """
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = (
        ids.attention_mask.to(device)
        if getattr(text_encoder.config, "use_attention_mask", False)
        else None
    )
    with torch.no_grad():
        out = text_encoder(ids.input_ids.to(device), attention_mask=mask)
    return out[0].float()


# ----------------------------------------------------------------------------------- internals
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype: got {dtype!r}; expected one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    # Skip no-op casts: diffusers warns on every ``.to(dtype)`` of a model.
    return module if dtype_of(module) == dtype else module.to(dtype)


def dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# ------------------------------------------------------------------------------------- builders
def build_policy(
    model_cfg: ModelConfig, resolution: int, *, dtype: DType | None = None
) -> ControlNetPolicy:
    """Build the policy described by ``model_cfg`` (the only place that reads the config).

    ``dtype`` overrides ``model_cfg.dtype`` (e.g. the learner may keep the frozen parts in float32).
    """
    from common.policy_loading import load_pretrained_policy
    from common.tiny.policy import build_tiny_policy

    common = {
        "finetune": model_cfg.finetune,
        "lora_rank": model_cfg.lora_rank,
        "lora_alpha": model_cfg.lora_alpha,
        "lora_target_modules": list(model_cfg.lora_target_modules),
        "prediction_type": model_cfg.prediction_type,
        "init_checkpoint": model_cfg.init_checkpoint,
        "dtype": dtype or model_cfg.dtype,
    }
    if model_cfg.kind == "tiny":
        t = model_cfg.tiny
        policy = build_tiny_policy(
            resolution,
            seed=t.seed,
            block_out_channels=tuple(t.block_out_channels),
            layers_per_block=t.layers_per_block,
            cross_attention_dim=t.cross_attention_dim,
            attention_head_dim=t.attention_head_dim,
            latent_channels=t.latent_channels,
            vae_block_out_channels=tuple(t.vae_block_out_channels),
            text_seq_len=t.text_seq_len,
            num_train_timesteps=t.num_train_timesteps,
            vae_dir=t.vae_dir,
            **common,
        )
    else:
        policy = load_pretrained_policy(
            model_cfg.pretrained_dir,
            controlnet_dir=model_cfg.controlnet_dir,
            prompt=model_cfg.prompt,
            **common,
        )
    policy.latent_shape(resolution)  # fail early on an unusable resolution
    return policy


