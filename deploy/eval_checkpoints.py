"""Which weights an evaluation restores with: ``--checkpoint`` resolved, verified and loaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.eval_results import CheckpointInfo, EvaluationError

if TYPE_CHECKING:
    import torch

    from common.config import ExperimentConfig

__all__ = ["load_eval_policy", "resolve_checkpoint"]

log = logging.getLogger("restore_rl.evaluate")

# ----------------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(checkpoint: str | Path | None) -> CheckpointInfo:
    """``base`` (or None), a run folder, a ckpt-* folder or a trainable-weights folder -> info.

    Run checkpoints are verified (sizes and sha256 of every file) before anything is read.
    """
    from learner.checkpoint import MANIFEST, TRAINABLE_DIR, latest_checkpoint, load_checkpoint

    if checkpoint is None or str(checkpoint) == "base":
        return CheckpointInfo(kind="base")
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise EvaluationError(
            f"--checkpoint {path}: not a folder (expected 'base', a run folder, a checkpoints/ckpt-* "
            "folder or a trainable-weights folder)"
        )
    if (path / "checkpoints").is_dir() and not (path / MANIFEST).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise EvaluationError(
                f"--checkpoint {path}: a run folder without a complete checkpoint"
            )
        path = latest
    if path.name == TRAINABLE_DIR and (path.parent / MANIFEST).is_file():
        path = path.parent  # the trainable/ folder of a run checkpoint: verify the whole checkpoint
    if (path / MANIFEST).is_file():
        ckpt = load_checkpoint(path, verify_checksums=True)
        return CheckpointInfo(
            kind="run_checkpoint",
            path=str(path.resolve()),
            trainable=str(ckpt.trainable.resolve()),
            iteration=ckpt.iteration,
            policy_version=ckpt.policy_version,
            config_yaml=ckpt.config_yaml,
        )
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return CheckpointInfo(
            kind="trainable", path=str(path.resolve()), trainable=str(path.resolve())
        )
    raise EvaluationError(
        f"--checkpoint {path}: not a checkpoint (expected {MANIFEST} of a run checkpoint, "
        "adapter_config.json of a LoRA adapter or config.json of a diffusers ControlNet)"
    )


_PATH_FIELDS = {"pretrained_dir", "controlnet_dir", "init_checkpoint", "vae_dir"}
#: Model fields an evaluation may change without changing the policy's weights.
_FREE_FIELDS = {"dtype"}


def _model_differences(
    saved: dict[str, Any], ours: dict[str, Any], prefix: str = "model"
) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(ours)):
        a, b, name = saved.get(key), ours.get(key), f"{prefix}.{key}"
        if key in _FREE_FIELDS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _model_differences(a, b, name)
            continue
        if key in _PATH_FIELDS and a is not None and b is not None:
            a, b = os.path.abspath(a), os.path.abspath(b)
        if a != b:
            out.append(f"{name}: checkpoint {a!r}, --config {b!r}")
    return out


def _check_model_matches(cfg: ExperimentConfig, info: CheckpointInfo) -> None:
    """A LoRA adapter loads onto any base of the same shapes: a different base (another tiny seed,
    another init_checkpoint) would give wrong numbers silently, so the model sections must agree."""
    if not info.config_yaml:
        return
    import yaml

    from common.config import ModelConfig

    try:
        section = (yaml.safe_load(info.config_yaml) or {}).get("model")
        if section is None:
            raise ValueError("no model section")
        saved = ModelConfig.model_validate(section)
    except (yaml.YAMLError, AttributeError, ValueError) as err:  # ValidationError is one
        log.warning("%s/config.yaml: model section not checked (%s)", info.path, err)
        return
    diff = _model_differences(saved.model_dump(mode="json"), cfg.model.model_dump(mode="json"))
    if diff:
        raise EvaluationError(
            f"--checkpoint {info.path}: its run used another model than --config "
            f"({'; '.join(diff)}); evaluate with the run's config ({info.path}/config.yaml)"
        )


def load_eval_policy(
    cfg: ExperimentConfig, info: CheckpointInfo, device: str | torch.device = "cpu"
):
    """The policy of ``info`` on ``device``, in eval mode (base: as built from ``cfg.model``)."""
    from common.policy import build_policy

    _check_model_matches(cfg, info)
    policy = build_policy(cfg.model, cfg.data.resolution)
    if info.trainable is not None:
        policy.load_trainable(info.trainable)
    return policy.to(device).eval()


