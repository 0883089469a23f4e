"""The diffusion restoration policy π_θ(x_{t'} | x_t, c) (DESIGN.md §2.7).

A policy predicts the model output (ε, or v for v-prediction models) from the noisy latent x_t,
the timestep t and the condition c (the LQ image). The DDIM step math that turns this output into
a Gaussian action lives in :mod:`common.diffusion`; the denoising loop lives in ``rollout/``.

:class:`ControlNetPolicy` is the first implementation: a frozen ``UNet2DConditionModel`` steered
by a ``ControlNetModel`` that sees the LQ image (``controlnet_cond``), a frozen ``AutoencoderKL``,
a ``DDIMScheduler`` and one fixed prompt embedding computed once. Training adapts LoRA adapters
(peft) on chosen ControlNet modules, the whole ControlNet, or UNet + ControlNet (``full``: SFT
pre-training of a model whose UNet is not yet a restorer, e.g. the tiny demo policy); the
reference policy for the KL term (§2.6) is the same model with the adapters disabled, or a frozen
copy of the initial trainable parts.

Conventions used throughout (B batch, C latent channels, h×w latent, H×W image, s = H/h):

* latents: float32 [B, C, h, w], already multiplied by the VAE ``scaling_factor``;
* control: float [B, 3, H, W] in [0, 1] — RGB, not normalised (as diffusers' ControlNet
  pipelines feed their condition image);
* uint8 images: [B, H, W, 3] (the layout of :class:`common.types.Trajectory`).

Builders: :func:`build_policy` (thin adapter from :class:`common.config.ModelConfig`),
:func:`build_tiny_policy` (seeded tiny models; tests and the CPU demo) and
:func:`load_pretrained_policy` (a local SD-2.1-style folder; nothing is ever downloaded).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from common.types import ShapeError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel

    from common.config import ModelConfig

__all__ = [
    "ControlNetPolicy",
    "Policy",
    "PolicyLoadError",
    "build_policy",
    "build_tiny_policy",
    "encode_prompt",
    "images_to_tensor",
    "images_to_uint8",
    "load_pretrained_policy",
    "load_tiny_vae",
    "tiny_vae",
]

logger = logging.getLogger(__name__)

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
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype: got {dtype!r}; expected one of {sorted(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[dtype]


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    # Skip no-op casts: diffusers warns on every ``.to(dtype)`` of a model.
    return module if _dtype_of(module) == dtype else module.to(dtype)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cond_embedding_channels(vae_scale: int) -> tuple[int, ...]:
    # The ControlNet's conditioning embedding halves H log2(s) times to reach the latent size:
    # it needs log2(s)+1 levels. s = 8 gives diffusers' default (16, 32, 96, 256).
    levels = int(math.log2(vae_scale)) + 1
    base = (16, 32, 96, 256)
    return tuple(base[i] if i < len(base) else 256 for i in range(levels))


def _check_lora_targets(controlnet: nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in controlnet.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(
                f"lora_target_modules: {target!r} matches no module of the ControlNet "
                f"(expected suffixes of module names such as 'to_q', 'to_out.0', 'conv1')"
            )


def _lora_config(
    rank: int, alpha: float, targets: list[str], modules_to_save: list[str] | None = None
) -> Any:
    from peft import LoraConfig

    # init_lora_weights=True: A ~ Kaiming-uniform, B = 0, so the adapted policy starts equal to the
    # reference (ratio exactly 1 before the first update, §2.1).
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=True,
        modules_to_save=modules_to_save or None,
    )


def _zero_initialised_parts(controlnet: ControlNetModel) -> list[str]:
    """Names of the ControlNet's zero-initialised parts that are still exactly zero.

    A ControlNet fresh from ``from_unet`` has zero output convolutions and a zero last layer of
    its conditioning embedding: the control image has no effect and every gradient reaching a
    LoRA adapter *inside* the ControlNet is zero, forever. Such parts must train in full.
    """
    parts: list[str] = []
    if not controlnet.controlnet_cond_embedding.conv_out.weight.any():
        parts.append("controlnet_cond_embedding")
    outs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    if not any(conv.weight.any() for conv in outs):
        parts += [
            f"controlnet_down_blocks.{i}" for i in range(len(controlnet.controlnet_down_blocks))
        ]
        parts.append("controlnet_mid_block")
    return parts


def _is_lora_dir(path: Path) -> bool:
    return (path / _LORA_CONFIG_FILE).is_file()


def _merge_lora_checkpoint(controlnet: ControlNetModel, path: Path) -> ControlNetModel:
    """Fold a peft LoRA adapter saved by :meth:`ControlNetPolicy.save_trainable` into ``controlnet``."""
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(
            controlnet, str(path), is_trainable=False
        ).merge_and_unload()
    except Exception as err:  # peft raises several types; the path is what the user needs
        raise PolicyLoadError(
            f"{path}: could not load the LoRA adapter onto the ControlNet ({err})"
        ) from err
    return merged


def _load_model_weights(module: nn.Module, path: Path, what: str) -> None:
    """Copy the weights of a diffusers model folder into ``module`` (same class, same shapes)."""
    _require_model_folder(path, what, weights_stem="diffusion_pytorch_model")
    cls = type(module)
    try:
        other = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise PolicyLoadError(f"{path}: could not load a {cls.__name__} ({err})") from err
    try:
        module.load_state_dict(other.state_dict(), strict=True)
    except RuntimeError as err:
        raise PolicyLoadError(
            f"{path}: {what} weights do not fit this policy's {what} ({err})"
        ) from err


def _load_controlnet_weights(controlnet: ControlNetModel, path: Path) -> None:
    """Copy the weights of a diffusers ControlNet folder into ``controlnet`` (same architecture)."""
    _load_model_weights(controlnet, path, "ControlNet")


def _is_full_dir(path: Path) -> bool:
    return all((path / part / "config.json").is_file() for part in _FULL_PARTS)


def _load_full_weights(unet: UNet2DConditionModel, controlnet: ControlNetModel, path: Path) -> None:
    """Load a ``full`` folder (``unet/`` + ``controlnet/``, diffusers) into ``unet`` and ``controlnet``."""
    if not _is_full_dir(path):
        raise PolicyLoadError(
            f"{path}: expected unet/ and controlnet/ diffusers folders (a finetune=full checkpoint)"
        )
    _load_model_weights(unet, path / "unet", "UNet")
    _load_model_weights(controlnet, path / "controlnet", "ControlNet")


def _apply_init_checkpoint(
    unet: UNet2DConditionModel, controlnet: ControlNetModel, path: str | Path | None
) -> ControlNetModel:
    """Start from SFT (or other) weights: a LoRA adapter is merged, a ControlNet folder is loaded,
    a ``full`` folder (``unet/`` + ``controlnet/``) loads into both models (``unet`` in place).

    Merging makes the checkpoint part of the initial policy, so the KL reference (§2.6) is the
    checkpoint, and a fresh LoRA starts on top of it.
    """
    if path is None:
        return controlnet
    path = Path(path)
    if not path.is_dir():
        raise PolicyLoadError(
            f"init_checkpoint {path}: not a folder (expected a LoRA adapter, a ControlNet folder or "
            "unet/ + controlnet/)"
        )
    if _is_lora_dir(path):
        return _merge_lora_checkpoint(controlnet, path)
    if (path / "config.json").is_file():
        _load_controlnet_weights(controlnet, path)
        return controlnet
    if _is_full_dir(path):
        _load_full_weights(unet, controlnet, path)
        return controlnet
    raise PolicyLoadError(
        f"init_checkpoint {path}: expected {_LORA_CONFIG_FILE} (a peft LoRA adapter), config.json + "
        "diffusion_pytorch_model.safetensors (a diffusers ControlNet) or unet/ + controlnet/ "
        "(diffusers folders of a finetune=full checkpoint)"
    )


# ------------------------------------------------------------------------------------- policy
class ControlNetPolicy:
    """UNet + ControlNet on the LQ image + VAE (frozen) + DDIM; trains LoRA, the ControlNet, or both.

    Args:
        unet: the denoiser (frozen unless ``finetune="full"``).
        controlnet: the ControlNet (its weights are the initial policy).
        vae: the frozen autoencoder.
        scheduler: the DDIM scheduler defining ᾱ_t.
        prompt_embeds: float [1, L, D] — the fixed prompt embedding, computed once.
        finetune: ``lora`` (peft adapters on ``lora_target_modules`` of the ControlNet; reference =
            adapters disabled), ``controlnet_full`` (every ControlNet weight; reference = a frozen
            copy of the initial ControlNet) or ``full`` (every UNet and ControlNet weight; reference
            = frozen copies of both; trainable names are prefixed ``unet.`` / ``controlnet.``).
        lora_rank, lora_alpha, lora_target_modules: the LoRA adapters (scale = alpha / rank).
        dtype: weights dtype of the frozen parts (UNet, VAE, reference copies). Trainable models
            stay float32; inputs are cast at each module boundary.
        seed: seed of the LoRA A initialisation (B is 0).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        vae: AutoencoderKL,
        scheduler: DDIMScheduler,
        prompt_embeds: torch.Tensor,
        *,
        finetune: Finetune = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_target_modules: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
        dtype: DType | torch.dtype = "float32",
        seed: int = 0,
    ):
        _check_components(unet, controlnet, vae, scheduler, prompt_embeds, where="ControlNetPolicy")
        if finetune not in ("lora", "controlnet_full", "full"):
            raise ValueError(
                f"finetune: got {finetune!r}; expected 'lora', 'controlnet_full' or 'full'"
            )
        frozen = _torch_dtype(dtype)
        self._reference_unet: UNet2DConditionModel | None = None
        if finetune == "full":
            self._reference_unet = _cast(copy.deepcopy(unet), frozen).eval().requires_grad_(False)
            self.unet = _cast(unet, torch.float32).eval().requires_grad_(True)
        else:
            self.unet = _cast(unet, frozen).eval().requires_grad_(False)
        self.vae = _cast(vae, frozen).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.prediction_type: str = scheduler.config.prediction_type
        self.vae_scale_factor: int = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels: int = vae.config.latent_channels
        self.finetune: Finetune = finetune
        # [1, L, D]: expanded (not copied) to the batch in predict.
        self.prompt_embeds = prompt_embeds.detach().float()
        self.training = False
        self._reference_depth = 0
        self._reference_controlnet: ControlNetModel | None = None
        self._peft: Any = None

        controlnet = _cast(controlnet, torch.float32).requires_grad_(False)
        if finetune == "lora":
            from peft import get_peft_model

            targets = list(lora_target_modules)
            _check_lora_targets(controlnet, targets)
            # Zero-initialised parts of a fresh ControlNet train in full beside the adapters
            # (peft `modules_to_save`: saved with the adapter, bypassed when adapters are disabled).
            untrained = _zero_initialised_parts(controlnet)
            if untrained:
                logger.warning(
                    "ControlNet has untrained zero-initialised parts (%s): training them in full beside "
                    "the LoRA adapters, which alone would receive no gradient",
                    ", ".join(untrained),
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                # PeftModel: only the adapters (and modules_to_save) require grad; save_pretrained
                # writes peft's format.
                self._peft = get_peft_model(
                    controlnet, _lora_config(lora_rank, lora_alpha, targets, untrained)
                )
            self.controlnet = self._peft
        else:  # controlnet_full, full
            self._reference_controlnet = (
                _cast(copy.deepcopy(controlnet), frozen).eval().requires_grad_(False)
            )
            self.controlnet = controlnet.requires_grad_(True)
        self.controlnet.eval()
        self._trainable_names = frozenset(
            prefix + n
            for prefix, module in self._trainable_modules().items()
            for n, p in module.named_parameters()
            if p.requires_grad
        )

    # -- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.prompt_embeds.device

    @property
    def base_controlnet(self) -> ControlNetModel:
        """The ControlNetModel (with LoRA layers injected in ``lora`` mode)."""
        return self._peft.get_base_model() if self._peft is not None else self.controlnet

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a resolution × resolution image; errors if not divisible."""
        unet_scale = 2 ** (len(self.unet.config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * unet_scale
        if resolution % multiple != 0:
            raise ValueError(
                f"resolution: got {resolution}; expected a multiple of {multiple} "
                f"(VAE downscale {self.vae_scale_factor} × UNet downscale {unet_scale})"
            )
        side = resolution // self.vae_scale_factor
        return (self.latent_channels, side, side)

    # -- forward ---------------------------------------------------------------------------
    def predict(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        control: torch.Tensor,
        *,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """ε̂ (or v̂) [B, C, h, w] = UNet(x_t, t, prompt, ControlNet residuals(x_t, t, prompt, control)).

        Args:
            sample: x_t, float [B, C, h, w] (latent space, scaled).
            timestep: an int, a 0-d tensor, or int/float [B] (scheduler timesteps).
            control: float [B, 3, H, W] in [0, 1] with H = h · vae_scale_factor.
            conditioning_scale: multiplier of the ControlNet residuals (diffusers' meaning).

        Returns the model output in ``sample``'s dtype. Differentiable w.r.t. the trainable
        weights unless called under ``torch.no_grad()``; inside :meth:`reference` it runs the
        frozen initial policy.
        """
        if sample.dim() != 4 or sample.shape[1] != self.latent_channels:
            raise ShapeError(
                f"sample: expected [B, {self.latent_channels}, h, w], got shape {list(sample.shape)}"
            )
        B, _, h, w = sample.shape
        s = self.vae_scale_factor
        if control.dim() != 4 or tuple(control.shape) != (B, 3, h * s, w * s):
            raise ShapeError(
                f"control: expected float [{B}, 3, {h * s}, {w * s}] (the LQ image in [0,1] at s={s}× the latent), "
                f"got shape {list(control.shape)}"
            )
        if not control.is_floating_point():
            raise ShapeError(
                f"control: expected a float tensor in [0,1], got {control.dtype} (use images_to_tensor)"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 0:
            t = t.expand(B)
        elif tuple(t.shape) != (B,):
            raise ShapeError(
                f"timestep: expected an int, a 0-d tensor or shape [{B}], got shape {list(t.shape)}"
            )
        cn, unet = self.controlnet, self.unet
        if self._reference_depth > 0:
            if self._reference_controlnet is not None:
                cn = self._reference_controlnet
            if self._reference_unet is not None:
                unet = self._reference_unet
        cn_dtype = _dtype_of(cn)
        down, mid = cn(
            sample.to(cn_dtype),
            t,
            encoder_hidden_states=self.prompt_embeds.to(cn_dtype).expand(B, -1, -1),
            controlnet_cond=control.to(cn_dtype),
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        ud = _dtype_of(unet)
        out = unet(
            sample.to(ud),
            t,
            encoder_hidden_states=self.prompt_embeds.to(ud).expand(B, -1, -1),
            down_block_additional_residuals=[d.to(ud) for d in down],
            mid_block_additional_residual=mid.to(ud),
            return_dict=False,
        )[0]
        return out.to(sample.dtype)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the frozen initial policy inside the context (LoRA disabled / the frozen copy).

        Re-entrant. Outputs carry no gradient to trainable weights; still wrap the call in
        ``torch.no_grad()`` in the learner to save memory.
        """
        if self._reference_depth == 0 and self._peft is not None:
            self._peft.base_model.disable_adapter_layers()
        self._reference_depth += 1
        try:
            yield
        finally:
            self._reference_depth -= 1
            if self._reference_depth == 0 and self._peft is not None:
                self._peft.base_model.enable_adapter_layers()

    disable_adapters = reference

    # -- VAE -------------------------------------------------------------------------------
    def encode_images(
        self, images: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images -> latents float32 [B, C, h, w] = (z − shift) · scaling_factor.

        z is the *mean* of the VAE posterior (deterministic: the SFT target of a ground truth must
        not change between calls); pass ``generator`` to sample z ~ q(z|x) instead.
        Accepts uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1].
        """
        x = images_to_tensor(images, self.device) * 2.0 - 1.0
        dist = self.vae.encode(x.to(_dtype_of(self.vae))).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> float32 RGB [B, 3, H, W] clamped to [0, 1] (differentiable)."""
        shift = self.vae.config.get("shift_factor") or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        x = self.vae.decode(z.to(_dtype_of(self.vae)), return_dict=False)[0]
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- trainable weights -----------------------------------------------------------------
    def _trainable_modules(self) -> dict[str, nn.Module]:
        """{name prefix: module} of the models holding trainable weights."""
        if self.finetune == "full":
            return {"unet.": self.unet, "controlnet.": self.controlnet}
        return {"": self.controlnet}

    def _trainable(self) -> dict[str, nn.Parameter]:
        # By name, fixed at construction: peft toggles requires_grad when adapters are disabled.
        return {
            prefix + n: p
            for prefix, module in self._trainable_modules().items()
            for n, p in module.named_parameters()
            if prefix + n in self._trainable_names
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._trainable().values())

    def trainable_state_dict(self, clone: bool = True) -> dict[str, torch.Tensor]:
        """{name: tensor} of exactly the trainable tensors (LoRA A/B, the ControlNet, or both models).

        ``clone=False`` returns detached views that change when the weights are updated.
        """
        return {
            n: (p.detach().clone() if clone else p.detach()) for n, p in self._trainable().items()
        }

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy trainable tensors in place (the keys must be exactly those of trainable_state_dict)."""
        params = self._trainable()
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        if missing or unexpected:
            raise KeyError(
                f"load_trainable_state_dict: keys differ from this policy's trainable weights "
                f"(missing {len(missing)}: {missing[:3]}; unexpected {len(unexpected)}: {unexpected[:3]})"
            )
        with torch.no_grad():
            for n, p in params.items():
                v = state_dict[n]
                if tuple(v.shape) != tuple(p.shape):
                    raise ShapeError(
                        f"load_trainable_state_dict: {n}: expected shape {list(p.shape)}, got {list(v.shape)}"
                    )
                p.copy_(v)

    def save_trainable(self, directory: str | Path) -> Path:
        """Write the trainable weights in a format loadable without this project.

        ``lora``: peft's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``):
        ``PeftModel.from_pretrained(ControlNetModel.from_pretrained(base), directory)``.
        ``controlnet_full``: a diffusers folder: ``ControlNetModel.from_pretrained(directory)``.
        ``full``: two diffusers folders: ``UNet2DConditionModel.from_pretrained(directory / "unet")``
        and ``ControlNetModel.from_pretrained(directory / "controlnet")``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._peft is not None:
            self._peft.save_pretrained(str(directory))
        elif self.finetune == "full":
            self.unet.save_pretrained(str(directory / "unet"), safe_serialization=True)
            self.controlnet.save_pretrained(str(directory / "controlnet"), safe_serialization=True)
        else:
            self.controlnet.save_pretrained(str(directory), safe_serialization=True)
        return directory

    def load_trainable(self, directory: str | Path) -> None:
        """Load weights written by :meth:`save_trainable` into the trainable part (resume)."""
        directory = Path(directory)
        if self._peft is not None:
            from peft import LoraConfig
            from peft.utils import load_peft_weights, set_peft_model_state_dict

            if not _is_lora_dir(directory):
                raise PolicyLoadError(
                    f"{directory}: no {_LORA_CONFIG_FILE} (expected a peft LoRA adapter folder)"
                )
            saved = LoraConfig.from_pretrained(str(directory))
            ours = self._peft.peft_config[_ADAPTER]
            for field in ("r", "lora_alpha", "target_modules", "modules_to_save"):
                a, b = getattr(saved, field), getattr(ours, field)
                if (set(a) if isinstance(a, (set, list)) else a) != (
                    set(b) if isinstance(b, (set, list)) else b
                ):
                    raise PolicyLoadError(
                        f"{directory}: adapter {field} is {a!r}; this policy expects {b!r}"
                    )
            try:
                weights = load_peft_weights(str(directory), device=str(self.device))
            except Exception as err:
                raise PolicyLoadError(
                    f"{directory}: could not read the adapter weights ({err})"
                ) from err
            result = set_peft_model_state_dict(self._peft, weights, adapter_name=_ADAPTER)
            lora_missing = [k for k in result.missing_keys if "lora_" in k]
            if result.unexpected_keys or lora_missing:
                raise PolicyLoadError(
                    f"{directory}: adapter keys do not fit this ControlNet "
                    f"(unexpected: {list(result.unexpected_keys)[:3]}, missing: {lora_missing[:3]})"
                )
        elif self.finetune == "full":
            _load_full_weights(self.unet, self.controlnet, directory)
        else:
            _load_controlnet_weights(self.controlnet, directory)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the *current* policy as a plain diffusers layout loadable by :func:`load_pretrained_policy`.

        ``unet/``, ``vae/``, ``scheduler/``, ``controlnet/`` (LoRA merged into the weights) and
        ``prompt_embeds.safetensors`` (the fixed prompt embedding; there is no text encoder).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(directory / "unet"))
        self.vae.save_pretrained(str(directory / "vae"))
        self.scheduler.save_pretrained(str(directory / "scheduler"))
        if self._peft is not None:
            merged = copy.deepcopy(self._peft).merge_and_unload()
        else:
            merged = self.controlnet
        merged.save_pretrained(str(directory / "controlnet"))
        save_file(
            {"prompt_embeds": self.prompt_embeds.detach().cpu().contiguous()},
            str(directory / PROMPT_EMBEDS_FILE),
        )
        return directory

    # -- modes and devices -----------------------------------------------------------------
    def train(self, mode: bool = True) -> ControlNetPolicy:
        """Train/eval mode of the trainable models; the frozen parts always stay in eval."""
        self.training = mode
        self.controlnet.train(mode)
        if self.finetune == "full":
            self.unet.train(mode)
        return self

    def eval(self) -> ControlNetPolicy:
        return self.train(False)

    def to(self, device: torch.device | str) -> ControlNetPolicy:
        self.unet.to(device)
        self.vae.to(device)
        self.controlnet.to(device)
        for ref in (self._reference_controlnet, self._reference_unet):
            if ref is not None:
                ref.to(device)
        self.prompt_embeds = self.prompt_embeds.to(device)
        return self


# --------------------------------------------------------------------------------- validation
def _check_components(unet, controlnet, vae, scheduler, prompt_embeds, *, where: str) -> None:
    """Raise :class:`PolicyLoadError` when the parts cannot work together (names ``where``)."""
    from diffusers import DDIMScheduler

    problems: list[str] = []
    C = vae.config.latent_channels
    if unet.config.in_channels != C or unet.config.out_channels != C:
        problems.append(
            f"unet in/out_channels are {unet.config.in_channels}/{unet.config.out_channels}; "
            f"expected the VAE's latent_channels ({C})"
        )
    if controlnet.config.in_channels != unet.config.in_channels:
        problems.append(
            f"controlnet in_channels is {controlnet.config.in_channels}; expected the UNet's ({unet.config.in_channels})"
        )
    if controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
        problems.append(
            f"controlnet cross_attention_dim is {controlnet.config.cross_attention_dim}; "
            f"expected the UNet's ({unet.config.cross_attention_dim})"
        )
    if list(controlnet.config.block_out_channels) != list(unet.config.block_out_channels):
        problems.append(
            f"controlnet block_out_channels are {list(controlnet.config.block_out_channels)}; "
            f"expected the UNet's ({list(unet.config.block_out_channels)}): residuals are added block by block"
        )
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    cn_scale = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    if cn_scale != vae_scale:
        problems.append(
            f"controlnet conditioning_embedding_out_channels downscale the control image {cn_scale}×; "
            f"expected the VAE's downscale ({vae_scale}×)"
        )
    if (
        prompt_embeds.dim() != 3
        or prompt_embeds.shape[0] != 1
        or prompt_embeds.shape[2] != unet.config.cross_attention_dim
    ):
        problems.append(
            f"prompt embedding has shape {list(prompt_embeds.shape)}; expected [1, L, {unet.config.cross_attention_dim}] "
            "(the UNet's cross_attention_dim)"
        )
    if not isinstance(scheduler, DDIMScheduler):
        problems.append(f"scheduler is a {type(scheduler).__name__}; expected a DDIMScheduler")
    if problems:
        raise PolicyLoadError(f"{where}: " + "; ".join(problems))


# ------------------------------------------------------------------------------------- builders
def build_policy(
    model_cfg: ModelConfig, resolution: int, *, dtype: DType | None = None
) -> ControlNetPolicy:
    """Build the policy described by ``model_cfg`` (the only place that reads the config).

    ``dtype`` overrides ``model_cfg.dtype`` (e.g. the learner may keep the frozen parts in float32).
    """
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
    """A trained tiny VAE (a diffusers folder, e.g. from :mod:`common.tiny_pretrain`), checked
    against the tiny shape it must replace."""
    from diffusers import AutoencoderKL

    path = Path(vae_dir)
    variant = _require_model_folder(path, "tiny VAE", weights_stem="diffusion_pytorch_model")
    vae = _from_pretrained(AutoencoderKL, path, "tiny VAE", variant)
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
    pre-trains it with :mod:`common.tiny_pretrain`): a random VAE does not reconstruct images, so
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
            unet, conditioning_embedding_out_channels=_cond_embedding_channels(vae_scale)
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
    controlnet = _apply_init_checkpoint(unet, controlnet, init_checkpoint)
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


