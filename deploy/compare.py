"""The paper's comparison and ablations from one command (paper Tables 1 and 6, Figures 1 and 6).

    python -m deploy.compare --config FILE [--set k=v ...] [--rows "Base,Base +Diff.SFT,Original"]
                             [--iterations N] [--name NAME] [--eval-samples 4]

Every arm starts from the same policy (the config's ``model``, including its
``init_checkpoint``), the same seeds, data and iteration budget; only the algorithm overrides of
its Table 6 row differ (``learner/modes.py``). ``Base`` is not trained. Each arm is then
evaluated on the test split with the same evaluation noise, the same IQA scorer and the same
sampler (config ``evaluation``: no arm is measured with its training action target). The
table gives each mean ± its standard error and the paired differences of every arm against
Base and Base +Diff.SFT over the same images and noise.

Outputs in ``<deploy.output_dir>/<name>/``: ``table.md`` + ``table.json`` (one row per arm:
PSNR, SSIM, LPIPS, FID when local weights are given, IQA), ``iqa_distribution.png`` (Figure 1:
ground truth vs Base vs the RL arm), ``reward_curves.png`` (Figure 6: IQA vs reconstruction
reward, when both arms ran), and per-arm run folders and evaluations.

With ``--demo`` the arms start from the demo's cached pre-trained tiny VAE and SFT policy (as
``make demo`` does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import (
    ConfigError,
    ExperimentConfig,
    add_config_args,
    apply_overrides,
    load_config,
    parse_config,
)
from learner.modes import TABLE6_ROWS, table6_overrides

log = logging.getLogger("restore_rl.compare")

DEFAULT_ROWS = ["Base", "Base +Diff.SFT", "Original"]
RL_ROW = "Original"
REC_ROW = "with Rec."


def slug(row: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-") or "arm"


def arm_config(cfg: ExperimentConfig, row: str, name: str, iterations: int | None) -> ExperimentConfig:
    """The config of one arm: the row's algorithm overrides, its own run folder, nothing else."""
    data = apply_overrides(cfg.model_dump(mode="json"), table6_overrides(row))
    data["deploy"]["run_name"] = f"{name}-{slug(row)}"
    if iterations is not None:
        data["deploy"]["iterations"] = iterations
        data["deploy"]["checkpoint_every"] = iterations
    return parse_config(data, source=f"arm {row!r}")


#: Paired comparisons written under the table: (arm, reference arm) for every arm present.
PAIRED_REFERENCES = ("Base", "Base +Diff.SFT")
PAIRED_METRICS = ("iqa", "psnr", "ssim")


def paired_difference(arm: dict[tuple[int, int], float], ref: dict[tuple[int, int], float]) -> tuple[float, float, int]:
    """Mean and standard error of ``arm − ref`` over the (test image, evaluation seed) pairs both
    restored from the same input and noise: returns (mean, se, n). The SE is that of the mean of
    the n paired differences (sample std, ddof 1); n < 2 gives se = nan."""
    keys = sorted(set(arm) & set(ref))
    if not keys:
        raise ValueError("no (image, sample) pair in common: were both arms evaluated on the same split?")
    mean, se = mean_se([arm[k] - ref[k] for k in keys])
    return mean, se, len(keys)


def per_sample(res: Any, metric: str) -> dict[tuple[int, int], float]:
    """{(image id, sample index): value} of one metric of an :class:`EvalResult`."""
    return {(r.id, r.sample): float(getattr(r, metric)) for r in res.per_image}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (ddof 1) over the restored samples of one arm."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan"))


def check_overrides_keep_rows(overrides: list[str], rows: list[str]) -> None:
    """A ValueError when a ``--set`` names a key that a row sets: the row would silently win.

    Each arm is its row's settings applied over the config (``arm_config``), so e.g.
    ``--set algorithm.mode=rl_only --rows Original`` would train ``adaptive``.
    """
    keys = {o.split("=", 1)[0].strip(): o for o in overrides}
    for row in rows:
        for key, value in (TABLE6_ROWS.get(row) or {}).items():
            if key in keys:
                raise ValueError(
                    f"--set {keys[key]} conflicts with row {row!r}, which sets {key}={value}: "
                    "a row defines its algorithm settings (learner/modes.py TABLE6_ROWS)"
                )


