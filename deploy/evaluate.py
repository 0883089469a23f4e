"""Evaluate a restoration policy on the test split (paper §5.2, Tables 1 and 6; Figure 1).

    python -m deploy.evaluate --config FILE --checkpoint PATH|base [--set k=v ...] [--out DIR]
        [--samples-per-image 1] [--seed 0] [--batch-size 4] [--device cpu|cuda]
        [--lpips-weights FILE [--lpips-backbone FILE]] [--fid-weights FILE]

``--checkpoint``:

* ``base`` — the policy the run starts from, untouched: ``build_policy(cfg.model)``, i.e. the
  pretrained/tiny model with ``model.init_checkpoint`` (the SFT weights) merged, fresh LoRA = 0.
* a run checkpoint ``<run>/checkpoints/ckpt-NNNNNN`` (verified against its manifest; its config
  snapshot's ``model`` section must match ``--config``), or a run folder (its latest checkpoint);
* a trainable-weights folder (``save_trainable``: a peft LoRA adapter or a diffusers ControlNet).

Every arm restores the same inputs from the same noise: trajectory seeds depend only on
(``--seed``, input id, sample index, :data:`EVAL_ROUND`), never on the weights, so the numbers of
two checkpoints differ only because their weights do. Sampling uses the config's
``evaluation`` sampler (:func:`eval_sampler`): K and η default to the rollout's, the step is the
plain DDIM step (``evaluation.policy_target: standard``, the base model's own sampler). It reads
no ``algorithm`` setting, so every arm of a comparison, Base included, is sampled alike.

Metrics (exact conventions in :data:`CONVENTIONS`, also written into results.md/json):
PSNR and SSIM (pyiqa), LPIPS and FID (pyiqa, only with local weights: never downloaded, never
made up — the table says "not computed" instead), and the IQA reward score of the restored
outputs, the LQ inputs and the ground truths (the configured reward scorer, built in-process).

Outputs in ``--out`` (default ``<deploy.output_dir>/<run_name>/eval/<label>``): ``results.md``,
``results.json``, restored PNGs in ``images/``, ``reference/{gt,lq}/`` PNGs, ``grid.png``
(LQ | restored | GT). Re-running into the same folder replaces its PNGs.

With ``reward.backend: vllm`` the engine shares the GPU with the policy: lower
``reward.vllm_gpu_memory_utilization`` (e.g. ``--set reward.vllm_gpu_memory_utilization=0.4``).

Python API (the compare tool)::

    scorer = build_eval_scorer(cfg)                    # once, shared by every arm
    base = evaluate(cfg, "base", out / "base", scorer=scorer)
    rl = evaluate(cfg, "runs/x/checkpoints/ckpt-000099", out / "rl", scorer=scorer)
    rl.mean("psnr"), rl.metrics["ssim"].restored, read_results(out / "rl" / "results.json")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

    from common.config import ExperimentConfig
    from reward_server.scoring import Scorer

__all__ = [
    "CONVENTIONS",
    "EVAL_ROUND",
    "CheckpointInfo",
    "EvalResult",
    "EvaluationError",
    "ImageRecord",
    "MetricRow",
    "ReferenceRecord",
    "Stat",
    "build_eval_scorer",
    "build_lpips",
    "evaluate",
    "fid_between_folders",
    "load_eval_policy",
    "lpips_distance",
    "psnr",
    "read_results",
    "resolve_checkpoint",
    "ssim",
]

log = logging.getLogger("restore_rl.evaluate")

#: Round index of evaluation noise: never a training iteration, nor the driver's PREVIEW_ROUND.
EVAL_ROUND = 2_000_003
RESULTS_FORMAT = "restore_rl.eval"
RESULTS_VERSION = 1

NOTE_LPIPS = "not computed: needs local weights (--lpips-weights)"
NOTE_FID = "not computed: needs local weights (--fid-weights)"
NOTE_FID_FEW = "not computed: FID needs >= 2 restored and >= 2 ground-truth images"

#: What each number means, exactly (pyiqa 0.1.16 read at the source; see the tests).
CONVENTIONS: dict[str, str] = {
    "images": "All metrics are computed on the saved 8-bit outputs (uint8 PNG / 255 -> [0, 1]) at "
    "data.resolution, no border crop; per-image values are averaged over images (mean ± population "
    "std), e.g. PSNR is the mean of per-image PSNRs, not the PSNR of the mean MSE.",
    "psnr": "pyiqa `psnr` (PSNR, test_y_channel=False): RGB, all 3 channels, data_range 1 "
    "(inputs in [0, 1]); per image MSE over C×H×W, PSNR = 10·log10(1 / (MSE + 1e-8)), so identical "
    "images give 80 dB, never ∞.",
    "ssim": "pyiqa `ssim` (SSIM, test_y_channel=True, color_space='yiq', downsample=False): luma "
    "Y = 0.299·R + 0.587·G + 0.114·B (the Y of YIQ, i.e. full-range BT.601 luma — NOT the "
    "16–235 YCbCr Y of BasicSR/MATLAB rgb2ycbcr), scaled to [0, 255] and rounded to integers, "
    "float64; 11×11 Gaussian window σ = 1.5, 'valid' filtering (no padding: the map is "
    "(H−10)×(W−10)), C1 = (0.01·255)², C2 = (0.03·255)², contrast-structure term clamped at 0 "
    "(ReLU), no 1/f downsampling; the mean of the SSIM map.",
    "lpips": "pyiqa LPIPS v0.1, AlexNet backbone, inputs [0, 1] -> [−1, 1], spatial average over "
    "5 layers; lower is better. Only with local weights (--lpips-weights [+ --lpips-backbone]).",
    "fid": "pyiqa FID (clean-fid 'clean' mode: PIL bicubic resize to 299×299 per channel), "
    "InceptionV3 pool3 2048-d features with the pt_inception-2015-12-05 weights, the set of restored "
    "images vs the set of ground truths of this split; lower is better. With fewer than 2048 images "
    "the covariances are rank-deficient: small test sets (LOL eval15) give noisy, biased FIDs. Only "
    "with local weights (--fid-weights).",
    "iqa": "The configured reward scorer (reward.* of the config, built in-process), score in "
    "[0, 1], higher is better (each scorer maps its native range onto [0, 1], e.g. pyiqa piqe -> "
    "1 − piqe/100; DeQA/Q-Align levels 1–5 -> (s − 1)/4).",
}


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message names the argument or file."""


