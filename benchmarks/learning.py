"""Does RL learn? Paired reward gains from the demo's SFT policy (DESIGN.md §8, issue 12).

    python -m benchmarks.learning [--iterations 8] [--eval-seeds 3] [--iqa-model DIR] [--jobs 2]

Each arm trains from the cached SFT policy of ``make demo`` (:func:`deploy.demo.demo_rl_config`)
for a fixed budget of iterations, in-process with the project's own rollout sampler and
:class:`learner.learner.Learner` (the same update, advantages and losses as the Ray job), then is
evaluated against the untouched base policy on the SAME draws: the same training inputs and the
same noise (``rollout.sampler.trajectory_seed`` of a round never used in training), one fixed
sampler for every policy (the base config's K, η and action target), the final output scored
by the arm's reward. The headline figure of an arm is the mean paired gain
d = r(trained, draw) − r(base, draw) over the draws, with its standard error over draws.

Arms (the reward of each is a list of config overrides: ``EASY_REWARD``, ``iqa_reward``):

* ``rl_easy``, ``adaptive_easy`` — RL alone (``algorithm.mode=rl_only``) and the paper's adaptive
  mode on an easily optimised offline reward: pyiqa's ``entropy`` of the grey-level histogram
  (no weights, deterministic; the low-light restorations score about 0.87 of its 0-8 range, and
  brighter, higher-contrast outputs score higher). On it the SFT half of the adaptive mode may
  rightly pull against the reward: reported only.
* ``rl_null_easy`` — the null control: RL alone on the easy reward with the advantages shuffled
  across the batch's samples (the same update size, no signal). The paired SE over draws is
  evaluation noise only: a signal-free update moves the reward by many SE too (measured: −7 SE
  after 8 iterations), so ``rl_gain_easy_over_null`` = gain / |null gain| is the figure that says
  the gain is learned. ``--no-null`` skips it.
* ``rl_iqa``, ``adaptive_iqa``, ``rl_null_iqa`` — the same on the trained IQA model
  (``--iqa-model DIR``: a local VLM folder scored with the transformers backend; ``--iqa-set``
  adds overrides), with its own null control (``rl_gain_iqa_over_null``). Reported as null
  without it.
* ``sft_iqa``, ``adaptive_null_iqa`` — +Diff.SFT (``sft_only``: no reward in training, the IQA
  model only scores) and the adaptive mode with its advantages shuffled. With ``--eval-split
  test`` (the held-out split) ``adaptive_minus_sft_iqa`` ± SE is the study's Original vs
  +Diff.SFT question, paired on the same draws; ``--base-set`` picks another starting policy.

The training settings every arm shares are ``TRAIN_OVERRIDES`` (see the comments there for the
measurement behind each). Wall time: about 4.5 min per arm (8 iterations × 16 trajectories, then
2 × 48 evaluation draws) on one free core; ``--jobs 2`` trains two arms at once (one torch thread
each). Measured 2026-12-01: the three easy arms in 14.5 min with ``--jobs 2`` on 2 cores that a
second training job shared; with ``--iqa-model`` six arms (not timed together: the two IQA RL
arms with ``--jobs 2 --eval-seeds 6`` took 8.5 min); ``--no-null`` drops both null arms.

Last line: one JSON object, also written to ``benchmarks/results/learning.json``.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import emit, print_table

#: An easily optimised offline no-reference reward (works without downloads, deterministic).
EASY_REWARD: tuple[str, ...] = ("reward.backend=pyiqa", "reward.pyiqa_metric=entropy")

#: Settings every arm trains with (on top of the demo config and the algorithm defaults, which
#: since issue 12 include ``step_reward=increment`` and ``adv_std=batch``). Measured on this
#: benchmark (rl_only, entropy reward, 8 iterations, paired gain over the base policy):
#: lr 3e-3 → 1e-2 multiplied the gain by about 3 with increments (see the closing note of issue 12).
TRAIN_OVERRIDES: tuple[str, ...] = (
    "data.num_synthetic=16",  # 16 training inputs
    "rollout.samples_per_input=4",  # G = 4 samples per input ...
    "rollout.batch_size=16",  # ... of 4 inputs per update: a pass over the data every 4 iterations
    "learner.micro_batch_size=8",
    "learner.lr=0.01",  # LoRA r = 4 on the tiny ControlNet: 1e-4 (the default, for real models) barely moves it
    "logging.progress=false",
)

#: Round index of the evaluation draws: never a training round (those are 0..iterations−1), nor
#: the driver's preview round.
EVAL_ROUND = 2_000_000
#: Base seed of the evaluation noise (with the input id, sample index and EVAL_ROUND).
EVAL_SEED = 12345


def iqa_reward(model_dir: str | Path, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """Overrides that score with a trained IQA model folder in-process (transformers backend)."""
    return ("reward.backend=transformers", "reward.model_kind=local", f"reward.model_path={Path(model_dir).resolve()}",
            "reward.dtype=float32", *extra)


@dataclass(frozen=True)
class Arm:
    name: str
    mode: str
    reward: tuple[str, ...]
    null: bool = False


# ---------------------------------------------------------------------------------- config
@functools.lru_cache(maxsize=4)
def _base_config(base_overrides: tuple[str, ...]) -> dict[str, Any]:
    """The demo's RL config as a dict, from the SFT policy that ``base_overrides`` (overrides of the
    demo config itself, ``--base-set``, e.g. ``learner.sft_steps=2400``) select: trained on first
    use, then cached. apply_overrides copies it, so callers never change the cached dict."""
    from common.config import load_config
    from deploy.demo import DEMO_CONFIG, demo_rl_config

    return demo_rl_config(load_config(DEMO_CONFIG, [*EASY_REWARD, *base_overrides])).model_dump(mode="json")


def arm_config(overrides: list[str] | tuple[str, ...], base_overrides: list[str] | tuple[str, ...] = ()):
    """The demo's RL config from the cached SFT policy, with ``overrides`` applied on top.

    The SFT checkpoint is looked up with the demo config's model, data and learner sections as
    they are (its cache key hashes them) after ``base_overrides``: ``overrides`` of those sections
    must not retrain it. The demo's own reward is replaced first (with ``EASY_REWARD``), so nothing
    trains an IQA model.
    """
    from common.config import apply_overrides, parse_config

    return parse_config(apply_overrides(_base_config(tuple(base_overrides)), list(overrides)),
                        source="benchmarks.learning")


def _scorer_fn(cfg):
    from reward_server.factory import build_scorer_from_config

    scorer = build_scorer_from_config(cfg.reward, device="cpu")
    return lambda images: np.asarray(scorer.score(list(images)).scores, dtype=np.float64)


# ---------------------------------------------------------------------------------- train / eval
def _permuted(update, seed: int):
    """The tracker's ``update`` with its advantages shuffled across the batch's samples: the
    null control (the same update, the same advantage distribution, no relation to the actions)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def shuffled(input_ids, rewards, steps=None):
        adv = update(input_ids, rewards, steps)  # [B, R]
        return adv[torch.randperm(adv.shape[0], generator=gen)]

    return shuffled


