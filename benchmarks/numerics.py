"""The PPO ratio before any update, through the learner itself (issue 14, item 2).

    python -m benchmarks.numerics [--resolution 32] [--steps 4] [--inputs 4]

With the paper's clip ε = 1e-4 on per-element-mean log-probs, log π_old must be reproduced far
better than 1e-4, or PPO silently drops the gradient of every entry outside the clip before the
policy has moved at all. Trajectories of the tiny policy are sampled in fp32 and in bf16 (the
rollout's ``model.dtype``); each is handed to a fresh learner (same initial weights, fp32 or
bf16 autocast: ``learner.precision``), with ``learner.recompute_old_log_prob`` on and off. The
learner reports the max |log ρ| of its first pass (``losses/first_max_abs_log_ratio``) and the
share of entries clipped there. Headline figures: ``fp32_max_abs_log_ratio`` and
``bf16_max_abs_log_ratio`` (the shipped default: recompute on; bf16 = bf16 rollout + bf16
learner, the GPU config), beside the same without the recompute.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks._common import emit, print_table
from common.config import AlgorithmConfig, DataConfig, LearnerConfig, ModelConfig
from common.data import build_dataset
from common.policy import build_policy
from learner.learner import Learner
from rollout.sampler import SamplerSettings, sample_trajectories


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--inputs", type=int, default=4)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = DataConfig(resolution=args.resolution, num_synthetic=args.inputs, num_test=1)
    dataset = build_dataset(data, "train")
    control = np.stack([dataset[i].lq for i in range(args.inputs)])
    settings = SamplerSettings(num_inference_steps=args.steps, eta=1.0, samples_per_input=2, reward_steps="last",
                               policy_target="standard")
    algorithm = AlgorithmConfig(mode="rl_only", policy_target="standard", kl_coef=0.0, clip_range=1e-4,
                                timestep_fraction=1.0, reward="reconstruction")
    rows, figures = [], {}
    for rollout_dtype in ("float32", "bfloat16"):
        policy = build_policy(ModelConfig(kind="tiny", dtype=rollout_dtype), args.resolution).eval()
        traj = sample_trajectories(policy, control, list(range(args.inputs)), settings, policy_version=0, seed=0)
        for precision in ("fp32", "bf16"):
            for recompute in (True, False):
                learner = Learner(ModelConfig(kind="tiny"), data, algorithm,
                                  LearnerConfig(precision=precision, recompute_old_log_prob=recompute))
                m = learner.update(traj)
                key = f"{'fp32' if rollout_dtype == 'float32' else 'bf16'}_rollout_{precision}_learner" + (
                    "" if recompute else "_no_recompute")
                figures[f"{key}_max_abs_log_ratio"] = m["losses/first_max_abs_log_ratio"]
                figures[f"{key}_clipfrac"] = m["losses/clipfrac"]
                rows.append((rollout_dtype, precision, "on" if recompute else "off",
                             f"{m['losses/first_max_abs_log_ratio']:.2e}", f"{m['losses/clipfrac']:.3f}",
                             f"{m.get('learner/rollout_log_ratio_max', float('nan')):.2e}"))
    print_table(f"first-pass PPO ratio (clip 1e-4), tiny policy, {args.resolution}px, K={args.steps}, "
                f"{2 * args.inputs} trajectories", rows,
                ("rollout", "learner", "recompute", "max |log ρ|", "clipfrac", "rollout vs learner max"))
    figures["fp32_max_abs_log_ratio"] = figures["fp32_rollout_fp32_learner_max_abs_log_ratio"]
    figures["bf16_max_abs_log_ratio"] = figures["bf16_rollout_bf16_learner_max_abs_log_ratio"]
    figures["bf16_max_abs_log_ratio_before_fix"] = figures["bf16_rollout_bf16_learner_no_recompute_max_abs_log_ratio"]
    figures["bf16_clipfrac_before_fix"] = figures["bf16_rollout_bf16_learner_no_recompute_clipfrac"]
    figures.update(resolution=args.resolution, num_inference_steps=args.steps)
    emit("numerics", figures)
    return figures


if __name__ == "__main__":
    main()