# ----------------------------------------------------------------------------------- checkpoints
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


# -------------------------------------------------------------------------------------- metrics
def _as_tensor(images: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    from common.policy import images_to_tensor

    return images_to_tensor(images, device)


def _pyiqa_metric(name: str, device: str | torch.device):
    import pyiqa

    key = (name, str(device))
    if key not in _PYIQA_CACHE:
        _PYIQA_CACHE[key] = pyiqa.create_metric(name, device=device, as_loss=False)
    return _PYIQA_CACHE[key]


_PYIQA_CACHE: dict[tuple[str, str], Any] = {}


def psnr(restored, reference, device: str | torch.device = "cpu") -> np.ndarray:
    """float64 [B] — pyiqa ``psnr`` of uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1] images
    (:data:`CONVENTIONS` ``psnr``)."""
    import torch

    with torch.inference_mode():
        v = _pyiqa_metric("psnr", device)(
            _as_tensor(restored, device), _as_tensor(reference, device)
        )
    return v.reshape(-1).double().cpu().numpy()


def ssim(restored, reference, device: str | torch.device = "cpu") -> np.ndarray:
    """float64 [B] — pyiqa ``ssim`` (Y of YIQ, rounded to 8 bits; :data:`CONVENTIONS` ``ssim``)."""
    import torch

    with torch.inference_mode():
        v = _pyiqa_metric("ssim", device)(
            _as_tensor(restored, device), _as_tensor(reference, device)
        )
    return v.reshape(-1).double().cpu().numpy()


def _load_state_dict(path: str | Path, flag: str) -> dict[str, Any]:
    """A local weights file as a state dict. ``weights_only``: a weights file runs no code."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise EvaluationError(f"{flag} {p}: no such file")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
        raise EvaluationError(
            f"{flag} {p}: not a readable weights file ({type(err).__name__}: {err})"
        ) from None
    for wrapper in ("params", "state_dict", "model"):
        if isinstance(sd, dict) and set(sd) == {wrapper}:
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise EvaluationError(f"{flag} {p}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@contextlib.contextmanager
def _no_torchvision_download():
    # pyiqa 0.1.16's LPIPS `alexnet` wrapper calls models.alexnet(weights='IMAGENET1K_V1') whatever
    # `pretrained` says, i.e. a download. Build the bare architecture instead; the weights come
    # from the local files, loaded strictly by build_lpips.
    from unittest import mock

    import torchvision
    from pyiqa.archs import lpips_arch

    bare = torchvision.models.alexnet
    with mock.patch.object(lpips_arch.models, "alexnet", lambda *a, **k: bare(weights=None)):
        yield


def build_lpips(
    weights: str | Path, backbone: str | Path | None = None, device: str | torch.device = "cpu"
):
    """pyiqa's LPIPS (v0.1, AlexNet) with every tensor from local files; nothing downloads.

    ``weights``: a state dict of pyiqa's ``LPIPS`` module — the whole module (``net.slice*`` +
    ``lin0..4``), or only the linear heads ``lin0..4`` (pyiqa's LPIPS_v0.1_alex / richzhang's
    ``alex.pth``), then with ``backbone`` = torchvision's AlexNet state dict
    (alexnet-owt-7be5be79.pth; its ``features.i.*`` map onto ``net.sliceK.i.*``).
    Every backbone and head tensor must come from a file (EvaluationError naming what is missing).
    """
    from pyiqa.archs import lpips_arch

    with _no_torchvision_download():
        net = lpips_arch.LPIPS(
            pretrained=False, net="alex", version="0.1", pretrained_model_path=None
        )
    own = net.state_dict()
    by_suffix = {
        k.split(".", 2)[2]: k for k in own if k.startswith("net.slice")
    }  # "0.weight" -> key
    loaded: dict[str, Any] = {}
    if backbone is not None:
        for k, v in _load_state_dict(backbone, "--lpips-backbone").items():
            if k.startswith("features.") and k.removeprefix("features.") in by_suffix:
                loaded[by_suffix[k.removeprefix("features.")]] = v
        if not loaded:
            raise EvaluationError(
                f"--lpips-backbone {backbone}: no AlexNet 'features.*' tensors (expected torchvision's "
                "alexnet-owt-7be5be79.pth)"
            )
    sd = _load_state_dict(weights, "--lpips-weights")
    matched = {k: v for k, v in sd.items() if k in own}
    if not matched:
        raise EvaluationError(
            f"--lpips-weights {weights}: none of its {len(sd)} tensors is an LPIPS tensor "
            f"(e.g. {sorted(sd)[:3]}; expected 'lin0.model.1.weight', 'net.slice1.0.weight', ...)"
        )
    loaded.update(matched)
    # lins.k aliases link (same tensors); scaling_layer holds LPIPS's constants, not weights.
    required = {k for k in own if not k.startswith(("scaling_layer.", "lins."))}
    aliases = {f"lins.{k[3]}.{k.split('.', 1)[1]}": k for k in required if k.startswith("lin")}
    for alias, key in aliases.items():
        if alias in loaded and key not in loaded:
            loaded[key] = loaded[alias]
    missing = sorted(required - set(loaded))
    if missing:
        hint = (
            " — the file holds only the linear heads: add --lpips-backbone (torchvision's AlexNet "
            "weights, alexnet-owt-7be5be79.pth)"
            if all(k.startswith("net.") for k in missing)
            else ""
        )
        raise EvaluationError(
            f"--lpips-weights {weights}: {len(missing)} LPIPS tensors missing (e.g. {missing[:3]}){hint}"
        )
    try:
        net.load_state_dict({k: loaded[k] for k in required}, strict=False)
    except RuntimeError as err:
        raise EvaluationError(
            f"--lpips-weights {weights}: tensors do not fit LPIPS-alex ({err})"
        ) from None
    return net.to(device).eval().requires_grad_(False)


def lpips_distance(net, restored, reference, device: str | torch.device = "cpu") -> np.ndarray:
    """float64 [B] — LPIPS(restored, reference) with a :func:`build_lpips` network."""
    import torch

    with torch.inference_mode():
        v = net(_as_tensor(restored, device), _as_tensor(reference, device), normalize=True)
    return v.reshape(-1).double().cpu().numpy()


def fid_between_folders(
    restored_dir: str | Path,
    reference_dir: str | Path,
    weights: str | Path,
    device: str | torch.device = "cpu",
) -> float:
    """pyiqa FID ('clean' mode) between two folders of images, with local Inception weights.

    ``weights``: the FID Inception state dict (pt_inception-2015-12-05-6726825d.pth). pyiqa reads
    its weights from a module-level URL; it is pointed at the local file for the construction.
    Cost: besides the Inception forwards, one 2048×2048 matrix square root (~15 s on 2 CPU cores).
    """
    from unittest import mock

    import pyiqa
    from pyiqa.archs import inception

    _load_state_dict(weights, "--fid-weights")  # readable as plain tensors (pyiqa unpickles it)
    try:
        with mock.patch.object(
            inception, "FID_WEIGHTS_URL", str(Path(weights).expanduser().resolve())
        ):
            metric = pyiqa.create_metric("fid", device=device)
    except RuntimeError as err:
        raise EvaluationError(
            f"--fid-weights {weights}: tensors do not fit the FID InceptionV3 ({err})"
        ) from None
    value = float(
        metric(str(restored_dir), str(reference_dir), mode="clean", num_workers=0, verbose=False)
    )
    if not math.isfinite(value):
        raise EvaluationError(f"FID between {restored_dir} and {reference_dir} is {value}")
    return value


# ------------------------------------------------------------------------------------ the scorer
def build_eval_scorer(cfg: ExperimentConfig, device: str | None = None) -> Scorer:
    """The configured reward scorer, in this process (``reward_server.factory.scorer_spec``).

    ``device`` (transformers/pyiqa backends): default cuda when available, else cpu.
    """
    from reward_server.factory import scorer_spec

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return scorer_spec(cfg.reward, device=device)()


def _iqa(scorer: Scorer, ids: list[str], images: np.ndarray) -> np.ndarray:
    """float64 [N] scores in [0, 1]; a failed image raises (never a made-up score)."""
    from reward_server.factory import ScoreFailed, score_batch

    results = score_batch(scorer, ids, list(images))
    failed = [r for r in results if isinstance(r, ScoreFailed)]
    if failed:
        raise EvaluationError(
            f"IQA scorer {scorer.name}: {len(failed)} image(s) failed: {failed[0]}"
        )
    return np.array([r.score for r in results], dtype=np.float64)


# -------------------------------------------------------------------------------------- results
@dataclass
class Stat:
    """mean ± population std over ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        v = np.asarray(values, dtype=np.float64)
        return cls(float(v.mean()), float(v.std()), int(v.size))


