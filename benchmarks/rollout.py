"""Rollout throughput of the tiny policy on this machine (DESIGN.md §8).

    python -m benchmarks.rollout [--resolution 64] [--steps 4] [--rounds 3]

Denoising steps per second (trajectory-steps: batch × K / wall time, reward decoding included)
at batch 1, 4 and 8, and ``enhanced_cost_ratio`` = time of a batch with the enhanced action
target (§2.2: two UNet+ControlNet evaluations per step) / time with the standard one, measured
interleaved in the same run.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks._common import emit, interleaved, print_table
from common.config import ModelConfig
from common.policy import build_policy
from rollout.sampler import SamplerSettings, sample_trajectories


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    policy = build_policy(ModelConfig(), args.resolution).eval()
    rng = np.random.default_rng(0)

    def run(batch: int, target: str):
        control = rng.integers(0, 256, (batch, args.resolution, args.resolution, 3), dtype=np.uint8)
        s = SamplerSettings(num_inference_steps=args.steps, samples_per_input=1, reward_steps="all",
                            policy_target=target)
        return lambda: sample_trajectories(policy, control, list(range(batch)), s, policy_version=0, seed=0)

    fns = {f"b{b}_{t}": run(b, t) for b in (1, 4, 8) for t in ("standard", "enhanced")}
    t = interleaved(fns, rounds=args.rounds)
    rows, figures = [], {}
    for b in (1, 4, 8):
        std, enh = t[f"b{b}_standard"]["min_s"], t[f"b{b}_enhanced"]["min_s"]
        sps = b * args.steps / std
        figures[f"steps_per_s_batch{b}"] = round(sps, 3)
        figures[f"enhanced_cost_ratio_batch{b}"] = round(enh / std, 3)
        rows.append((b, f"{std:.2f}", f"{sps:.2f}", f"{enh:.2f}", f"{enh / std:.2f}"))
    print_table(
        f"tiny policy rollout, {args.resolution}px, K={args.steps}, reward decode every step (best of {args.rounds})",
        rows, ("batch", "standard s", "steps/s", "enhanced s", "enhanced/standard"),
    )
    figures["enhanced_cost_ratio"] = figures["enhanced_cost_ratio_batch4"]
    figures.update(resolution=args.resolution, num_inference_steps=args.steps)
    emit("rollout", figures)
    return figures


if __name__ == "__main__":
    main()
