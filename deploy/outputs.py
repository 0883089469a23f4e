"""What a run leaves in ``runs/<name>/`` (DESIGN.md §6): config snapshot, metrics.jsonl,
reward-curve PNG, before/after sample grids (LQ | output | GT)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["RunDir", "sample_grid", "plot_curves", "read_metrics"]


class RunDir:
    """Paths and writers of one run folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"

    def write_config(self, yaml_text: str) -> Path:
        p = self.root / "config.yaml"
        p.write_text(yaml_text)
        return p

    def append_metrics(self, record: dict[str, Any]) -> None:
        # One JSON object per line, flushed and fsynced: a killed driver loses at most a line.
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def reconcile_metrics(self, iteration: int, checkpoint_record: dict[str, Any] | None = None) -> list[int]:
        """Make metrics.jsonl hold each iteration 0..``iteration`` at most once, in order, and
        nothing later: the state of a run resumed from the checkpoint of ``iteration``.

        Records after the checkpoint are dropped (those iterations are redone); of repeated
        records of one iteration the last is kept; the checkpoint's own record
        (``checkpoint_record``, saved inside the checkpoint) is restored when the driver died
        between writing the checkpoint and appending the record. Returns the iterations kept.
        ``iteration = -1``: no checkpoint, an empty file (a fresh start never appends)."""
        records = read_metrics(self.metrics_path) if self.metrics_path.exists() else []
        by_it: dict[int, dict[str, Any]] = {}
        for r in records:
            it = int(r.get("iteration", -1))
            if 0 <= it <= iteration:
                by_it[it] = r
        if checkpoint_record is not None and iteration >= 0 and iteration not in by_it:
            by_it[iteration] = checkpoint_record
        kept = [by_it[k] for k in sorted(by_it)]
        tmp = self.metrics_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)
        return sorted(by_it)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return out


def sample_grid(rows: Iterable[tuple[np.ndarray, ...]], path: Path, pad: int = 2) -> Path:
    """Save a grid, one row per sample, columns e.g. (LQ, output, GT); uint8 [H, W, 3] each."""
    from PIL import Image

    rows = [tuple(np.asarray(c, dtype=np.uint8) for c in r) for r in rows]
    if not rows:
        raise ValueError("sample_grid: no rows")
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img[:h, :w]
    path = Path(path)
    Image.fromarray(canvas).save(path)
    return path


def plot_curves(records: list[dict[str, Any]], keys: list[str], path: Path, title: str = "") -> Path:
    """Plot metric ``keys`` against iteration (one panel per key) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(keys)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["iteration"], r[key]) for r in records if key in r and r[key] is not None
               and not (isinstance(r[key], float) and math.isnan(r[key]))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3)
        ax.set_xlabel("iteration")
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