def train(cfg, iterations: int, score, null: bool = False) -> tuple[Any, list[dict[str, float]]]:
    """``iterations`` of rollout → update → weight copy; returns the trained rollout policy.

    ``null``: the advantages are shuffled across samples (:func:`_permuted`) — the control that
    says how large a paired "gain" an update of the same size but no signal produces."""
    from common.policy import build_policy
    from deploy.driver import input_ids_for_iteration
    from learner.learner import Learner
    from rollout.reward_sink import ThreadPoolSink
    from rollout.sampler import sample_trajectories
    from rollout.worker import sampler_settings

    learner = Learner(cfg.model, cfg.data, cfg.algorithm, cfg.learner)
    if null:
        learner.tracker.update = _permuted(learner.tracker.update, cfg.learner.seed)
    policy = build_policy(cfg.model, cfg.data.resolution).eval()
    settings = sampler_settings(cfg.rollout, cfg.algorithm)
    sink = ThreadPoolSink(score) if cfg.algorithm.uses_rl and cfg.algorithm.reward == "iqa" else None
    n_inputs = cfg.rollout.batch_size // cfg.rollout.samples_per_input
    curve = []
    try:
        for it in range(iterations):
            ids = input_ids_for_iteration(it, n_inputs, len(learner.dataset), cfg.rollout.seed)
            control = np.stack([learner.dataset[i].lq for i in ids])
            traj = sample_trajectories(policy, control, ids, settings, policy_version=learner.version,
                                       seed=cfg.rollout.seed, round_index=it, sink=sink)
            m = learner.update(traj)
            policy.load_trainable_state_dict(learner.get_weights()[1])
            curve.append({"iteration": it, **{k: float(m[k]) for k in (
                "reward/final_mean", "losses/approx_kl", "losses/clipfrac", "advantages/std") if k in m}})
    finally:
        if sink is not None:
            sink.close()
    return policy, curve


def eval_images(policy, cfg, eval_seeds: int, split: str = "train") -> np.ndarray:
    """uint8 [N·S, H, W, 3] final outputs on every input of ``split`` × ``eval_seeds`` noise draws,
    with the base config's sampler (one sampler for every policy: a fair comparison). ``train``:
    the inputs RL trained on (does the update learn?); ``test``: the held-out split (does it
    generalise? the study's question)."""
    from common.data import build_dataset
    from rollout.sampler import SamplerSettings, sample_trajectories

    dataset = build_dataset(cfg.data, split)
    ids = list(range(len(dataset)))
    settings = SamplerSettings(num_inference_steps=cfg.rollout.num_inference_steps, eta=cfg.rollout.eta,
                               samples_per_input=eval_seeds, reward_steps="last",
                               policy_target=cfg.algorithm.policy_target)
    control = np.stack([dataset[i].lq for i in ids])
    traj = sample_trajectories(policy, control, ids, settings, policy_version=0, seed=EVAL_SEED,
                               round_index=EVAL_ROUND)
    return traj.final_images.numpy()