def iterations_per_pass(cfg: ExperimentConfig) -> int:
    """Iterations that draw every training input once (the driver's per-pass permutations)."""
    from common.data import build_dataset

    per_iteration = cfg.rollout.batch_size // cfg.rollout.samples_per_input
    return max(1, math.ceil(len(build_dataset(cfg.data, "train")) / per_iteration))


def base_reward_curve(cfg: ExperimentConfig, iterations: int, scorer: Any) -> tuple[list[int], list[float]]:
    """The untouched base policy's mean reward on each training iteration's inputs and noise.

    An iteration's inputs and each trajectory's noise are pure functions of (seed, iteration,
    input, sample) (``deploy.driver.input_ids_for_iteration``, ``rollout.sampler.trajectory_seed``),
    the same in every arm. So this is a paired control for an arm's ``reward/mean`` curve: arm −
    base is what training changed, not which inputs or noise an iteration happened to draw.
    """
    from deploy.driver import input_ids_for_iteration
    from rollout.reward_sink import ThreadPoolSink
    from rollout.worker import RolloutWorker, sampler_settings

    sink = ThreadPoolSink(lambda images: scorer.score(list(images)).scores)
    try:
        worker = RolloutWorker(0, cfg.model, cfg.data, sampler_settings(cfg.rollout, cfg.algorithm),
                               cfg.rollout.seed, lambda: sink)
        per_iteration = cfg.rollout.batch_size // cfg.rollout.samples_per_input
        num_inputs = worker.num_inputs()
        its, rewards = [], []
        for it in range(iterations):
            ids = input_ids_for_iteration(it, per_iteration, num_inputs, cfg.rollout.seed)
            traj = worker.sample(ids, round_index=it)
            its.append(it)
            rewards.append(float(traj.rewards.mean()))
    finally:
        sink.close()
    return its, rewards


