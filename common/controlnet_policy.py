"""The ControlNet policy: a frozen UNet steered by a ControlNet that sees the LQ image (DESIGN.md §2.7).

:class:`ControlNetPolicy` implements :class:`common.policy.Policy`: a frozen
``UNet2DConditionModel`` steered by a ``ControlNetModel`` that sees the LQ image
(``controlnet_cond``), a frozen ``AutoencoderKL``, a ``DDIMScheduler`` and one fixed prompt
embedding computed once. Training adapts LoRA adapters (peft) on chosen ControlNet modules, the
whole ControlNet, or UNet + ControlNet (``full``: SFT pre-training of a model whose UNet is not
yet a restorer, e.g. the tiny demo policy); the reference policy for the KL term (§2.6) is the
same model with the adapters disabled, or a frozen copy of the initial trainable parts.
:func:`check_components` is the compatibility check every builder runs on the parts.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from common.model_folders import require_model_folder
from common.policy import (
    DEFAULT_LORA_TARGETS,
    PROMPT_EMBEDS_FILE,
    DType,
    Finetune,
    PolicyLoadError,
    cast_module,
    dtype_of,
    images_to_tensor,
    torch_dtype,
)
from common.types import ShapeError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel

__all__ = [
    "FULL_PARTS",
    "LORA_CONFIG_FILE",
    "ControlNetPolicy",
    "check_components",
    "cond_embedding_channels",
    "is_full_dir",
    "is_lora_dir",
    "load_controlnet_weights",
    "load_full_weights",
    "load_model_weights",
]

logger = logging.getLogger(__name__)

LORA_CONFIG_FILE = "adapter_config.json"
#: Sub-folders of a ``full`` trainable-weights folder (each a diffusers model folder).
FULL_PARTS = ("unet", "controlnet")
_ADAPTER = "default"  # peft's adapter name


def cond_embedding_channels(vae_scale: int) -> tuple[int, ...]:
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


# ------------------------------------------------------------------- trainable-weights folders
def is_lora_dir(path: Path) -> bool:
    return (path / LORA_CONFIG_FILE).is_file()


def load_model_weights(module: nn.Module, path: Path, what: str) -> None:
    """Copy the weights of a diffusers model folder into ``module`` (same class, same shapes)."""
    require_model_folder(path, what, weights_stem="diffusion_pytorch_model")
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


def load_controlnet_weights(controlnet: ControlNetModel, path: Path) -> None:
    """Copy the weights of a diffusers ControlNet folder into ``controlnet`` (same architecture)."""
    load_model_weights(controlnet, path, "ControlNet")


def is_full_dir(path: Path) -> bool:
    return all((path / part / "config.json").is_file() for part in FULL_PARTS)


def load_full_weights(unet: UNet2DConditionModel, controlnet: ControlNetModel, path: Path) -> None:
    """Load a ``full`` folder (``unet/`` + ``controlnet/``, diffusers) into ``unet`` and ``controlnet``."""
    if not is_full_dir(path):
        raise PolicyLoadError(
            f"{path}: expected unet/ and controlnet/ diffusers folders (a finetune=full checkpoint)"
        )
    load_model_weights(unet, path / "unet", "UNet")
    load_model_weights(controlnet, path / "controlnet", "ControlNet")


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
        check_components(unet, controlnet, vae, scheduler, prompt_embeds, where="ControlNetPolicy")
        if finetune not in ("lora", "controlnet_full", "full"):
            raise ValueError(
                f"finetune: got {finetune!r}; expected 'lora', 'controlnet_full' or 'full'"
            )
        frozen = torch_dtype(dtype)
        self._reference_unet: UNet2DConditionModel | None = None
        if finetune == "full":
            self._reference_unet = cast_module(copy.deepcopy(unet), frozen).eval().requires_grad_(False)
            self.unet = cast_module(unet, torch.float32).eval().requires_grad_(True)
        else:
            self.unet = cast_module(unet, frozen).eval().requires_grad_(False)
        self.vae = cast_module(vae, frozen).eval().requires_grad_(False)
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

        controlnet = cast_module(controlnet, torch.float32).requires_grad_(False)
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
                cast_module(copy.deepcopy(controlnet), frozen).eval().requires_grad_(False)
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
        cn_dtype = dtype_of(cn)
        down, mid = cn(
            sample.to(cn_dtype),
            t,
            encoder_hidden_states=self.prompt_embeds.to(cn_dtype).expand(B, -1, -1),
            controlnet_cond=control.to(cn_dtype),
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        ud = dtype_of(unet)
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
        dist = self.vae.encode(x.to(dtype_of(self.vae))).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> float32 RGB [B, 3, H, W] clamped to [0, 1] (differentiable)."""
        shift = self.vae.config.get("shift_factor") or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        x = self.vae.decode(z.to(dtype_of(self.vae)), return_dict=False)[0]
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

            if not is_lora_dir(directory):
                raise PolicyLoadError(
                    f"{directory}: no {LORA_CONFIG_FILE} (expected a peft LoRA adapter folder)"
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
            load_full_weights(self.unet, self.controlnet, directory)
        else:
            load_controlnet_weights(self.controlnet, directory)

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
def check_components(unet, controlnet, vae, scheduler, prompt_embeds, *, where: str) -> None:
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


