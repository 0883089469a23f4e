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
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deploy.eval_checkpoints import load_eval_policy, resolve_checkpoint
from deploy.eval_metrics import (
    CONVENTIONS,
    NOTE_FID,
    NOTE_FID_FEW,
    NOTE_LPIPS,
    build_eval_scorer,
    build_lpips,
    fid_between_folders,
    iqa_scores,
    lpips_distance,
    psnr,
    ssim,
)
from deploy.eval_results import (
    EvalResult,
    EvaluationError,
    ImageRecord,
    MetricRow,
    ReferenceRecord,
    Stat,
)

if TYPE_CHECKING:
    from common.config import ExperimentConfig
    from reward_server.scoring import Scorer

__all__ = ["EVAL_ROUND", "eval_sampler", "evaluate", "main"]

log = logging.getLogger("restore_rl.evaluate")

#: Round index of evaluation noise: never a training iteration, nor the driver's PREVIEW_ROUND.
EVAL_ROUND = 2_000_003
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
        r_iqa = iqa_scores(scorer, [f"{n}:{g}" for n in names for g in range(G)], restored)
        gt_iqa = iqa_scores(scorer, [f"gt:{n}" for n in names], gt)
        lq_iqa = iqa_scores(scorer, [f"lq:{n}" for n in names], lq)
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
    fid_row = MetricRow(name="fid", label="FID ↓", digits=2)
    if fid_weights is None:
        fid_row.note = NOTE_FID
    elif len(per_image) < 2 or len(refs) < 2:
        fid_row.note = NOTE_FID_FEW
    else:
        fid_row.restored = Stat(mean=fid_between_folders(img_dir, gt_dir, fid_weights, device), std=0.0, n=1)
        fid_row.note = f"set vs set: {len(per_image)} restored vs {len(refs)} ground truths"

    def col(records, key):
        return Stat.of([getattr(r, key) for r in records])

    metrics = {
        "psnr": MetricRow(name="psnr", label="PSNR ↑ (dB)", restored=col(per_image, "psnr"),
                          lq=col(refs, "psnr_lq"), digits=2),
        "ssim": MetricRow(name="ssim", label="SSIM ↑", restored=col(per_image, "ssim"), lq=col(refs, "ssim_lq")),
        "lpips": (
            MetricRow(name="lpips", label="LPIPS ↓", restored=col(per_image, "lpips"), lq=col(refs, "lpips_lq"))
            if lpips_net is not None
            else MetricRow(name="lpips", label="LPIPS ↓", note=NOTE_LPIPS)
        ),
        "fid": fid_row,
        "iqa": MetricRow(name="iqa", label=f"IQA ↑ ({scorer.name})", restored=col(per_image, "iqa"),
                         lq=col(refs, "iqa_lq"), gt=col(refs, "iqa_gt")),
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
