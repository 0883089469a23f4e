"""The paper's evaluation figures, from the files runs and evaluations leave behind.

* :func:`iqa_distribution_figure` — Figure 1: the IQA-score distribution of the ground truths vs
  the base policy's outputs vs the RL policy's outputs (histogram + KDE above, one strip of
  per-image scores per group below). Data: :func:`iqa_groups_from_results` over results.json files
  of :mod:`deploy.evaluate`.
* :func:`reward_curves_figure` — Figure 6: the reward curve of each run, one panel per run
  (a reconstruction reward −‖x̂0 − g‖ and an IQA reward in [0, 1] live on different scales),
  raw per-iteration mean and an EMA-smoothed line. Data: :func:`reward_curve` over metrics.jsonl.

The figure functions are pure: data in, PNG path out. CLI::

    python -m deploy.figures iqa --results base=runs/eval/base --results RL=runs/x/eval/ckpt-000099 --out fig1.png
    python -m deploy.figures rewards --run "IQA reward=runs/iqa" --run "Reconstruction reward=runs/rec" --out fig6.png
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "REWARD_KEYS",
    "iqa_distribution_figure",
    "iqa_groups_from_results",
    "reward_curve",
    "reward_curves_figure",
]

#: Keys of the per-iteration mean reward in metrics.jsonl, in order of preference: the learner's
#: ``reward/mean`` (what the driver writes), then ``reward_mean`` (the Prometheus gauge's name).
REWARD_KEYS: tuple[str, ...] = ("reward/mean", "reward_mean")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------ Figure 1
def _save(plt, fig, path: str | Path) -> Path:
    """Lay out, write ``path`` as PNG (110 dpi, parents created), close the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def iqa_groups_from_results(
    results: Mapping[str, str | Path | Any], *, gt_label: str | None = "ground truth"
) -> dict[str, list[float]]:
    """{label: per-image IQA scores}: the ground truths (from the first result) first, then the
    restored outputs of each result (every sample of every test image).

    ``results``: {arm label: results.json path, its folder, or an EvalResult}. All arms must
    have scored the same test images with the same scorer (ValueError otherwise): their GT
    scores must then be identical.
    """
    from deploy.eval_results import EvalResult, read_results

    if not results:
        raise ValueError("iqa_groups_from_results: no results given")
    loaded = {k: v if isinstance(v, EvalResult) else read_results(v) for k, v in results.items()}
    first_label, first = next(iter(loaded.items()))
    groups: dict[str, list[float]] = {}
    if gt_label is not None:
        groups[gt_label] = [r.iqa_gt for r in first.ground_truth]
    for label, res in loaded.items():
        if res.scorer != first.scorer:
            raise ValueError(
                f"{label}: scored by {res.scorer}, {first_label} by {first.scorer}: not comparable"
            )
        if [r.name for r in res.ground_truth] != [r.name for r in first.ground_truth]:
            raise ValueError(f"{label}: a different test split from {first_label}: not comparable")
        groups[label] = [r.iqa for r in res.per_image]
    return groups


def _kde(values: np.ndarray, xs: np.ndarray) -> np.ndarray | None:
    if values.size < 3 or float(values.std()) == 0.0:
        return None
    from scipy.stats import gaussian_kde

    return gaussian_kde(values)(xs)


