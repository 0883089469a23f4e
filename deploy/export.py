"""Export a run's trained policy as a diffusers pipeline folder (issue 15, item 4).

    python -m deploy.export --run runs/NAME [--checkpoint ckpt-NNNNNN|PATH] --out DIR
        [--config FILE] [--set k=v ...]

The folder is a ``StableDiffusionControlNetPipeline`` (``model_index.json``, ``unet/``,
``controlnet/``, ``vae/``, ``scheduler/``) that diffusers loads alone, without this project::

    pipe = StableDiffusionControlNetPipeline.from_pretrained(DIR, text_encoder=None, tokenizer=None)
    embeds = safetensors.torch.load_file(f"{DIR}/prompt_embeds.safetensors")["prompt_embeds"]
    out = pipe(image=lq, prompt_embeds=embeds, guidance_scale=1.0, eta=0.0,
               num_inference_steps=K, generator=torch.Generator().manual_seed(s), output_type="np")

What the project's policy computes (``common.controlnet_policy.ControlNetPolicy.predict`` + the evaluation
sampler, ``rollout.sampler`` with ``evaluation.policy_target: standard``) and how the export
makes the diffusers pipeline compute the same:

* ControlNet weights: the run's LoRA (peft) is merged into the ControlNet, which already holds the
  merged ``model.init_checkpoint`` (``build_policy``): one plain ``ControlNetModel``, no peft
  needed. ``controlnet_full``/``full`` runs export their trained ControlNet (and UNet).
* Condition: the LQ RGB image in [0, 1] at full resolution as ``controlnet_cond``; the pipeline's
  control image processor (``do_normalize=False``) feeds a PIL/uint8 image exactly so.
* Prompt: one fixed embedding [1, L, D] (a tiny policy has no text encoder; a pretrained one
  embeds ``model.prompt`` once), saved as ``prompt_embeds.safetensors``; pass it as
  ``prompt_embeds``. No classifier-free guidance: ``guidance_scale=1.0`` (diffusers' default 7.5
  would add an unconditional branch the policy never had). Without a text encoder the folder's
  ``model_index.json`` records ``text_encoder``/``tokenizer`` as ``[null, null]``, and diffusers
  (0.42) wants them passed explicitly: ``from_pretrained(DIR, text_encoder=None, tokenizer=None)``.
  A pretrained model's ``text_encoder/`` and ``tokenizer/`` are exported too, so there a plain
  ``from_pretrained(DIR)`` and ``prompt=model.prompt`` also work.
* VAE: the policy decodes ``latents / scaling_factor + shift_factor``; the pipeline ignores
  ``shift_factor``. The export folds the shift into the VAE's 1×1 ``quant_conv`` (mean half of the
  bias: −shift) and ``post_quant_conv`` (bias + W·shift), and writes ``shift_factor: null``: the
  exported VAE encodes and decodes exactly as the project's (the demo's pre-trained tiny VAE has
  shift −0.405).
* Latent init: x_T ~ N(0, I) from the generator, one draw of [1, C, h, w] (the project draws
  [C, h, w] per trajectory from its own generator: the same numbers). ``init_noise_sigma`` = 1.
* Steps: ``DDIMScheduler`` with the policy's config; η = 0 is plain DDIM in both.

What differs: the ``enhanced`` step (``evaluation.policy_target: enhanced``) is not a diffusers
step; an export of such a run still holds the trained weights, the pipeline runs plain DDIM
(recorded in ``restore_rl_export.json``). Weights are exported in float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from common.config import ExperimentConfig
    from common.controlnet_policy import ControlNetPolicy

__all__ = [
    "EXPORT_INFO_FILE",
    "ExportError",
    "ExportResult",
    "export_checkpoint",
    "fold_vae_shift",
    "main",
    "merged_controlnet",
    "resolve_run_checkpoint",
    "usage_markdown",
    "write_pipeline",
]

log = logging.getLogger("restore_rl.export")

#: Provenance written beside model_index.json (diffusers ignores unknown files at the root).
EXPORT_INFO_FILE = "restore_rl_export.json"
EXPORT_FORMAT = "restore_rl.export"
EXPORT_VERSION = 1
PIPELINE_CLASS = "StableDiffusionControlNetPipeline"


class ExportError(ValueError):
    """An export that cannot run as asked; the message names the argument or folder."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        out: the pipeline folder.
        checkpoint: the ckpt-* (or trainable-weights) folder exported.
        iteration, policy_version: from the checkpoint (None for a bare trainable folder).
        finetune: ``lora`` | ``controlnet_full`` | ``full``.
        lora_merged: the LoRA adapter was merged into the exported ControlNet.
        vae_shift_folded: the VAE ``shift_factor`` folded into its 1×1 convs (0.0: none).
        num_inference_steps, eta, policy_target: the run's evaluation sampler.
        diffusers_version: written into model_index.json.
    """

    out: str
    checkpoint: str
    iteration: int | None
    policy_version: int | None
    finetune: str
    lora_merged: bool
    vae_shift_folded: float
    num_inference_steps: int
    eta: float
    policy_target: str
    diffusers_version: str
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ weight helpers
def fold_vae_shift(vae: AutoencoderKL) -> tuple[AutoencoderKL, float]:
    """A copy of ``vae`` whose latent convention has no ``shift_factor``, and the shift folded.

    The project encodes to ``(z − shift)·scale`` and decodes ``D(latents/scale + shift)``
    (``ControlNetPolicy.encode_images`` / ``decode_latents``); diffusers' pipelines use
    ``z·scale`` and ``D(latents/scale)``. With z = mean half of ``quant_conv(h)`` and
    ``D(z) = decoder(post_quant_conv(z))``, both 1×1 convolutions (linear in z):

    * ``quant_conv``: bias[:C] −= shift → the posterior mean is z − shift;
    * ``post_quant_conv``: bias += shift·Σ_in W → post_quant_conv(z') = old post_quant_conv(z' + shift).

    The posterior log-variance (bias[C:]) is unchanged. The result differs from the original
    only by float rounding of the folded biases.
    """
    vae = copy.deepcopy(vae)
    shift = float(vae.config.get("shift_factor") or 0.0)
    if shift == 0.0:
        return vae, 0.0
    quant, post = getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)
    if quant is None or post is None or quant.bias is None or post.bias is None:
        raise ExportError(
            f"VAE shift_factor is {shift}, but the VAE has no quant_conv/post_quant_conv with a bias "
            "to fold it into: diffusers' pipelines ignore shift_factor, so the export would decode "
            "differently from the policy"
        )
    import torch

    channels = vae.config.latent_channels
    with torch.no_grad():
        quant.bias[:channels] -= shift
        post.bias += shift * post.weight.sum(dim=(1, 2, 3))
    vae.register_to_config(shift_factor=None)
    return vae, shift


def merged_controlnet(policy: ControlNetPolicy):
    """The policy's ControlNet as a plain ``ControlNetModel`` (a copy): LoRA merged when present."""
    cn = policy.controlnet
    if hasattr(cn, "merge_and_unload"):  # peft PeftModel (finetune=lora)
        merged = copy.deepcopy(cn).merge_and_unload()
        leftover = [n for n, _ in merged.named_parameters() if "lora_" in n]
        if leftover:  # merge_and_unload must remove every adapter layer
            raise ExportError(f"LoRA merge left adapter weights in the ControlNet: {leftover[:3]}")
        return merged
    return copy.deepcopy(cn)