def paired(trained: np.ndarray, base: np.ndarray, eval_seeds: int) -> dict[str, float]:
    """Mean paired gain, its SE over draws, and the SE over inputs (draws of one input averaged)."""
    d = trained - base  # [N·S], draw b = input·S + seed
    per_input = d.reshape(-1, eval_seeds).mean(axis=1)
    se = float(d.std(ddof=1) / np.sqrt(d.size))
    se_inputs = float(per_input.std(ddof=1) / np.sqrt(per_input.size))
    gain = float(d.mean())
    return {"gain": gain, "se": se, "gain_over_se": gain / se if se > 0 else float("inf"),
            "se_over_inputs": se_inputs, "base": float(base.mean()), "trained": float(trained.mean()),
            "base_std": float(base.std()), "draws": int(d.size), "win_rate": float((d > 0).mean())}


def run_arm(arm: Arm, iterations: int, eval_seeds: int, extra: tuple[str, ...],
            split: str = "train", base_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one arm and evaluate it and the base policy on the same draws (one process)."""
    import torch

    from common.policy import build_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured (benchmarks.system): faster than 2 on these tiny models
    try:
        t0 = time.perf_counter()
        cfg = arm_config([*TRAIN_OVERRIDES, f"algorithm.mode={arm.mode}", *arm.reward, *extra], base_overrides)
        score = _scorer_fn(cfg)
        policy, curve = train(cfg, iterations, score, null=arm.null)
        t_train = time.perf_counter() - t0
        base = build_policy(cfg.model, cfg.data.resolution).eval()
        r_base = score(eval_images(base, cfg, eval_seeds, split))
        r_trained = score(eval_images(policy, cfg, eval_seeds, split))
    finally:
        torch.set_num_threads(threads)
    return {"arm": arm.name, "mode": arm.mode, "reward": list(arm.reward), "iterations": iterations,
            **paired(r_trained, r_base, eval_seeds), "train_s": round(t_train, 1),
            "scores": [round(float(x), 7) for x in r_trained],
            "seconds": round(time.perf_counter() - t0, 1), "curve": curve}


def _run_arm_star(args):
    return run_arm(*args)


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=8, help="training iterations per arm")
    ap.add_argument("--eval-seeds", type=int, default=3, help="noise draws per training input in the evaluation")
    ap.add_argument("--iqa-model", default=None, metavar="DIR", help="trained IQA model folder: runs the IQA arms")
    ap.add_argument("--iqa-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides of the IQA reward (e.g. reward.preset=...)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides for every arm (after TRAIN_OVERRIDES)")
    ap.add_argument("--base-set", dest="base_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides of the demo config before its SFT pre-training is looked up: another starting "
                         "policy (e.g. learner.sft_steps=2400; trained on first use, then cached)")
    ap.add_argument("--arms", default=None, help="comma-separated subset of the arms to run")
    ap.add_argument("--jobs", type=int, default=2, help="arms trained at once (one process each)")
    ap.add_argument("--no-null", action="store_true", help="skip the null control arms (advantages shuffled)")
    ap.add_argument("--eval-split", choices=("train", "test"), default="train",
                    help="inputs of the evaluation draws: the training inputs (does RL learn?) or the held-out "
                         "test split (does it generalise? with --iqa-model the sft_iqa arm compares the paper's "
                         "Original with +Diff.SFT there, as the study does)")
    ap.add_argument("--no-emit", action="store_true", help="do not write benchmarks/results/learning.json")
    args = ap.parse_args(argv)

    arms = [Arm("rl_easy", "rl_only", EASY_REWARD), Arm("adaptive_easy", "adaptive", EASY_REWARD)]
    if not args.no_null:
        arms.append(Arm("rl_null_easy", "rl_only", EASY_REWARD, null=True))
    if args.iqa_model is not None:
        iqa = iqa_reward(args.iqa_model, args.iqa_set)
        arms += [Arm("rl_iqa", "rl_only", iqa), Arm("adaptive_iqa", "adaptive", iqa),
                 Arm("sft_iqa", "sft_only", iqa)]
        if not args.no_null:
            arms += [Arm("rl_null_iqa", "rl_only", iqa, null=True),
                     Arm("adaptive_null_iqa", "adaptive", iqa, null=True)]
    if args.arms:
        wanted = args.arms.split(",")
        unknown = sorted(set(wanted) - {a.name for a in arms})
        if unknown:
            raise SystemExit(f"--arms: unknown or disabled arm(s) {unknown}; have {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in wanted]
    arm_config([], args.base_overrides)  # the cached VAE and SFT policy, once, before any worker starts

    t0 = time.perf_counter()
    jobs = [(a, args.iterations, args.eval_seeds, tuple(args.overrides), args.eval_split, tuple(args.base_overrides))
            for a in arms]
    if args.jobs > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            results = pool.map(_run_arm_star, jobs, chunksize=1)
    else:
        results = [run_arm(*j) for j in jobs]
    wall = time.perf_counter() - t0
    by_name = {r["arm"]: r for r in results}

    print_table(
        f"paired gain over the base policy on the same draws ({args.eval_seeds} noise draws × "
        f"the {args.eval_split} inputs, fresh noise), after {args.iterations} iterations",
        [(r["arm"], f"{r['base']:.4f}", f"{r['trained']:.4f}", f"{r['gain']:+.5f}", f"{r['se']:.5f}",
          f"{r['gain_over_se']:+.1f}", f"{r['se_over_inputs']:.5f}", f"{r['win_rate']:.2f}", f"{r['seconds']:.0f}")
         for r in results],
        ("arm", "base", "trained", "gain", "SE", "gain/SE", "SE(inputs)", "win rate", "seconds"),
    )

    def fig(name: str, key: str):
        r = by_name.get(name)
        return None if r is None else round(r[key], 6)

    def over_null(arm: str, null: str):
        if arm not in by_name or null not in by_name:
            return None
        return round(by_name[arm]["gain"] / max(abs(by_name[null]["gain"]), 1e-12), 3)

    def arm_minus(arm: str, ref: str):
        """Paired (arm − ref) on the same draws: both arms are evaluated on identical inputs and noise."""
        if arm not in by_name or ref not in by_name:
            return None, None
        d = paired(np.asarray(by_name[arm]["scores"]), np.asarray(by_name[ref]["scores"]), args.eval_seeds)
        return round(d["gain"], 6), round(d["se"], 6)

    adaptive_minus_sft, adaptive_minus_sft_se = arm_minus("adaptive_iqa", "sft_iqa")
    figures = {
        "rl_gain_easy": fig("rl_easy", "gain"), "rl_gain_easy_over_se": fig("rl_easy", "gain_over_se"),
        "rl_gain_iqa": fig("rl_iqa", "gain"), "rl_gain_iqa_over_se": fig("rl_iqa", "gain_over_se"),
        "adaptive_gain_iqa": fig("adaptive_iqa", "gain"),
        "adaptive_gain_iqa_over_se": fig("adaptive_iqa", "gain_over_se"),
        "adaptive_gain_easy": fig("adaptive_easy", "gain"),
        "adaptive_gain_easy_over_se": fig("adaptive_easy", "gain_over_se"),
        # The null control: the same RL update with the advantages shuffled across samples. Its
        # |gain| is what an update of this size moves the reward with no signal in it; a real gain
        # must clear it as well as 3 SE (the SE is evaluation noise only).
        "rl_null_gain_easy": fig("rl_null_easy", "gain"),
        "rl_null_gain_easy_over_se": fig("rl_null_easy", "gain_over_se"),
        "rl_gain_easy_over_null": over_null("rl_easy", "rl_null_easy"),
        "rl_null_gain_iqa": fig("rl_null_iqa", "gain"),
        "rl_null_gain_iqa_over_se": fig("rl_null_iqa", "gain_over_se"),
        "rl_gain_iqa_over_null": over_null("rl_iqa", "rl_null_iqa"),
        # The paper's Original over +Diff.SFT (Table 1's question) on the same draws: with
        # --eval-split test, the study's comparison at a fraction of its cost.
        "sft_gain_iqa": fig("sft_iqa", "gain"), "sft_gain_iqa_over_se": fig("sft_iqa", "gain_over_se"),
        "adaptive_minus_sft_iqa": adaptive_minus_sft, "adaptive_minus_sft_iqa_se": adaptive_minus_sft_se,
        "eval_split": args.eval_split,
        "target_over_se": 3.0,
        "iterations": args.iterations, "eval_seeds": args.eval_seeds,
        "train_overrides": [*TRAIN_OVERRIDES, *args.overrides], "base_overrides": args.base_overrides,
        "easy_reward": list(EASY_REWARD),
        "iqa_model": None if args.iqa_model is None else str(Path(args.iqa_model).resolve()),
        "wall_s": round(wall, 1), "jobs": args.jobs,
        "arms": {r["arm"]: {k: v for k, v in r.items() if k != "arm"} for r in results},
    }
    emit("learning", figures, write=not args.no_emit)
    return figures


if __name__ == "__main__":
    main()
