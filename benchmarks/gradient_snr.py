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
* ``--split-terms`` (a mode that mixes RL and SFT, e.g. ``--set algorithm.mode=adaptive``): each
  term's gradient alone on the same batches, and how the mean step splits between them
  (:func:`term_signal`: ``rl_signal_norm``, ``sft_signal_norm``, ``rl_over_sft_signal``,
  ``rl_sft_signal_cos``, ``rl_noise_norm``; ``rl_rho``, ``sft_rho``).

What it measured (README "Does RL learn?"): at 16 trajectories, ρ ≈ 0 with absolute step rewards
(critical batch > 4000), 0.07 with ``step_reward=increment`` and 0.10 with ``adv_std=batch`` too.
The reward tracker keeps its history across the batches, as in training. Last line: one JSON
object (also ``benchmarks/results/gradient_snr.json`` unless ``--no-emit``).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch

from benchmarks._common import emit


def _cross_mean(x: torch.Tensor, y: torch.Tensor) -> float:
    """mean_{i≠j} ⟨x_i, y_j⟩ of two [n, P] stacks: over independent batches, an estimate of
    ⟨x̄, ȳ⟩ without the batches' own noise."""
    n = x.shape[0]
    gram = x @ y.T  # [n, n]
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


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
    power = float(g.square().sum(dim=1).mean())  # mean_i ‖g_i‖²
    cross = _cross_mean(g, g)  # mean_{i≠j} ⟨g_i, g_j⟩
    rho = cross / power if power > 0 else float("nan")
    rest = (g.sum(0, keepdim=True) - g) / (n - 1)  # [n, P] mean of the other n − 1
    cos = torch.nn.functional.cosine_similarity(g, rest, dim=1)  # [n]
    return {"rho": rho, "critical_batch": batch_size * (1 - rho) / rho if rho > 0 else None,
            "cos_to_rest_mean": float(cos.mean()), "grad_norm_mean": float(g.norm(dim=1).mean())}


def term_signal(rl: torch.Tensor, sft: torch.Tensor) -> dict[str, float | None]:
    """How the mean update splits between the RL and the SFT term (the paper's eq. 10 mixes them).

    ``rl``, ``sft``: [n, P], the gradient of each term alone on the same n independent batches
    (their sum is the update's gradient). Cross terms over independent batches (i ≠ j) estimate
    the mean gradients without their noise: mean_{i≠j} ⟨a_i, b_j⟩ → ⟨ā, b̄⟩. Returns
    ``rl_signal_norm`` ≈ ‖ḡ_rl‖ and ``sft_signal_norm`` ≈ ‖ḡ_sft‖ (null when the estimate of the
    square is ≤ 0: no signal within noise), ``rl_noise_norm`` ≈ √(tr Σ_rl / B), one batch's RL
    noise, ``rl_over_sft_signal`` (the RL share of the mean step), and ``rl_sft_signal_cos``:
    whether the two terms' mean directions agree (1), are unrelated (0) or pull apart (−1); and
    ``rl_rho``, ``sft_rho``, each term's ρ as :func:`gradient_snr` defines it.
    """
    if rl.shape != sft.shape or rl.dim() != 2 or rl.shape[0] < 2:
        raise ValueError(f"term_signal: expected two [n >= 2, P] gradients, got {list(rl.shape)}, {list(sft.shape)}")
    a, b = rl.double(), sft.double()
    aa, bb, ab = _cross_mean(a, a), _cross_mean(b, b), _cross_mean(a, b)
    rl_power, sft_power = float(a.square().sum(dim=1).mean()), float(b.square().sum(dim=1).mean())
    rl_sig = math.sqrt(aa) if aa > 0 else None
    sft_sig = math.sqrt(bb) if bb > 0 else None
    return {
        "rl_signal_norm": rl_sig, "sft_signal_norm": sft_sig,
        "rl_noise_norm": math.sqrt(max(rl_power - max(aa, 0.0), 0.0)),  # no signal within noise: all noise
        "rl_over_sft_signal": rl_sig / sft_sig if rl_sig is not None and sft_sig else None,
        "rl_sft_signal_cos": ab / (rl_sig * sft_sig) if rl_sig and sft_sig else None,
        "rl_rho": aa / rl_power if rl_power > 0 else float("nan"),
        "sft_rho": bb / sft_power if sft_power > 0 else float("nan"),
    }


def _zero_weight(w: torch.Tensor) -> torch.Tensor:
    """A loss term's per-sample weight 0: the term is computed (same random draws) but adds nothing."""
    return torch.zeros_like(w)