def _prompt_embeds_file() -> str:
    from common.policy import PROMPT_EMBEDS_FILE

    return PROMPT_EMBEDS_FILE


def _text_components(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """The pretrained folder's text encoder + tokenizer (to export them too), else (None, None)."""
    if cfg.model.kind != "pretrained" or cfg.model.pretrained_dir is None:
        return None, None
    root = Path(cfg.model.pretrained_dir)
    te, tok = root / "text_encoder", root / "tokenizer"
    if not (te.is_dir() and tok.is_dir()):
        return None, None
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        return (
            CLIPTextModel.from_pretrained(str(te), local_files_only=True),
            AutoTokenizer.from_pretrained(str(tok), local_files_only=True),
        )
    except Exception as err:
        raise ExportError(f"{root}: could not load text_encoder/ + tokenizer/ to export ({err})") from err


def write_pipeline(
    policy: ControlNetPolicy, out: str | Path, *, text_encoder: Any = None, tokenizer: Any = None
) -> dict[str, Any]:
    """Write ``policy`` as a ``StableDiffusionControlNetPipeline`` folder (float32); returns facts.

    diffusers writes ``model_index.json`` itself (``save_pretrained``), with its version; the
    components the policy does not have (safety checker, feature extractor, image encoder, and the
    text encoder of a tiny policy) are recorded as ``[null, null]`` and load as None.
    """
    import torch
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    out = Path(out)
    vae, shift = fold_vae_shift(policy.vae)
    controlnet = merged_controlnet(policy)
    pipe = StableDiffusionControlNetPipeline(
        vae=vae.float(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=copy.deepcopy(policy.unet).float(),
        controlnet=controlnet.float(),
        scheduler=copy.deepcopy(policy.scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    # diffusers logs "self.text_encoder=None ... cannot be saved" for every absent component:
    # expected here (they are recorded as [null, null]), so only errors are shown while saving.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.save_pretrained(str(out), safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    save_file(
        {"prompt_embeds": policy.prompt_embeds.detach().to("cpu", torch.float32).contiguous()},
        str(out / _prompt_embeds_file()),
    )
    return {
        "lora_merged": hasattr(policy.controlnet, "merge_and_unload"),
        "vae_shift_folded": shift,
        "text_encoder": text_encoder is not None,
    }


# ------------------------------------------------------------------------------- resolution
def resolve_run_checkpoint(run: str | Path, checkpoint: str | Path | None = None):
    """The verified checkpoint of ``run`` to export -> ``deploy.eval_results.CheckpointInfo``.

    ``checkpoint``: None (the run's latest complete checkpoint), a ``ckpt-NNNNNN`` name under
    ``<run>/checkpoints``, or a path (a ckpt-* folder, or a trainable-weights folder). The
    checkpoint is verified (sizes + sha256) by ``deploy.eval_checkpoints.resolve_checkpoint``.
    """
    from deploy.eval_checkpoints import resolve_checkpoint
    from deploy.eval_results import EvaluationError
    from learner.checkpoint import CHECKPOINTS_DIR, CheckpointError, latest_checkpoint

    run = Path(run).expanduser()
    if not run.is_dir():
        raise ExportError(f"--run {run}: not a folder (expected a run folder such as runs/NAME)")
    if checkpoint is None:
        target = latest_checkpoint(run)
        if target is None:
            raise ExportError(
                f"--run {run}: no complete checkpoint under {run / CHECKPOINTS_DIR} "
                "(expected ckpt-NNNNNN folders with a MANIFEST.json; has the run saved one yet?)"
            )
    else:
        named = run / CHECKPOINTS_DIR / str(checkpoint)
        target = named if named.is_dir() else Path(checkpoint).expanduser()
        if not target.is_dir():
            raise ExportError(
                f"--checkpoint {checkpoint}: neither {named} nor {target} is a folder"
            )
    try:
        info = resolve_checkpoint(target)
    except (CheckpointError, EvaluationError) as err:
        raise ExportError(f"checkpoint {target}: cannot be exported: {err}") from err
    if info.kind == "base":  # pragma: no cover - resolve_checkpoint never returns base for a path
        raise ExportError(f"checkpoint {target}: expected a trained checkpoint")
    return info


def _run_config(
    info, config: str | Path | None, overrides: list[str] | None
) -> ExperimentConfig:
    """``--config`` if given, else the checkpoint's config snapshot; ``--set`` overrides on top."""
    import yaml

    from common.config import apply_overrides, load_config, parse_config

    if config is not None:
        return load_config(config, overrides)
    if not info.config_yaml:
        raise ExportError(
            f"checkpoint {info.path}: no config.yaml snapshot; pass --config (the run's experiment YAML)"
        )
    data = yaml.safe_load(info.config_yaml) or {}
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_config(data, source=f"{info.path}/config.yaml")


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(
            f"--out {out}: exists and is not empty (refusing to overwrite; pass a new or empty folder)"
        )


# ---------------------------------------------------------------------------------- export
def export_checkpoint(
    run: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
) -> ExportResult:
    """Export a run's checkpoint (default: its latest) as a diffusers pipeline folder ``out``.

    The folder is written next to ``out`` under a temporary name and renamed into place when
    complete, so a failed export leaves no half-written ``out``.
    """

    from deploy.eval_checkpoints import load_eval_policy
    from deploy.evaluate import eval_sampler

    out = Path(out).expanduser()
    _prepare_out(out)
    info = resolve_run_checkpoint(run, checkpoint)
    cfg = _run_config(info, config, overrides)
    # Float32 weights: model.dtype is the rollout's precision of the frozen parts, not the model's
    # (evaluate's model check ignores dtype, so the run's checkpoint still has to match cfg.model).
    cfg32 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32"})})
    policy = load_eval_policy(cfg32, info, "cpu")
    sampler = eval_sampler(cfg)
    notes = []
    if sampler.policy_target != "standard":
        notes.append(
            f"evaluation.policy_target is {sampler.policy_target!r}: the diffusers pipeline runs the "
            "plain DDIM step (the exported weights are the run's; the enhanced step is not a diffusers step)"
        )
        log.warning("%s", notes[-1])
    text_encoder, tokenizer = _text_components(cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out.name}-", dir=out.parent))
    try:
        facts = write_pipeline(policy, tmp, text_encoder=text_encoder, tokenizer=tokenizer)
        index = json.loads((tmp / "model_index.json").read_text())
        result = ExportResult(
            out=str(out),
            checkpoint=str(info.path),
            iteration=info.iteration,
            policy_version=info.policy_version,
            finetune=cfg.model.finetune,
            lora_merged=bool(facts["lora_merged"]),
            vae_shift_folded=float(facts["vae_shift_folded"]),
            num_inference_steps=sampler.num_inference_steps,
            eta=float(sampler.eta),
            policy_target=sampler.policy_target,
            diffusers_version=str(index.get("_diffusers_version")),
            notes=notes,
        )
        record = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "pipeline_class": PIPELINE_CLASS,
            "created_at": time.time(),
            "versions": _versions(),
            "source": {
                "run": str(Path(run).expanduser().resolve()),
                "checkpoint": info.path,
                "kind": info.kind,
                "iteration": info.iteration,
                "policy_version": info.policy_version,
            },
            "model": {
                "kind": cfg.model.kind,
                "finetune": cfg.model.finetune,
                "lora": (
                    {"merged": result.lora_merged, "rank": cfg.model.lora_rank,
                     "alpha": cfg.model.lora_alpha, "target_modules": list(cfg.model.lora_target_modules)}
                    if cfg.model.finetune == "lora" else None
                ),
                "init_checkpoint": None if cfg.model.init_checkpoint is None else os.path.abspath(cfg.model.init_checkpoint),
                "init_checkpoint_merged": cfg.model.init_checkpoint is not None,
                "vae_shift_folded": result.vae_shift_folded,
                "dtype": "float32",
                "prompt": cfg.model.prompt,
                "prompt_embeds_file": _prompt_embeds_file(),
                "text_encoder_exported": bool(facts["text_encoder"]),
            },
            "sampler": {
                "num_inference_steps": result.num_inference_steps,
                "eta": result.eta,
                "policy_target": result.policy_target,
                "guidance_scale": 1.0,
                "resolution": cfg.data.resolution,
                "deterministic_match": "eta = 0 (plain DDIM): the pipeline restores as the project does",
            },
            "notes": notes,
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(usage_markdown(result, text_encoder=bool(facts["text_encoder"])))
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def usage_markdown(result: ExportResult, *, text_encoder: bool) -> str:
    """The export folder's README: how to restore an image with diffusers alone."""
    load = "from_pretrained(d)" if text_encoder else "from_pretrained(d, text_encoder=None, tokenizer=None)"
    lines = [
        f"# restore-rl export ({PIPELINE_CLASS})",
        "",
        (f"Checkpoint `{result.checkpoint}` (iteration {result.iteration}, finetune {result.finetune}, "
        f"LoRA merged: {result.lora_merged}), written with diffusers {result.diffusers_version}."),
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionControlNetPipeline",
        "from PIL import Image",
        "from safetensors.torch import load_file",
        "",
        'd = "."  # this folder',
        f"pipe = StableDiffusionControlNetPipeline.{load}",
        f'embeds = load_file(f"{{d}}/{_prompt_embeds_file()}")["prompt_embeds"]',
        'lq = Image.open("lq.png").convert("RGB")  # the degraded image, e.g. at the run data.resolution',
        "out = pipe(image=lq, prompt_embeds=embeds, guidance_scale=1.0, eta=0.0,",
        f"           num_inference_steps={result.num_inference_steps}, generator=torch.Generator().manual_seed(0)).images[0]",
        "```",
        "",
        ("`guidance_scale=1.0`: the policy has no classifier-free guidance. At eta = 0 this is the "
        "project's own deterministic restoration (plain DDIM) to float32 rounding. "
        f"The run evaluates with eta = {result.eta}, policy_target {result.policy_target!r}. "
        f"Provenance: `{EXPORT_INFO_FILE}`."),
    ]
    lines += [f"\nNote: {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import diffusers
    import torch

    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    for name in ("peft", "transformers", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover - all are requirements
            pass
    return versions


# ------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from common.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="python -m deploy.export",
        description="Write a run's trained policy as a diffusers StableDiffusionControlNetPipeline "
        "folder (LoRA merged, model_index.json), loadable with diffusers alone.",
    )
    parser.add_argument("--run", required=True, type=Path, help="the run folder (e.g. runs/demo)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="ckpt-NNNNNN under <run>/checkpoints, or a path (default: the run's latest checkpoint)",
    )
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) output folder")
    parser.add_argument(
        "--config", type=Path, default=None, help="experiment YAML (default: the checkpoint's config.yaml)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.tiny.vae_dir=PATH (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = export_checkpoint(
            args.run, args.out, checkpoint=args.checkpoint, config=args.config, overrides=args.overrides
        )
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from common.policy import PolicyLoadError
        from deploy.eval_results import EvaluationError

        if isinstance(err, (PolicyLoadError, EvaluationError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    print(json.dumps(asdict(result), indent=1))
    print(
        f"exported {result.checkpoint} -> {result.out} ({PIPELINE_CLASS}, diffusers "
        f"{result.diffusers_version}); run it with prompt_embeds from {_prompt_embeds_file()}, "
        f"guidance_scale=1.0, num_inference_steps={result.num_inference_steps}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
