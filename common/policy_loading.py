"""Loading policies and trainable weights from local folders; nothing is ever downloaded.

:func:`load_pretrained_policy` reads a local SD-2.1/PASD-style folder into a
:class:`common.controlnet_policy.ControlNetPolicy`; :func:`apply_init_checkpoint` folds the
trainable weights a run starts from (a peft LoRA adapter, a diffusers ControlNet folder, or
``unet/`` + ``controlnet/``) into the parts before the policy is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.controlnet_policy import (
    LORA_CONFIG_FILE,
    ControlNetPolicy,
    check_components,
    cond_embedding_channels,
    is_full_dir,
    is_lora_dir,
    load_controlnet_weights,
    load_full_weights,
)
from common.model_folders import from_pretrained_local, require_model_folder
from common.policy import (
    DEFAULT_LORA_TARGETS,
    PROMPT_EMBEDS_FILE,
    DType,
    Finetune,
    PolicyLoadError,
    encode_prompt,
    torch_dtype,
)

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

__all__ = ["apply_init_checkpoint", "load_pretrained_policy"]

logger = logging.getLogger(__name__)


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


def apply_init_checkpoint(
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
    if is_lora_dir(path):
        return _merge_lora_checkpoint(controlnet, path)
    if (path / "config.json").is_file():
        load_controlnet_weights(controlnet, path)
        return controlnet
    if is_full_dir(path):
        load_full_weights(unet, controlnet, path)
        return controlnet
    raise PolicyLoadError(
        f"init_checkpoint {path}: expected {LORA_CONFIG_FILE} (a peft LoRA adapter), config.json + "
        "diffusion_pytorch_model.safetensors (a diffusers ControlNet) or unet/ + controlnet/ "
        "(diffusers folders of a finetune=full checkpoint)"
    )


# --------------------------------------------------------------------------- pretrained loading
def _load_prompt_embeds(root: Path, prompt: str) -> torch.Tensor:
    """Prompt embedding from text_encoder/ + tokenizer/ (freed afterwards), else prompt_embeds.safetensors."""
    te_dir, tok_dir, saved = root / "text_encoder", root / "tokenizer", root / PROMPT_EMBEDS_FILE
    if te_dir.is_dir() or tok_dir.is_dir():
        from transformers import AutoTokenizer, CLIPTextModel

        variant = require_model_folder(te_dir, "CLIP text encoder", weights_stem="model")
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
        text_encoder = from_pretrained_local(CLIPTextModel, te_dir, "text encoder", variant).eval()
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
    unet_variant = require_model_folder(unet_dir, "UNet", weights_stem="diffusion_pytorch_model")
    vae_variant = require_model_folder(vae_dir, "VAE", weights_stem="diffusion_pytorch_model")
    cn_dir = Path(controlnet_dir) if controlnet_dir is not None else root / "controlnet"
    if controlnet_dir is not None and not cn_dir.is_dir():
        raise PolicyLoadError(
            f"{cn_dir}: controlnet_dir is not a folder (expected a diffusers ControlNet)"
        )
    cn_variant = (
        require_model_folder(cn_dir, "ControlNet", weights_stem="diffusion_pytorch_model")
        if cn_dir.is_dir()
        else None
    )

    prompt_embeds = _load_prompt_embeds(root, prompt)
    frozen = torch_dtype(
        dtype
    )  # loading in the target dtype keeps diffusers' fp32-only modules in fp32
    unet = from_pretrained_local(
        UNet2DConditionModel, unet_dir, "UNet", unet_variant, torch_dtype=frozen
    )
    vae = from_pretrained_local(AutoencoderKL, vae_dir, "VAE", vae_variant, torch_dtype=frozen)
    if cn_dir.is_dir():
        controlnet = from_pretrained_local(
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
                unet, conditioning_embedding_out_channels=cond_embedding_channels(vae_scale)
            )
    check_components(
        unet, controlnet, vae, scheduler, prompt_embeds, where=f"{root} (controlnet: {cn_dir})"
    )
    controlnet = apply_init_checkpoint(unet, controlnet, init_checkpoint)
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