# --------------------------------------------------------------------------- pretrained loading
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _weights_variant(folder: Path, stem: str) -> str | None:
    """None when ``stem`` weights exist; a variant name ('fp16') when only that variant exists."""
    if any((folder / f"{stem}{suf}").is_file() for suf in _WEIGHT_SUFFIXES):
        return None
    for variant in ("fp16", "bf16"):
        if any((folder / f"{stem}.{variant}{suf}").is_file() for suf in _WEIGHT_SUFFIXES):
            return variant
    raise PolicyLoadError(f"{folder}: no weights file (expected {stem}.safetensors or {stem}.bin)")


def _require_model_folder(
    folder: Path, what: str, *, weights_stem: str, config: str = "config.json"
) -> str | None:
    if not folder.is_dir():
        raise PolicyLoadError(f"{folder}: missing folder (expected the {what})")
    if not (folder / config).is_file():
        raise PolicyLoadError(f"{folder / config}: missing file (expected the {what} config)")
    return _weights_variant(folder, weights_stem)


def _from_pretrained(cls: Any, folder: Path, what: str, variant: str | None, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, variant=variant, **kwargs)
    except Exception as err:
        raise PolicyLoadError(
            f"{folder}: could not load the {what} as {cls.__name__} ({err})"
        ) from err