def start_weights_digest(cfg: ExperimentConfig) -> str:
    """sha256 of the trainable tensors the arm's policy starts from (built exactly as a learner does)."""
    from common.policy import build_policy

    policy = build_policy(cfg.model, cfg.data.resolution, dtype="float32")
    h = hashlib.sha256()
    for key, t in sorted(policy.trainable_state_dict(clone=False).items()):
        h.update(key.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def run_compare(cfg: ExperimentConfig, rows: list[str], name: str, iterations: int | None,
                lpips_weights: str | None = None, fid_weights: str | None = None,
                eval_samples: int = 1, resume: bool = False) -> dict[str, Any]:
    from deploy.driver import Driver
    from deploy.eval_metrics import build_eval_scorer
    from deploy.eval_results import read_results
    from deploy.evaluate import evaluate
    from deploy.figures import (
        iqa_distribution_figure,
        iqa_groups_from_results,
        reward_curve,
        reward_curves_figure,
    )
    from learner.checkpoint import latest_checkpoint

    out = Path(cfg.deploy.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    arms = {row: arm_config(cfg, row, name, iterations) for row in rows}
    digests = {row: start_weights_digest(a) for row, a in arms.items()}
    if len(set(digests.values())) != 1:
        raise RuntimeError(f"arms would start from different weights: {digests}")
    Driver(cfg)._connect_ray()
    scorer = build_eval_scorer(cfg)
    results, timings = {}, {}
    for row, acfg in arms.items():
        t0 = time.perf_counter()
        run_root = Path(acfg.deploy.output_dir) / acfg.deploy.run_name
        done = out / "eval" / slug(row) / "results.json"
        if resume and done.is_file():
            ckpt_done = latest_checkpoint(run_root)
            prev = read_results(done)
            trained_ok = TABLE6_ROWS.get(row) is None or (
                ckpt_done is not None and ckpt_done.name == f"ckpt-{acfg.deploy.iterations - 1:06d}")
            if trained_ok and len(prev.per_image) == eval_samples * len(prev.ground_truth):
                print(f"[compare] {row}: reusing its finished run and evaluation ({done})", flush=True)
                results[row], timings[row] = prev, 0.0
                continue
        if TABLE6_ROWS.get(row) is None:  # "Base": evaluated untouched
            ckpt: str | Path = "base"
        else:
            if run_root.exists():
                import shutil

                shutil.rmtree(run_root)
            print(f"[compare] training {row!r} ({acfg.algorithm.mode}, reward {acfg.algorithm.reward}) "
                  f"for {acfg.deploy.iterations} iterations", flush=True)
            Driver(acfg).run_loop()
            ckpt = run_root
        res = evaluate(acfg, ckpt, out / "eval" / slug(row), scorer=scorer, label=row,
                       lpips_weights=lpips_weights, fid_weights=fid_weights, samples_per_image=eval_samples)
        results[row] = res
        timings[row] = round(time.perf_counter() - t0, 1)
        print(f"[compare] {row}: PSNR {res.mean('psnr'):.2f}  SSIM {res.mean('ssim'):.4f}  "
              f"IQA {res.mean('iqa'):.4f}  ({timings[row]} s)", flush=True)

    table = []
    for row, res in results.items():
        entry = {"arm": row, "psnr": res.mean("psnr"), "ssim": res.mean("ssim"), "lpips": res.mean("lpips"),
                 "fid": res.mean("fid"), "iqa": res.mean("iqa"), "seconds": timings[row],
                 "start_weights_sha256": digests[row], "samples": len(res.per_image),
                 "iterations": 0 if TABLE6_ROWS.get(row) is None else arms[row].deploy.iterations}
        for m in PAIRED_METRICS:
            entry[f"{m}_se"] = mean_se([getattr(r, m) for r in res.per_image])[1]
        table.append(entry)
    paired = []
    for ref in PAIRED_REFERENCES:
        if ref not in results:
            continue
        for row, res in results.items():
            if row == ref:
                continue
            p = {"arm": row, "reference": ref}
            for m in PAIRED_METRICS:
                mean, se, n = paired_difference(per_sample(res, m), per_sample(results[ref], m))
                p.update({m: mean, f"{m}_se": se, "pairs": n})
            paired.append(p)
    sampler = next(iter(results.values())).sampler
    scorer_name = getattr(scorer, "name", type(scorer).__name__)
    md = [f"# Comparison `{name}` (test split, same noise, IQA by {scorer_name})", "",
          "| arm | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ | IQA ↑ | iterations |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(v: float | None, digits: int, se: float | None = None) -> str:
        if v is None:
            return "n/a (needs local weights)"
        return f"{v:.{digits}f}" + ("" if se is None or math.isnan(se) else f" ± {se:.{digits}f}")

    for r in table:
        md.append(f"| {r['arm']} | {fmt(r['psnr'], 2, r['psnr_se'])} | {fmt(r['ssim'], 4, r['ssim_se'])} | "
                  f"{fmt(r['lpips'], 4)} | {fmt(r['fid'], 2)} | {fmt(r['iqa'], 4, r['iqa_se'])} | {r['iterations']} |")
    if paired:
        md += ["", "Paired differences (arm − reference over the same test images and evaluation noise; ± one SE; "
               "**bold**: more than two SE):", "",
               "| arm − reference | ΔIQA | ΔPSNR | ΔSSIM | pairs |", "| --- | --- | --- | --- | --- |"]
        for p in paired:
            cells = []
            for m, digits in zip(PAIRED_METRICS, (4, 2, 4)):
                c = fmt(p[m], digits, p[f"{m}_se"])
                cells.append(f"**{c}**" if abs(p[m]) > 2 * p[f"{m}_se"] else c)
            md.append(f"| {p['arm']} − {p['reference']} | {' | '.join(cells)} | {p['pairs']} |")
    md += ["", f"± is one standard error over the {table[0]['samples']} restored samples (test images × "
           f"{eval_samples} evaluation seed(s)).",
           f"Every arm, Base included, is sampled alike: K = {sampler['num_inference_steps']} DDIM steps, "
           f"η = {sampler['eta']}, step `{sampler['policy_target']}` (config `evaluation`).",
           "PSNR: pyiqa psnr (RGB, data range 1). SSIM: pyiqa ssim (Y channel of YIQ, 0–255, valid window).",
           f"All arms start from the same trainable weights (sha256 {next(iter(digests.values()))[:16]}…)."]
    (out / "table.md").write_text("\n".join(md) + "\n")
    (out / "table.json").write_text(json.dumps({"name": name, "rows": table, "paired": paired, "sampler": sampler},
                                               indent=2) + "\n")

    figures = {}
    rl = RL_ROW if RL_ROW in results else next((r for r in rows if TABLE6_ROWS.get(r)), None)
    if "Base" in results and rl is not None:
        groups = iqa_groups_from_results({"Base": results["Base"], rl: results[rl]})
        figures["iqa_distribution"] = str(iqa_distribution_figure(groups, out / "iqa_distribution.png"))
    curves, baselines = {}, {}
    curve_rows = [r for r in (RL_ROW, REC_ROW) if r in results]
    window = iterations_per_pass(arms[curve_rows[0]]) if curve_rows else 1
    for row in curve_rows:
        metrics = Path(arms[row].deploy.output_dir) / arms[row].deploy.run_name / "metrics.jsonl"
        xs, ys, _ = reward_curve(metrics)
        label = f"{row} ({arms[row].algorithm.reward} reward)"
        curves[label] = (xs, ys)
        if row == RL_ROW and arms[row].algorithm.reward == "iqa":
            print("[compare] base policy's reward on the same training inputs and noise", flush=True)
            baselines[label] = base_reward_curve(arms[row], arms[row].deploy.iterations, scorer)
            base = dict(zip(*baselines[label]))
            gain = [y - base[x] for x, y in zip(xs, ys)]  # by iteration: a dropped batch has no reward
            (out / "base_rewards.json").write_text(json.dumps(
                {"iterations": baselines[label][0], "base_reward_mean": baselines[label][1], "arm": row,
                 "arm_iterations": xs, "arm_reward_mean": ys, "gain": gain}, indent=2) + "\n")
            print(f"[compare] {row}: training reward − base on the same draws: first pass "
                  f"{np.mean(gain[:window]):+.4f}, last pass {np.mean(gain[-window:]):+.4f}", flush=True)
    if curves:
        figures["reward_curves"] = str(reward_curves_figure(curves, out / "reward_curves.png", pass_window=window,
                                                            baselines=baselines))
    print("\n".join(md), flush=True)
    print(f"outputs: {out.resolve()}", flush=True)
    return {"table": table, "paired": paired, "figures": figures, "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated Table 6 rows (known: {', '.join(TABLE6_ROWS)})")
    ap.add_argument("--iterations", type=int, default=None, help="iteration budget of every trained arm")
    ap.add_argument("--name", default="compare", help="output folder name under deploy.output_dir")
    ap.add_argument("--demo", action="store_true", help="start from the demo's cached SFT pre-training")
    ap.add_argument("--lpips-weights", default=None)
    ap.add_argument("--fid-weights", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="reuse the arms whose run finished and whose evaluation is on disk (e.g. after a crash)")
    ap.add_argument("--eval-samples", type=int, default=4,
                    help="restorations per test image (evaluation seeds) for the ± and the paired differences")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        for r in rows:
            table6_overrides(r)
        check_overrides_keep_rows(args.overrides, rows)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.demo:
        from deploy.demo import demo_rl_config
        from deploy.driver import Driver

        Driver(cfg)._connect_ray()
        cfg = demo_rl_config(cfg)  # the pre-trained tiny VAE and the cached SFT policy
    run_compare(cfg, rows, args.name, args.iterations, args.lpips_weights, args.fid_weights,
                eval_samples=args.eval_samples, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
