"""Checks and loads of local diffusers/transformers model folders (nothing is ever downloaded).

Every loader of the policy goes through these, so a missing folder, config or weights file is one
:class:`common.policy.PolicyLoadError` naming the path and what was expected there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.policy import PolicyLoadError

__all__ = ["from_pretrained_local", "require_model_folder"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _weights_variant(folder: Path, stem: str) -> str | None:
    """None when ``stem`` weights exist; a variant name ('fp16') when only that variant exists."""
    if any((folder / f"{stem}{suf}").is_file() for suf in _WEIGHT_SUFFIXES):
        return None
    for variant in ("fp16", "bf16"):
        if any((folder / f"{stem}.{variant}{suf}").is_file() for suf in _WEIGHT_SUFFIXES):
            return variant
    raise PolicyLoadError(f"{folder}: no weights file (expected {stem}.safetensors or {stem}.bin)")


def require_model_folder(
    folder: Path, what: str, *, weights_stem: str, config: str = "config.json"
) -> str | None:
    if not folder.is_dir():
        raise PolicyLoadError(f"{folder}: missing folder (expected the {what})")
    if not (folder / config).is_file():
        raise PolicyLoadError(f"{folder / config}: missing file (expected the {what} config)")
    return _weights_variant(folder, weights_stem)


def from_pretrained_local(cls: Any, folder: Path, what: str, variant: str | None, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, variant=variant, **kwargs)
    except Exception as err:
        raise PolicyLoadError(
            f"{folder}: could not load the {what} as {cls.__name__} ({err})"
        ) from err