def iqa_distribution_figure(
    groups: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "IQA scores: ground truth vs outputs",
    xlabel: str = "IQA score (reward scorer, [0, 1], higher is better)",
) -> Path:
    """Figure 1 style: histogram + KDE of each group's scores, and a strip of the scores per group
    with its mean marked. ``groups``: {label: scores}, drawn in the given order."""
    if not groups or any(len(v) == 0 for v in groups.values()):
        raise ValueError(
            f"iqa_distribution_figure: every group needs scores, got sizes {[len(v) for v in groups.values()]}"
        )
    plt = _plt()
    data = {k: np.asarray(v, dtype=np.float64) for k, v in groups.items()}
    allv = np.concatenate(list(data.values()))
    if not np.all(np.isfinite(allv)):
        raise ValueError("iqa_distribution_figure: non-finite scores")
    lo, hi = float(allv.min()), float(allv.max())
    pad = max(0.05 * (hi - lo), 0.02)
    lo, hi = lo - pad, hi + pad
    xs = np.linspace(lo, hi, 256)
    bins = np.linspace(lo, hi, max(8, min(30, int(math.sqrt(allv.size)) * 3)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax, strip) = plt.subplots(
        2,
        1,
        figsize=(6.4, 4.8),
        sharex=True,
        gridspec_kw={"height_ratios": [3, max(1, len(data)) * 0.45]},
    )
    rng = np.random.default_rng(0)  # strip jitter: the same picture every time
    for i, (label, v) in enumerate(data.items()):
        c = colors[i % len(colors)]
        ax.hist(v, bins=bins, density=True, histtype="stepfilled", alpha=0.25, color=c)
        density = _kde(v, xs)
        if density is not None:
            ax.plot(xs, density, color=c, lw=2)
        ax.axvline(
            v.mean(), color=c, ls="--", lw=1.2, label=f"{label} (mean {v.mean():.3f}, n={v.size})"
        )
        y = i + rng.uniform(-0.18, 0.18, size=v.size)
        strip.scatter(v, y, s=14, color=c, alpha=0.8, edgecolors="none")
        strip.plot([v.mean()], [i], marker="|", ms=16, mew=2.5, color="black")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    strip.set_yticks(range(len(data)), list(data), fontsize=8)
    strip.set_ylim(-0.6, len(data) - 0.4)
    strip.invert_yaxis()
    strip.set_xlim(lo, hi)
    strip.set_xlabel(xlabel)
    strip.grid(alpha=0.3, axis="x")
    return _save(plt, fig, path)


# ------------------------------------------------------------------------------------ Figure 6
def reward_curve(metrics: str | Path, key: str | None = None) -> tuple[list[int], list[float], str]:
    """(iterations, mean rewards, key used) from a run's metrics.jsonl (or the run folder).

    ``key``: default the first of :data:`REWARD_KEYS` the file has. Records without it (dropped
    batches, SFT iterations) are skipped; a file with none raises ValueError naming the keys seen.
    """
    from deploy.outputs import read_metrics

    p = Path(metrics)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise ValueError(f"{p}: no metrics file")
    records = read_metrics(p)
    keys = [key] if key is not None else list(REWARD_KEYS)
    for k in keys:
        pts = [
            (int(r["iteration"]), float(r[k]))
            for r in records
            if "iteration" in r and isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
        ]
        if pts:
            pts.sort()
            return [i for i, _ in pts], [v for _, v in pts], k
    seen = sorted({k for r in records for k in r})
    raise ValueError(f"{p}: no finite {' or '.join(keys)} in any record (keys seen: {seen[:20]})")


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    out, acc = np.empty_like(values), values[0]
    for i, v in enumerate(values):
        acc = alpha * acc + (1 - alpha) * v
        out[i] = acc
    return out


def pass_means(iterations: Sequence[int], values: Sequence[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` over aligned blocks of ``window`` iterations: [0, w), [w, 2w), ...

    With ``window`` = iterations per pass over the training data, each block holds every input
    once, so the block means are comparable (a single iteration's mean depends on which inputs it
    drew). Returns (block centre iterations, block means); blocks with no value are left out.
    """
    if window < 1:
        raise ValueError(f"window: expected >= 1 iteration, got {window}")
    its = np.asarray(iterations, dtype=np.int64)
    vals = np.asarray(values, dtype=np.float64)
    if its.shape != vals.shape:
        raise ValueError(f"pass_means: {its.size} iterations, {vals.size} values")
    blocks = its // window
    keys = np.unique(blocks)
    centres = np.array([k * window + (window - 1) / 2 for k in keys], dtype=np.float64)
    means = np.array([vals[blocks == k].mean() for k in keys], dtype=np.float64)
    return centres, means


def reward_curves_figure(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Reward curves",
    ylabels: Mapping[str, str] | None = None,
    smoothing: float = 0.6,
    pass_window: int | None = None,
    baselines: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
) -> Path:
    """Figure 6 style: one panel per run, the mean reward per iteration (thin) and its EMA with
    weight ``smoothing`` (thick). ``curves``: {run label: (iterations, mean rewards)}.

    ``pass_window``: iterations per pass over the training data; the thick line is then the mean
    over each pass (:func:`pass_means`) instead of the EMA. ``baselines``: {run label: (iterations,
    rewards)} of the untouched base policy on the same inputs and noise, drawn grey in that panel."""
    if not curves:
        raise ValueError("reward_curves_figure: no curves")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing: expected in [0, 1), got {smoothing}")
    plt = _plt()
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (ax, (label, (its, vals))) in enumerate(zip(axes[0], curves.items())):
        x, y = np.asarray(its, dtype=np.float64), np.asarray(vals, dtype=np.float64)
        if x.size == 0 or x.size != y.size:
            raise ValueError(
                f"reward_curves_figure: {label}: {x.size} iterations, {y.size} rewards"
            )
        c = colors[i % len(colors)]
        ax.plot(x, y, color=c, alpha=0.35, lw=1, marker="o" if x.size < 30 else None, ms=3)
        series = [(x, y, c, "")]
        if baselines and label in baselines:
            bx, by = (np.asarray(a, dtype=np.float64) for a in baselines[label])
            ax.plot(bx, by, color="0.5", alpha=0.35, lw=1)
            series.append((bx, by, "0.4", "base, same draws: "))
        for sx, sy, sc, prefix in series:
            if pass_window is not None:
                px, py = pass_means(sx.astype(np.int64), sy, pass_window)
                ax.plot(px, py, color=sc, lw=2.2, marker="s", ms=4,
                        label=f"{prefix}mean per data pass ({pass_window} it.)")
            else:
                ax.plot(sx, _ema(sy, smoothing), color=sc, lw=2.2, label=f"{prefix}EMA {smoothing}")
        ax.set_title(f"({chr(ord('a') + i)}) {label}", fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel((ylabels or {}).get(label, "mean reward"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=True, framealpha=0.8, loc="best")
    fig.suptitle(title, fontsize=11)
    return _save(plt, fig, path)


# ------------------------------------------------------------------------------------------ CLI
def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        label, sep, value = item.partition("=")
        if not sep or not label or not value:
            raise SystemExit(f"error: {flag} {item!r}: expected LABEL=PATH")
        out[label] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.figures", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="figure", required=True)
    f1 = sub.add_parser(
        "iqa", help="Figure 1: IQA-score distributions (GT vs arms) from results.json files"
    )
    f1.add_argument(
        "--results",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="an arm: label and its results.json (or folder); repeat, e.g. base=... RL=...",
    )
    f1.add_argument("--out", type=Path, required=True)
    f1.add_argument("--title", default="IQA scores: ground truth vs outputs")
    f6 = sub.add_parser("rewards", help="Figure 6: reward curves of runs from metrics.jsonl files")
    f6.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a run: label and its metrics.jsonl (or run folder); repeat",
    )
    f6.add_argument(
        "--key", default=None, help=f"metrics key (default: first of {list(REWARD_KEYS)})"
    )
    f6.add_argument("--out", type=Path, required=True)
    f6.add_argument("--title", default="Reward curves")
    f6.add_argument("--pass-window", type=int, default=None, metavar="N",
                    help="iterations per pass over the training data: plot the mean per pass, not an EMA")
    args = parser.parse_args(argv)
    try:
        if args.figure == "iqa":
            path = iqa_distribution_figure(
                iqa_groups_from_results(_pairs(args.results, "--results")),
                args.out,
                title=args.title,
            )
        else:
            curves = {}
            for label, p in _pairs(args.run, "--run").items():
                its, vals, _ = reward_curve(p, args.key)
                curves[label] = (its, vals)
            path = reward_curves_figure(curves, args.out, title=args.title, pass_window=args.pass_window)
    except ValueError as err:
        print(f"error: {err}", file=__import__("sys").stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