@dataclass
class MetricRow:
    """One metric over the three image sets; a set is None where the metric does not apply
    (FID of the LQ inputs, PSNR of the ground truth against itself) or was not computed."""

    name: str
    label: str
    restored: Stat | None = None
    lq: Stat | None = None
    gt: Stat | None = None
    note: str | None = None  # why the metric is absent (e.g. NOTE_LPIPS)
    digits: int = 4


@dataclass
class ImageRecord:
    """One restored sample: metrics against its ground truth and its IQA score."""

    id: int
    name: str
    sample: int
    file: str  # relative to the results folder
    psnr: float
    ssim: float
    iqa: float
    lpips: float | None = None


@dataclass
class ReferenceRecord:
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


@dataclass
class EvalResult:
    """Everything one evaluation measured (``results.json`` holds exactly this)."""

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
    out_dir: str | None = None

    def mean(self, metric: str) -> float | None:
        """Mean over the restored images, or None when the metric was not computed."""
        row = self.metrics[metric]
        return None if row.restored is None else row.restored.mean

    def to_dict(self) -> dict[str, Any]:
        ckpt = asdict(self.checkpoint)
        ckpt.pop("config_yaml")
        return {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "label": self.label,
            "checkpoint": ckpt,
            "metrics": {k: asdict(v) for k, v in self.metrics.items()},
            "sampler": self.sampler,
            "data": self.data,
            "scorer": self.scorer,
            "conventions": self.conventions,
            "seconds": self.seconds,
            "per_image": [asdict(r) for r in self.per_image],
            "ground_truth": [asdict(r) for r in self.ground_truth],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], out_dir: str | None = None) -> EvalResult:
        if d.get("format") != RESULTS_FORMAT:
            raise EvaluationError(
                f"results: expected format {RESULTS_FORMAT!r}, got {d.get('format')!r}"
            )

        def stat(s):
            return None if s is None else Stat(**s)

        metrics = {
            k: MetricRow(
                **{**v, "restored": stat(v["restored"]), "lq": stat(v["lq"]), "gt": stat(v["gt"])}
            )
            for k, v in d["metrics"].items()
        }
        return cls(
            label=d["label"],
            checkpoint=CheckpointInfo(**d["checkpoint"]),
            metrics=metrics,
            per_image=[ImageRecord(**r) for r in d["per_image"]],
            ground_truth=[ReferenceRecord(**r) for r in d["ground_truth"]],
            sampler=d["sampler"],
            data=d["data"],
            scorer=d["scorer"],
            conventions=d["conventions"],
            seconds=d["seconds"],
            out_dir=out_dir,
        )

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
    return EvalResult.from_dict(json.loads(p.read_text()), out_dir=str(p.parent))