def batch_gradients(cfg, batches: int, score, *, split_terms: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """[batches, P] — the learner's gradient on ``batches`` independent rollouts of the untouched
    policy of ``cfg`` (rounds 0..batches−1, the inputs the driver would draw), scored by ``score``.

    ``split_terms`` (a mode with both an RL and an SFT term): {"total", "rl", "sft"} → [batches, P],
    each batch's gradient of the whole loss and of each term alone — the same prepared batch
    (rewards, advantages, weights, tracker moved once), the same random draws (the learner's
    generator state restored), the other term's weight set to 0. The KL rides with "rl"; at the
    untouched policy its gradient is exactly zero.
    """
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
    parts = {}
    if split_terms:
        total = learner.terms
        if not (total.uses_rl and total.uses_sft):
            raise ValueError(f"split_terms: algorithm.mode={cfg.algorithm.mode!r} does not mix an RL and an SFT term")
        parts = {"total": total, "rl": total._replace(sft_weight_fn=_zero_weight),
                 "sft": total._replace(rl_weight_fn=_zero_weight)}
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
            if not split_terms:
                learner.update(traj)
                continue
            learner.prepare(traj)
            prepared, draws, version = learner._prepared, learner.generator.get_state(), learner.version
            for terms in parts.values():
                learner.terms, learner._prepared, learner._version = terms, prepared, version
                learner.generator.set_state(draws)
                learner.optimize()
            learner.terms = parts["total"]
    finally:
        if sink is not None:
            sink.close()
    per_batch = len(parts) if split_terms else 1
    if len(captured) != batches * cfg.learner.ppo_epochs * per_batch:
        raise RuntimeError(f"captured {len(captured)} gradients for {batches} batches")
    first = captured[:: cfg.learner.ppo_epochs]  # the first epoch's: all at the sampling weights
    if not split_terms:
        return torch.stack(first)
    return {name: torch.stack(first[k::per_batch]) for k, name in enumerate(parts)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.learning import EASY_REWARD, TRAIN_OVERRIDES, _scorer_fn, arm_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6, help="independent rollout batches (n >= 2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides after TRAIN_OVERRIDES, rl_only and the easy reward (e.g. algorithm.step_reward=absolute)")
    ap.add_argument("--base-set", dest="base_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another starting policy, as benchmarks.learning --base-set")
    ap.add_argument("--split-terms", action="store_true",
                    help="a mode with RL and SFT terms (e.g. --set algorithm.mode=adaptive): also each term's "
                         "gradient alone, and how the mean step splits between them (term_signal)")
    ap.add_argument("--no-emit", action="store_true", help="do not write benchmarks/results/gradient_snr.json")
    args = ap.parse_args(argv)
    if args.batches < 2:
        raise SystemExit("--batches: at least 2")

    torch.set_num_threads(1)  # as benchmarks.learning: faster than 2 on the tiny models
    cfg = arm_config([*TRAIN_OVERRIDES, "algorithm.mode=rl_only", *EASY_REWARD, *args.overrides], args.base_overrides)
    t0 = time.perf_counter()
    grads = batch_gradients(cfg, args.batches, _scorer_fn(cfg), split_terms=args.split_terms)
    split: dict[str, Any] = {}
    if args.split_terms:
        parts, grads = grads, grads["total"]
        split = term_signal(parts["rl"], parts["sft"])
    a = cfg.algorithm
    figures: dict[str, Any] = {
        **gradient_snr(grads, cfg.rollout.batch_size), **split, "batches": args.batches,
        "batch_size": cfg.rollout.batch_size, "params": int(grads.shape[1]),
        "step_reward": a.step_reward, "advantage_norm": a.advantage_norm, "adv_std": a.adv_std,
        "timestep_fraction": a.timestep_fraction, "mode": a.mode,
        "overrides": [*TRAIN_OVERRIDES, *args.overrides], "base_overrides": args.base_overrides,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(f"rho {figures['rho']:+.4f}  critical batch {figures['critical_batch']}  "
          f"cos to the other batches' mean {figures['cos_to_rest_mean']:+.4f}  ({args.batches} batches × "
          f"{cfg.rollout.batch_size} trajectories, {figures['params']} weights)", flush=True)
    if split:
        fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
        print(f"mean step: RL {fmt(split['rl_signal_norm'])} (one batch's RL noise {fmt(split['rl_noise_norm'])}), "
              f"SFT {fmt(split['sft_signal_norm'])}; RL / SFT {fmt(split['rl_over_sft_signal'])}, "
              f"cos {fmt(split['rl_sft_signal_cos'])}", flush=True)
    emit("gradient_snr", figures, write=not args.no_emit)
    return figures


if __name__ == "__main__":
    main()