def _load_prompt_embeds(root: Path, prompt: str) -> torch.Tensor:
    """Prompt embedding from text_encoder/ + tokenizer/ (freed afterwards), else prompt_embeds.safetensors."""
    te_dir, tok_dir, saved = root / "text_encoder", root / "tokenizer", root / PROMPT_EMBEDS_FILE
    if te_dir.is_dir() or tok_dir.is_dir():
        from transformers import AutoTokenizer, CLIPTextModel

        variant = _require_model_folder(te_dir, "CLIP text encoder", weights_stem="model")
        if not tok_dir.is_dir():
            raise PolicyLoadError(f"{tok_dir}: missing folder (expected the tokenizer of {te_dir})")
        if not ((tok_dir / "tokenizer.json").is_file() or (tok_dir / "vocab.json").is_file()):
            raise PolicyLoadError(
                f"{tok_dir}: missing tokenizer files (expected tokenizer.json or vocab.json + merges.txt)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as err:
            raise PolicyLoadError(f"{tok_dir}: could not load the tokenizer ({err})") from err
        text_encoder = _from_pretrained(CLIPTextModel, te_dir, "text encoder", variant).eval()
        embeds = encode_prompt(text_encoder, tokenizer, prompt)
        del text_encoder, tokenizer  # only the embedding is kept
        return embeds
    if saved.is_file():
        from safetensors import safe_open

        with safe_open(str(saved), framework="pt") as f:
            if "prompt_embeds" not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                raise PolicyLoadError(f"{saved}: expected a tensor named 'prompt_embeds'")
            return f.get_tensor("prompt_embeds").float()
    raise PolicyLoadError(
        f"{root}: no text_encoder/ + tokenizer/ and no {PROMPT_EMBEDS_FILE} (expected one of them for the prompt embedding)"
    )


def load_pretrained_policy(
    pretrained_dir: str | Path,
    *,
    controlnet_dir: str | Path | None = None,
    prompt: str = "a high quality, sharp, well exposed photo",
    prediction_type: str | None = None,
    finetune: Finetune = "lora",
    lora_rank: int = 4,
    lora_alpha: float = 4.0,
    lora_target_modules: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
    init_checkpoint: str | Path | None = None,
    dtype: DType = "float32",
    seed: int = 0,
) -> ControlNetPolicy:
    """Load a local SD-2.1/PASD-style folder; never downloads (``local_files_only=True``).

    Layout: ``unet/``, ``vae/``, ``scheduler/`` (scheduler_config.json, read into a DDIMScheduler),
    ``text_encoder/`` + ``tokenizer/`` (the prompt is embedded once, then the encoder is freed) or
    ``prompt_embeds.safetensors``, and optionally ``controlnet/``. ``controlnet_dir`` overrides
    ``<dir>/controlnet``; with neither, the ControlNet is copied from the UNet
    (``ControlNetModel.from_unet``; its conditioning embedding is initialised with ``seed``).
    ``prediction_type``, when given, must agree with the scheduler config.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel

    root = Path(pretrained_dir)
    if not root.is_dir():
        raise PolicyLoadError(
            f"{root}: pretrained_dir is not a folder (expected unet/, vae/, scheduler/, ...)"
        )
    sched_dir = root / "scheduler"
    if not (sched_dir / "scheduler_config.json").is_file():
        raise PolicyLoadError(
            f"{sched_dir / 'scheduler_config.json'}: missing file (expected the scheduler config)"
        )
    try:
        scheduler = DDIMScheduler.from_config(
            DDIMScheduler.load_config(str(sched_dir), local_files_only=True)
        )
    except Exception as err:
        raise PolicyLoadError(
            f"{sched_dir}: could not read a DDIM scheduler config ({err})"
        ) from err
    if prediction_type is not None and scheduler.config.prediction_type != prediction_type:
        raise PolicyLoadError(
            f"{sched_dir / 'scheduler_config.json'}: prediction_type is {scheduler.config.prediction_type!r}; "
            f"the model config expects {prediction_type!r}"
        )
    unet_dir, vae_dir = root / "unet", root / "vae"
    unet_variant = _require_model_folder(unet_dir, "UNet", weights_stem="diffusion_pytorch_model")
    vae_variant = _require_model_folder(vae_dir, "VAE", weights_stem="diffusion_pytorch_model")
    cn_dir = Path(controlnet_dir) if controlnet_dir is not None else root / "controlnet"
    if controlnet_dir is not None and not cn_dir.is_dir():
        raise PolicyLoadError(
            f"{cn_dir}: controlnet_dir is not a folder (expected a diffusers ControlNet)"
        )
    cn_variant = (
        _require_model_folder(cn_dir, "ControlNet", weights_stem="diffusion_pytorch_model")
        if cn_dir.is_dir()
        else None
    )

    prompt_embeds = _load_prompt_embeds(root, prompt)
    frozen = _torch_dtype(
        dtype
    )  # loading in the target dtype keeps diffusers' fp32-only modules in fp32
    unet = _from_pretrained(
        UNet2DConditionModel, unet_dir, "UNet", unet_variant, torch_dtype=frozen
    )
    vae = _from_pretrained(AutoencoderKL, vae_dir, "VAE", vae_variant, torch_dtype=frozen)
    if cn_dir.is_dir():
        controlnet = _from_pretrained(
            ControlNetModel, cn_dir, "ControlNet", cn_variant, torch_dtype=torch.float32
        )
    else:
        logger.warning(
            "%s: no controlnet/ folder: ControlNet copied from the UNet (seed %d)", root, seed
        )
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=_cond_embedding_channels(vae_scale)
            )
    _check_components(
        unet, controlnet, vae, scheduler, prompt_embeds, where=f"{root} (controlnet: {cn_dir})"
    )
    controlnet = _apply_init_checkpoint(unet, controlnet, init_checkpoint)
    return ControlNetPolicy(
        unet,
        controlnet,
        vae,
        scheduler,
        prompt_embeds,
        finetune=finetune,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_target_modules=lora_target_modules,
        dtype=dtype,
        seed=seed,
    )
