"""The results schema of an evaluation: what ``results.json`` holds (pydantic, validated on read)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
    "CheckpointInfo",
    "EvalResult",
    "EvaluationError",
    "ImageRecord",
    "MetricRow",
    "ReferenceRecord",
    "Stat",
    "read_results",
]

RESULTS_FORMAT = "restore_rl.eval"
RESULTS_VERSION = 1


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message names the argument or file."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``--checkpoint`` named.

    Attributes:
        kind: ``base`` | ``run_checkpoint`` (a learner checkpoint folder) | ``trainable`` (a
            ``save_trainable`` folder).
        path: the folder (None for base); for ``run_checkpoint`` the ckpt-* folder.
        trainable: the folder whose weights are loaded (None for base).
        iteration, policy_version: from the checkpoint's state.json (run checkpoints only).
        config_yaml: the run's config snapshot (run checkpoints only).
    """

    kind: Literal["base", "run_checkpoint", "trainable"]
    path: str | None = None
    trainable: str | None = None
    iteration: int | None = None
    policy_version: int | None = None
    config_yaml: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        if self.kind == "base":
            return "base"
        p = Path(self.path or "")
        return p.parent.name if p.name == "trainable" else p.name



# -------------------------------------------------------------------------------------- results
class Stat(BaseModel):
    """mean ± population std over ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        v = np.asarray(values, dtype=np.float64)
        return cls(mean=float(v.mean()), std=float(v.std()), n=int(v.size))


class MetricRow(BaseModel):
    """One metric over the three image sets; a set is None where the metric does not apply
    (FID of the LQ inputs, PSNR of the ground truth against itself) or was not computed."""

    name: str
    label: str
    restored: Stat | None = None
    lq: Stat | None = None
    gt: Stat | None = None
    note: str | None = None  # why the metric is absent (e.g. NOTE_LPIPS)
    digits: int = 4


class ImageRecord(BaseModel):
    """One restored sample: metrics against its ground truth and its IQA score."""

    id: int
    name: str
    sample: int
    file: str  # relative to the results folder
    psnr: float
    ssim: float
    iqa: float
    lpips: float | None = None


class ReferenceRecord(BaseModel):
    """One test pair: the LQ input's metrics against the GT, and both IQA scores."""

    id: int
    name: str
    gt_file: str
    lq_file: str
    iqa_gt: float
    iqa_lq: float
    psnr_lq: float
    ssim_lq: float
    lpips_lq: float | None = None


class EvalResult(BaseModel):
    """Everything one evaluation measured (``results.json`` holds exactly this, plus its format tag).

    Validated on read: a results file with a missing or mistyped field is one
    :class:`EvaluationError` naming the file and the field.
    """

    model_config = ConfigDict(extra="ignore")

    label: str
    checkpoint: CheckpointInfo
    metrics: dict[str, MetricRow]
    per_image: list[ImageRecord]
    ground_truth: list[ReferenceRecord]
    sampler: dict[str, Any]
    data: dict[str, Any]
    scorer: dict[str, str]
    conventions: dict[str, str]
    seconds: float
    out_dir: str | None = Field(default=None, exclude=True)  # where it was read from; not saved

    def mean(self, metric: str) -> float | None:
        """Mean over the restored images, or None when the metric was not computed."""
        row = self.metrics[metric]
        return None if row.restored is None else row.restored.mean

    def to_dict(self) -> dict[str, Any]:
        """The results.json object (the run's config snapshot is not repeated in it)."""
        ckpt = asdict(self.checkpoint)
        ckpt.pop("config_yaml")
        d = self.model_dump(exclude={"checkpoint"})
        return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "label": d["label"], "checkpoint": ckpt,
                **{k: d[k] for k in ("metrics", "sampler", "data", "scorer", "conventions", "seconds", "per_image",
                                     "ground_truth")}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], out_dir: str | None = None, *, source: str = "results") -> EvalResult:
        if not isinstance(d, dict) or d.get("format") != RESULTS_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise EvaluationError(f"{source}: expected format {RESULTS_FORMAT!r}, got {got!r}")
        try:
            return cls.model_validate({**d, "out_dir": out_dir})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise EvaluationError(f"{source}: {where}: {first['msg']} ({err.error_count()} problem(s))") from None

    def to_markdown(self) -> str:
        c, s = self.checkpoint, self.sampler

        def cell(st: Stat | None, row: MetricRow) -> str:
            if st is None:
                return "—"
            return (
                f"{st.mean:.{row.digits}f} ± {st.std:.{row.digits}f}"
                if st.n > 1
                else f"{st.mean:.{row.digits}f}"
            )

        where = {"base": "base policy (model.init_checkpoint merged, no RL update)"}.get(
            c.kind, c.path
        )
        if c.iteration is not None:
            where += f" (iteration {c.iteration}, policy version {c.policy_version})"
        lines = [
            f"# Evaluation: {self.label}",
            "",
            f"- checkpoint: {where}",
            (
                f"- test split: {self.data['num_images']} images × {s['samples_per_image']} sample(s), "
                f"{self.data['resolution']} px ({self.data['kind']})"
            ),
            (
                f"- sampler: K = {s['num_inference_steps']} DDIM steps, η = {s['eta']}, target "
                f"{s['policy_target']}, seed {s['seed']} (round {s['round_index']}; "
                "same noise for every checkpoint)"
            ),
            f"- IQA scorer: {self.scorer['name']} (version {self.scorer['version']})",
            "",
            "| metric | restored | input (LQ) | ground truth | note |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in self.metrics.values():
            if row.note is not None and row.restored is None:
                lines.append(f"| {row.label} | {row.note} | | | |")
            else:
                lines.append(
                    f"| {row.label} | {cell(row.restored, row)} | {cell(row.lq, row)} | {cell(row.gt, row)} | "
                    f"{row.note or ''} |"
                )
        lines += ["", "## Conventions", ""]
        lines += [f"- **{k}**: {v}" for k, v in self.conventions.items()]
        has_lpips = self.metrics["lpips"].restored is not None
        lines += [
            "",
            "## Per image",
            "",
            "| image | sample | PSNR | SSIM |"
            + (" LPIPS |" if has_lpips else "")
            + " IQA | IQA (GT) | IQA (LQ) |",
            "| --- | --- | --- | --- |" + (" --- |" if has_lpips else "") + " --- | --- | --- |",
        ]
        refs = {r.id: r for r in self.ground_truth}
        for r in self.per_image:
            g = refs[r.id]
            lp = f" {r.lpips:.4f} |" if has_lpips else ""
            lines.append(
                f"| {r.name} | {r.sample} | {r.psnr:.2f} | {r.ssim:.4f} |{lp} {r.iqa:.4f} | {g.iqa_gt:.4f} | {g.iqa_lq:.4f} |"
            )
        return "\n".join(lines) + "\n"


def read_results(path: str | Path) -> EvalResult:
    """An :class:`EvalResult` from a results.json (or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise EvaluationError(f"{p}: no such results file")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvaluationError(f"{p}: not a readable results file ({err})") from None
    return EvalResult.from_dict(data, out_dir=str(p.parent), source=str(p))


