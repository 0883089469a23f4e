"""How much of one rollout batch's policy gradient is signal? (issue 12 item 2's diagnosis)

    python -m benchmarks.gradient_snr [--batches 6] [--set KEY=VALUE ...] [--base-set KEY=VALUE ...]

From the demo's cached SFT policy, with the learning benchmark's settings (``benchmarks.learning``:
``TRAIN_OVERRIDES``, RL alone on its easy reward unless ``--set`` says otherwise), this samples
``--batches`` independent rollout batches with the *untouched* policy (new inputs and noise each)
and takes, for each, the learner's gradient of its loss with respect to the trainable weights:
the same advantages, losses and clipping as :meth:`learner.learner.Learner.optimize`, with the
optimizer step left out (the weights never change). From those gradients g_1..g_n:

* ``rho`` = mean_{i≠j} ⟨g_i, g_j⟩ / mean_i ‖g_i‖² — the share of one batch's gradient power that
  is signal. With E g_i = ḡ and per-trajectory noise Σ: ⟨g_i, g_j⟩ → ‖ḡ‖² (i ≠ j, independent
  batches) and ‖g_i‖² → ‖ḡ‖² + tr Σ / B. 1: every batch points the same way; 0: noise only.
* ``critical_batch`` = B (1 − ρ) / ρ — the batch size (trajectories) at which signal and noise power
  are equal (the "simple noise scale" of McCandlish et al., 2018); null when ρ ≤ 0.
* ``cos_to_rest_mean`` — the mean cosine between each g_i and the mean of the other n − 1 (a
  many-sample estimate of ḡ): how well one batch's step follows the direction all of them agree on.

What it measured (README "Does RL learn?"): at 16 trajectories, ρ ≈ 0 with absolute step rewards
(critical batch > 4000), 0.07 with ``step_reward=increment`` and 0.10 with ``adv_std=batch`` too.
The reward tracker keeps its history across the batches, as in training. Last line: one JSON
object (also ``benchmarks/results/gradient_snr.json`` unless ``--no-emit``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from benchmarks._common import emit


def gradient_snr(grads: torch.Tensor, batch_size: int) -> dict[str, float | None]:
    """ρ, the critical batch and the leave-one-out cosine of n independent batch gradients.

    Args:
        grads: [n, P] float, one flattened gradient per batch (n ≥ 2).
        batch_size: B, trajectories per batch (for the critical batch).
    """
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"gradient_snr: expected [n >= 2, P] gradients, got {list(grads.shape)}")
    g = grads.double()
    n = g.shape[0]
    gram = g @ g.T  # [n, n]
    power = gram.diagonal().mean()  # mean_i ‖g_i‖²
    cross = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))  # mean_{i≠j} ⟨g_i, g_j⟩
    rho = float(cross / power) if power > 0 else float("nan")
    rest = (g.sum(0, keepdim=True) - g) / (n - 1)  # [n, P] mean of the other n − 1
    cos = torch.nn.functional.cosine_similarity(g, rest, dim=1)  # [n]
    return {"rho": rho, "critical_batch": batch_size * (1 - rho) / rho if rho > 0 else None,
            "cos_to_rest_mean": float(cos.mean()), "grad_norm_mean": float(g.norm(dim=1).mean())}


def batch_gradients(cfg, batches: int, score) -> torch.Tensor:
    """[batches, P] — the learner's gradient on ``batches`` independent rollouts of the untouched
    policy of ``cfg`` (rounds 0..batches−1, the inputs the driver would draw), scored by ``score``."""
    from common.policy import build_policy
    from deploy.driver import input_ids_for_iteration
    from learner.learner import Learner
    from rollout.reward_sink import ThreadPoolSink
    from rollout.sampler import sample_trajectories
    from rollout.worker import sampler_settings

    learner = Learner(cfg.model, cfg.data, cfg.algorithm, cfg.learner)
    captured: list[torch.Tensor] = []

    def capture(stats: torch.Tensor) -> tuple[bool, float]:
        # In place of Learner._optimizer_step: keep the accumulated gradient, never step.
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in learner.params])
        captured.append(flat.detach().clone())
        learner.optimizer.zero_grad(set_to_none=True)
        return True, float(flat.norm())

    learner._optimizer_step = capture
    policy = build_policy(cfg.model, cfg.data.resolution).eval()
    settings = sampler_settings(cfg.rollout, cfg.algorithm)
    sink = ThreadPoolSink(score) if cfg.algorithm.uses_rl and cfg.algorithm.reward == "iqa" else None
    n_inputs = cfg.rollout.batch_size // cfg.rollout.samples_per_input
    try:
        for it in range(batches):
            ids = input_ids_for_iteration(it, n_inputs, len(learner.dataset), cfg.rollout.seed)
            control = np.stack([learner.dataset[i].lq for i in ids])
            traj = sample_trajectories(policy, control, ids, settings, policy_version=learner.version,
                                       seed=cfg.rollout.seed, round_index=it, sink=sink)
            learner.update(traj)
    finally:
        if sink is not None:
            sink.close()
    if len(captured) != batches * cfg.learner.ppo_epochs:
        raise RuntimeError(f"captured {len(captured)} gradients for {batches} batches")
    return torch.stack(captured[:: cfg.learner.ppo_epochs])  # the first epoch's: all at the sampling weights


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.learning import EASY_REWARD, TRAIN_OVERRIDES, _scorer_fn, arm_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6, help="independent rollout batches (n >= 2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides after TRAIN_OVERRIDES, rl_only and the easy reward (e.g. algorithm.step_reward=absolute)")
    ap.add_argument("--base-set", dest="base_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another starting policy, as benchmarks.learning --base-set")
    ap.add_argument("--no-emit", action="store_true", help="do not write benchmarks/results/gradient_snr.json")
    args = ap.parse_args(argv)
    if args.batches < 2:
        raise SystemExit("--batches: at least 2")

    torch.set_num_threads(1)  # as benchmarks.learning: faster than 2 on the tiny models
    cfg = arm_config([*TRAIN_OVERRIDES, "algorithm.mode=rl_only", *EASY_REWARD, *args.overrides], args.base_overrides)
    t0 = time.perf_counter()
    grads = batch_gradients(cfg, args.batches, _scorer_fn(cfg))
    a = cfg.algorithm
    figures: dict[str, Any] = {
        **gradient_snr(grads, cfg.rollout.batch_size), "batches": args.batches,
        "batch_size": cfg.rollout.batch_size, "params": int(grads.shape[1]),
        "step_reward": a.step_reward, "advantage_norm": a.advantage_norm, "adv_std": a.adv_std,
        "timestep_fraction": a.timestep_fraction, "mode": a.mode,
        "overrides": [*TRAIN_OVERRIDES, *args.overrides], "base_overrides": args.base_overrides,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(f"rho {figures['rho']:+.4f}  critical batch {figures['critical_batch']}  "
          f"cos to the other batches' mean {figures['cos_to_rest_mean']:+.4f}  ({args.batches} batches × "
          f"{cfg.rollout.batch_size} trajectories, {figures['params']} weights)", flush=True)
    emit("gradient_snr", figures, write=not args.no_emit)
    return figures


if __name__ == "__main__":
    main()
