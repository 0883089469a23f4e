"""Atomic, self-checking learner checkpoints (DESIGN.md §6).

Layout of ``<run_dir>/checkpoints/ckpt-<iteration:06d>/``::

    trainable/          the trainable weights, loadable without this project:
                        LoRA → peft adapter (adapter_config.json + adapter_model.safetensors):
                          PeftModel.from_pretrained(ControlNetModel.from_pretrained(base), "trainable")
                        full ControlNet → diffusers folder: ControlNetModel.from_pretrained("trainable")
    optimizer.pt        AdamW state_dict (torch.load(weights_only=True) reads it)
    rng.pt              RNG states: torch CPU (+ CUDA), numpy, python, the learner's generators
    state.json          iteration, policy version, reward-tracker history, trainable names, extra
    config.yaml         config snapshot of the run
    MANIFEST.json       written LAST: size and sha256 of every file above

Atomicity: everything is written into a hidden temp folder ``.tmp-ckpt-...`` in the same
parent, fsynced, the manifest written and fsynced last, then the folder is renamed into place
(``os.replace``: atomic on POSIX) and the parent fsynced. A crash at any point leaves either no
``ckpt-*`` folder or a complete one; a ``ckpt-*`` folder without ``MANIFEST.json`` (e.g. copied by
hand) is never picked by :func:`latest_checkpoint`, and :func:`load_checkpoint` refuses it with
a clear error. Leftover temp folders are removed by the next save's pruning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "newest_valid_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
]

log = logging.getLogger("restore_rl.checkpoint")

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "MANIFEST.json"
TRAINABLE_DIR = "trainable"
_FORMAT = "restore_rl.learner_checkpoint"
_FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{6,})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and what is wrong."""


def checkpoint_name(iteration: int) -> str:
    if iteration < 0:
        raise ValueError(f"iteration: expected >= 0, got {iteration}")
    return f"ckpt-{iteration:06d}"


# ------------------------------------------------------------------------------- RNG states
def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step may touch, in a ``torch.load(weights_only=True)``-safe form."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"rng state: no saved state for generator {name!r} (saved: {sorted(saved)})")
        g.set_state(saved[name])


# ------------------------------------------------------------------------------- file helpers
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _write_manifest(folder: Path) -> None:
    """The completion marker: size + sha256 of every other file, written and fsynced last."""
    entries = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
        if p.name != MANIFEST
    }
    manifest = {"format": _FORMAT, "version": _FORMAT_VERSION, "files": entries}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _verify(folder: Path, checksums: bool) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: incomplete checkpoint (no {MANIFEST}; the save was interrupted before it finished)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != _FORMAT or manifest.get("version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: expected format {_FORMAT!r} version {_FORMAT_VERSION}, "
            f"got {manifest.get('format')!r} version {manifest.get('version')!r}"
        )
    for rel, info in manifest["files"].items():
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{folder}: {rel} is listed in {MANIFEST} but missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{folder}: {rel} has {f.stat().st_size} bytes; {MANIFEST} says {info['bytes']}")
        if checksums and _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{folder}: {rel} does not match its sha256 in {MANIFEST} (corrupted)")
    return manifest


# ------------------------------------------------------------------------------- save / load
def save_checkpoint(
    run_dir: str | Path,
    iteration: int,
    *,
    policy: Any,
    optimizer: torch.optim.Optimizer,
    tracker_state: dict[str, Any],
    rng_state: dict[str, Any],
    policy_version: int,
    config_yaml: str | None = None,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoints/ckpt-<iteration>`` atomically; keep the newest ``keep``.

    ``policy`` needs ``save_trainable(dir)`` and ``trainable_state_dict``; ``extra`` must be
    JSON-serialisable (e.g. the driver's data order or counters). Re-saving an existing
    iteration replaces it (the old folder is renamed aside first, then deleted).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(iteration)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-", dir=root))
    try:
        policy.save_trainable(tmp / TRAINABLE_DIR)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state, tmp / "rng.pt")
        state = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "iteration": int(iteration),
            "policy_version": int(policy_version),
            "trainable_names": list(policy.trainable_state_dict(clone=False)),
            "tracker": tracker_state,
            "extra": extra or {},
            "saved_at": time.time(),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        for f in _files(tmp):
            _fsync_file(f)
        for d in sorted({f.parent for f in _files(tmp)}, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(d)
        _write_manifest(tmp)  # the completion marker, last
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = root / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


@dataclass
class Checkpoint:
    """A verified checkpoint, read into memory (the trainable weights stay on disk: ``trainable``)."""

    path: Path
    iteration: int
    policy_version: int
    trainable: Path
    optimizer_state: dict[str, Any]
    rng_state: dict[str, Any]
    tracker_state: dict[str, Any]
    trainable_names: list[str]
    extra: dict[str, Any]
    config_yaml: str | None


def load_checkpoint(path: str | Path, *, verify_checksums: bool = True) -> Checkpoint:
    """Read a complete checkpoint; :class:`CheckpointError` if it is incomplete or corrupted."""
    folder = Path(path)
    _verify(folder, verify_checksums)
    state = json.loads((folder / "state.json").read_text())
    if state.get("format") != _FORMAT:
        raise CheckpointError(f"{folder / 'state.json'}: expected format {_FORMAT!r}")
    config = folder / "config.yaml"
    return Checkpoint(
        path=folder,
        iteration=int(state["iteration"]),
        policy_version=int(state["policy_version"]),
        trainable=folder / TRAINABLE_DIR,
        optimizer_state=torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
        rng_state=torch.load(folder / "rng.pt", map_location="cpu", weights_only=True),
        tracker_state=state["tracker"],
        trainable_names=list(state["trainable_names"]),
        extra=dict(state.get("extra") or {}),
        config_yaml=config.read_text() if config.is_file() else None,
    )


# ------------------------------------------------------------------------------- discovery
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``ckpt-*`` with a manifest) of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest iteration, or None. Incomplete ones are ignored."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and leftover temp folders."""
    if keep < 1:
        raise ValueError(f"keep: expected >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    removed = list_checkpoints(run_dir)[:-keep]
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX) and p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def newest_valid_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose manifest and checksums verify, and the newer ones that did
    not, each with the reason: ``(path or None, [(bad path, reason), ...])``. A truncated file or
    a flipped bit costs the iterations since the previous checkpoint, not the run."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            _verify(path, checksums=True)
        except CheckpointError as err:
            bad.append((path, str(err)))
            continue
        return path, bad
    return None, bad


def resolve_resume(run_dir: str | Path, resume: str | Path | None) -> Path | None:
    """``None``/"none" → start fresh; "latest" → the newest checkpoint that verifies (checksums
    included; None if the run has none; a CheckpointError naming every bad one if it has
    checkpoints but none verifies, since starting fresh would silently discard the run); a
    path → that checkpoint (it must verify)."""
    if resume is None or str(resume) == "none":
        return None
    if str(resume) == "latest":
        path, bad = newest_valid_checkpoint(run_dir)
        for b, why in bad:
            log.warning("resume: skipping checkpoint %s: %s", b.name, why)
        if path is None and bad:
            raise CheckpointError(
                "resume: no checkpoint of " + str(run_dir) + " verifies: " + "; ".join(why for _, why in bad)
            )
        return path
    path = Path(resume)
    _verify(path, checksums=True)
    return path