# ------------------------------------------------------------------------------------- evaluate
def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(img)).save(path)  # lossless: metrics are re-computable


def _clear_pngs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.glob("*.png"):
        p.unlink()


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "image"


def eval_sampler(cfg: ExperimentConfig, samples_per_image: int = 1):
    """The evaluation sampler of ``cfg.evaluation`` (unset K/η: the rollout's). It reads no
    ``algorithm`` setting, so every arm of a comparison is sampled alike (issue 12)."""
    from rollout.sampler import SamplerSettings

    e = cfg.evaluation
    return SamplerSettings(
        num_inference_steps=e.num_inference_steps or cfg.rollout.num_inference_steps,
        eta=cfg.rollout.eta if e.eta is None else e.eta,
        samples_per_input=samples_per_image,
        reward_steps="last",  # no sink: the rewards stay NaN; the final images are scored below
        policy_target=e.policy_target,
    )


def evaluate(
    cfg: ExperimentConfig,
    checkpoint: str | Path | None = "base",
    out_dir: str | Path | None = None,
    *,
    samples_per_image: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    lpips_weights: str | Path | None = None,
    lpips_backbone: str | Path | None = None,
    fid_weights: str | Path | None = None,
    scorer: Scorer | None = None,
    device: str | None = None,
    label: str | None = None,
) -> EvalResult:
    """Restore the test split with the checkpoint's policy, measure, write results.md/json + PNGs.

    Args:
        cfg: the experiment config (model, data, the evaluation sampler, reward).
        checkpoint: ``"base"``, a run folder, a ckpt-* folder or a trainable-weights folder.
        out_dir: default ``<deploy.output_dir>/<run_name>/eval/<label>``.
        samples_per_image: G restorations per test image (different noise each).
        seed: evaluation noise seed; keep it equal across the arms being compared.
        batch_size: test images per sampling batch (× G trajectories).
        lpips_weights, lpips_backbone: local LPIPS weights (:func:`build_lpips`); None: not computed.
        fid_weights: local FID Inception weights (:func:`fid_between_folders`); None: not computed.
        scorer: a prebuilt IQA scorer to reuse (compare tool); None: built from ``cfg.reward``.
        device: ``cpu`` | ``cuda`` (default: cuda when available).
        label: name of this arm in the outputs (default: ``base`` or the checkpoint folder name).
    """
    import torch

    from common.data import build_dataset
    from deploy.outputs import sample_grid
    from rollout.sampler import sample_trajectories

    if samples_per_image < 1:
        raise EvaluationError(f"samples_per_image: expected >= 1, got {samples_per_image}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size: expected >= 1, got {batch_size}")
    if lpips_backbone is not None and lpips_weights is None:
        raise EvaluationError("--lpips-backbone needs --lpips-weights (the LPIPS linear heads)")
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = resolve_checkpoint(checkpoint)
    label = label or info.label
    out = (
        Path(out_dir)
        if out_dir is not None
        else Path(cfg.deploy.output_dir) / cfg.deploy.run_name / "eval" / label
    )
    img_dir, gt_dir, lq_dir = out / "images", out / "reference" / "gt", out / "reference" / "lq"
    for d in (img_dir, gt_dir, lq_dir):
        _clear_pngs(d)

    dataset = build_dataset(cfg.data, "test")
    if len(dataset) == 0:
        raise EvaluationError(
            "data: the test split is empty (data.num_test = 0 or an empty data.test_root)"
        )
    policy = load_eval_policy(cfg, info, device)
    lpips_net = (
        build_lpips(lpips_weights, lpips_backbone, device) if lpips_weights is not None else None
    )
    if scorer is None:
        scorer = build_eval_scorer(cfg, device)
    G = samples_per_image
    settings = eval_sampler(cfg, G)

    per_image: list[ImageRecord] = []
    refs: list[ReferenceRecord] = []
    grid_rows = []
    for start in range(0, len(dataset), batch_size):
        pairs = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        lq = np.stack([p.lq for p in pairs])  # uint8 [n, H, W, 3]
        gt = np.stack([p.gt for p in pairs])
        # 1. Restore: trajectory b = i·G + g, its noise fixed by (seed, id, g, EVAL_ROUND) only.
        traj = sample_trajectories(
            policy,
            lq,
            [p.id for p in pairs],
            settings,
            policy_version=info.policy_version or 0,
            seed=seed,
            round_index=EVAL_ROUND,
        )
        restored = traj.final_images.numpy()  # uint8 [n·G, H, W, 3]
        gt_rep = np.repeat(gt, G, axis=0)
        # 2. Full-reference metrics of the outputs and of the inputs, against the ground truth.
        r_psnr, r_ssim = psnr(restored, gt_rep, device), ssim(restored, gt_rep, device)
        l_psnr, l_ssim = psnr(lq, gt, device), ssim(lq, gt, device)
        r_lp = l_lp = None
        if lpips_net is not None:
            r_lp, l_lp = (
                lpips_distance(lpips_net, restored, gt_rep, device),
                lpips_distance(lpips_net, lq, gt, device),
            )
        # 3. IQA scores of outputs, ground truths and inputs (Figure 1).
        names = [_safe_name(p.name) for p in pairs]
        r_iqa = _iqa(scorer, [f"{n}:{g}" for n in names for g in range(G)], restored)
        gt_iqa = _iqa(scorer, [f"gt:{n}" for n in names], gt)
        lq_iqa = _iqa(scorer, [f"lq:{n}" for n in names], lq)
        for i, (p, name) in enumerate(zip(pairs, names)):
            _save_png(p.gt, gt_dir / f"{name}.png")
            _save_png(p.lq, lq_dir / f"{name}.png")
            refs.append(
                ReferenceRecord(
                    id=int(p.id),
                    name=p.name,
                    gt_file=f"reference/gt/{name}.png",
                    lq_file=f"reference/lq/{name}.png",
                    iqa_gt=float(gt_iqa[i]),
                    iqa_lq=float(lq_iqa[i]),
                    psnr_lq=float(l_psnr[i]),
                    ssim_lq=float(l_ssim[i]),
                    lpips_lq=None if l_lp is None else float(l_lp[i]),
                )
            )
            for g in range(G):
                b = i * G + g
                fname = f"{name}.png" if G == 1 else f"{name}_s{g}.png"
                _save_png(restored[b], img_dir / fname)
                per_image.append(
                    ImageRecord(
                        id=int(p.id),
                        name=p.name,
                        sample=g,
                        file=f"images/{fname}",
                        psnr=float(r_psnr[b]),
                        ssim=float(r_ssim[b]),
                        iqa=float(r_iqa[b]),
                        lpips=None if r_lp is None else float(r_lp[b]),
                    )
                )
            grid_rows.append((p.lq, restored[i * G], p.gt))
        log.info("evaluated %d/%d test images", min(len(dataset), start + batch_size), len(dataset))

    # 4. Set-level FID (restored set vs ground-truth set), only with local weights.
    fid_row = MetricRow("fid", "FID ↓", digits=2)
    if fid_weights is None:
        fid_row.note = NOTE_FID
    elif len(per_image) < 2 or len(refs) < 2:
        fid_row.note = NOTE_FID_FEW
    else:
        fid_row.restored = Stat(fid_between_folders(img_dir, gt_dir, fid_weights, device), 0.0, 1)
        fid_row.note = f"set vs set: {len(per_image)} restored vs {len(refs)} ground truths"

    def col(records, key):
        return Stat.of([getattr(r, key) for r in records])

    metrics = {
        "psnr": MetricRow(
            "psnr", "PSNR ↑ (dB)", col(per_image, "psnr"), col(refs, "psnr_lq"), digits=2
        ),
        "ssim": MetricRow("ssim", "SSIM ↑", col(per_image, "ssim"), col(refs, "ssim_lq")),
        "lpips": (
            MetricRow("lpips", "LPIPS ↓", col(per_image, "lpips"), col(refs, "lpips_lq"))
            if lpips_net is not None
            else MetricRow("lpips", "LPIPS ↓", note=NOTE_LPIPS)
        ),
        "fid": fid_row,
        "iqa": MetricRow(
            "iqa",
            f"IQA ↑ ({scorer.name})",
            col(per_image, "iqa"),
            col(refs, "iqa_lq"),
            col(refs, "iqa_gt"),
        ),
    }
    sample_grid(grid_rows, out / "grid.png")
    result = EvalResult(
        label=label,
        checkpoint=info,
        metrics=metrics,
        per_image=per_image,
        ground_truth=refs,
        sampler={
            "num_inference_steps": settings.num_inference_steps,
            "eta": settings.eta,
            "policy_target": settings.policy_target,
            "samples_per_image": G,
            "seed": seed,
            "round_index": EVAL_ROUND,
        },
        data={
            "kind": cfg.data.kind,
            "resolution": cfg.data.resolution,
            "num_images": len(dataset),
            "test_root": None if cfg.data.test_root is None else str(cfg.data.test_root),
        },
        scorer={"name": scorer.name, "version": scorer.version},
        conventions=dict(CONVENTIONS),
        seconds=round(time.perf_counter() - t0, 3),
        out_dir=str(out),
    )
    (out / "results.json").write_text(
        json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n"
    )
    (out / "results.md").write_text(result.to_markdown())
    return result


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    from common.config import ConfigError, add_config_args, config_from_args

    parser = argparse.ArgumentParser(
        prog="python -m deploy.evaluate",
        description="Restore the test split with a checkpoint (or the base policy) and measure "
        "PSNR/SSIM (pyiqa), LPIPS/FID (with local weights) and the IQA reward score.",
    )
    add_config_args(parser)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="'base', a run folder, a checkpoints/ckpt-* folder or a trainable-weights folder",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <output_dir>/<run_name>/eval/<label>)",
    )
    parser.add_argument("--label", default=None, help="name of this arm in the outputs")
    parser.add_argument(
        "--samples-per-image", type=int, default=1, help="restorations per test image (default 1)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="evaluation noise seed; equal across compared arms (default 0)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="test images per sampling batch (default 4)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--lpips-weights",
        type=Path,
        default=None,
        help="local LPIPS state dict (whole module, or the lin0..4 heads with --lpips-backbone)",
    )
    parser.add_argument(
        "--lpips-backbone",
        type=Path,
        default=None,
        help="torchvision AlexNet state dict (alexnet-owt-7be5be79.pth) for a heads-only --lpips-weights",
    )
    parser.add_argument(
        "--fid-weights",
        type=Path,
        default=None,
        help="FID InceptionV3 state dict (pt_inception-2015-12-05-6726825d.pth)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(args)
    try:
        result = evaluate(
            cfg,
            args.checkpoint,
            args.out,
            samples_per_image=args.samples_per_image,
            seed=args.seed,
            batch_size=args.batch_size,
            lpips_weights=args.lpips_weights,
            lpips_backbone=args.lpips_backbone,
            fid_weights=args.fid_weights,
            device=args.device,
            label=args.label,
        )
    except (EvaluationError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from common.data import DatasetError
        from common.policy import PolicyLoadError
        from learner.checkpoint import CheckpointError

        if isinstance(err, (PolicyLoadError, CheckpointError, DatasetError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    print(result.to_markdown().split("\n## Conventions")[0])
    print(f"results: {Path(result.out_dir) / 'results.md'}")
    return 0


if __name__ == "__main__":  # vLLM scorers spawn processes: keep the entry point guarded
    raise SystemExit(main())
