"""The Learner: rewards → advantages → difficulty weights → PPO + weighted SFT + KL → AdamW.

DESIGN.md §1, §2.3–§2.6; paper §4.2.4 eq. 10. One :meth:`Learner.update` per rollout batch:

1. rewards r [B, R]: the IQA scores on the trajectory (``algorithm.reward=iqa``), or
   r = −RMSE(x̂0_img, g) computed here where the ground truth is (``reconstruction``);
2. advantages A [B, R] from the reward tracker keyed on (input id, reward step), spread to the
   K steps [B, K] (§2.4);
3. difficulty weights w [B] = d_i / max_j d_j over the WHOLE batch (§2.5);
4. for each PPO epoch, each micro-batch of samples and each trained step: recompute the
   log-prob of the recorded action differentiably (two model calls for the enhanced target),
   the reference mean without gradient (KL), the PPO clipped loss, and once per micro-batch the
   SFT loss on the ground-truth latent; combine with ``total_loss`` and backward;
5. clip the gradient norm, step AdamW, ``version += 1``.

Normalisation (exact gradient accumulation): every backward is of a piece of

    L = (1/m) Σ_i [ a_i·L_diff,i + b_i·L_rl,i ] + β_KL·(1/m) Σ_i L_KL,i,

L_rl,i = (1/n) Σ_j ℓ_ij over the sample's n trained steps (likewise L_KL,i), m the FULL batch
size. Each trained step j contributes b_i·ℓ_ij/(n·m) (+ the KL analogue), and the SFT term
a_i·L_diff,i/m rides along with j = 0. The pieces are linear, so the accumulated gradient is the
gradient of L over the whole batch, whatever ``micro_batch_size``.

Data parallel (K learners, DESIGN.md §1): every rank receives the full batch and computes
rewards, advantages (so the tracker state stays identical on every rank), difficulty weights
and all random draws (trained steps, SFT timesteps and noise) for the whole batch from the same
seeded generator; rank r then trains on samples r, r+K, r+2K, ... The ranks SUM their gradients
(each already carries the 1/m of the full batch), so the step equals one learner on the whole
batch up to float summation order. The all-reduce goes over a stateless gloo/NCCL process
group (a TCP store on rank 0's node): the process's default torch.distributed group stays free
for the ray.util.collective weight-sync group of rank 0 (:mod:`common.weight_transport`).

Non-finite losses or gradients never reach the weights: the optimizer step is skipped (on
every rank alike: the decision is made after the all-reduce), counted in ``skipped_steps`` and
reported.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import AlgorithmConfig, DataConfig, LearnerConfig, ModelConfig
from common.data import build_dataset
from common.diffusion import policy_step
from common.placement import actor_resources
from common.policy import build_policy, images_to_tensor
from common.types import Trajectory
from common.weight_transport import (
    CollectiveEndpoint,
    WeightLayout,
    WeightPayload,
    free_port,
    node_address,
)
from learner import checkpoint as ckpt
from learner.advantages import RewardStatTracker, advantages_per_step, reward_increments
from learner.losses import (
    difficulty_weights,
    kl_loss,
    ppo_clipped_loss,
    reconstruction_reward,
    sample_sft_timesteps,
    select_train_steps,
    sft_diffusion_loss,
    sft_inputs,
    total_loss,
)
from learner.modes import loss_terms

__all__ = ["Learner", "LearnerGroup", "create_learners"]

log = logging.getLogger(__name__)

#: Gradient all-reduce bucket size (as torch DDP's default).
_ALLREDUCE_BUCKET_BYTES = 25 * 2**20
#: Timeout of the data-parallel rendezvous and of each gradient all-reduce.
DDP_TIMEOUT_S = 600.0
#: Relative tolerance between a trajectory's recorded σ_t and the one recomputed here.
_SIGMA_RTOL = 1e-4
#: Ground truths kept in memory (uint8 images looked up by input id).
_GT_CACHE = 512

# Indices of the per-update statistics vector (summed over micro-batches, then over ranks).
_S = {name: i for i, name in enumerate([
    "loss", "rl", "sft", "kl",  # the weighted parts of L (already / m)
    "rl_sum", "sft_sum", "kl_sum",  # Σ_i of the unweighted per-sample losses
    "approx_kl_sum", "old_approx_kl_sum", "clipfrac_sum", "entries",  # PPO diagnostics over (i, step)
    "nonfinite",  # micro-batch losses that were NaN/inf (not backpropagated)
    # π_old recomputed by the learner vs the rollout's recorded log-probs, over (i, step) of the first pass
    "rollout_absdiff_sum", "rollout_clip_sum", "first_entries",
])}

#: Share of first-pass (sample, step) entries whose rollout log-prob is off by more than the clip
#: range, above which the learner warns (rollout and learner numerics disagree).
_ROLLOUT_CLIPFRAC_WARN = 0.05


@dataclass
class _Prepared:
    """A batch between :meth:`Learner.prepare` and :meth:`Learner.optimize`."""

    traj: Trajectory
    sched: Any
    gt: torch.Tensor  # uint8 [B, H, W, 3]
    weights: torch.Tensor  # [B] difficulty weights
    adv_steps: torch.Tensor | None  # [B, K] advantages per step (None without a reward)
    t_start: float
    metrics: dict[str, float]


class Learner:
    """Holds the policy, AdamW, the reward tracker, the reference policy and the training data.

    Plain Python (testable in-process); :func:`create_learners` runs K of them as Ray actors.

    Args:
        model_cfg: the policy (built with :func:`common.policy.build_policy`; the frozen parts stay
            float32 here — ``learner.precision=bf16`` autocasts the forward passes instead).
        data_cfg: the training dataset, to look up each input's ground truth (and resolution).
        algorithm: mode, reward, clip range, β_KL, tracker settings, ``timestep_fraction``.
        learner_cfg: AdamW, grad clip, micro-batch size, PPO epochs, precision, seed.
        rank, world_size: this learner's place among the data-parallel learners.
        device: default ``cuda`` when ``num_gpus_per_learner > 0`` and CUDA is available, else CPU.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        algorithm: AlgorithmConfig,
        learner_cfg: LearnerConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        self.model_cfg, self.data_cfg = model_cfg, data_cfg
        self.algorithm, self.cfg = algorithm, learner_cfg
        self.terms = loss_terms(algorithm.mode)
        if device is None:
            device = "cuda" if learner_cfg.num_gpus_per_learner > 0 and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.policy = build_policy(model_cfg, data_cfg.resolution, dtype="float32").to(self.device).train()
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=learner_cfg.lr, betas=tuple(learner_cfg.adam_betas), eps=learner_cfg.adam_eps,
            weight_decay=learner_cfg.weight_decay,
        )
        self.tracker = RewardStatTracker(
            algorithm.buffer_size, algorithm.min_count, algorithm.adv_clip, algorithm.advantage_norm,
            adv_std=algorithm.adv_std, std_floor=algorithm.adv_std_floor,
        )
        # The tracker's empty state: reset_reward_tracker restores it (iterative RL).
        self._empty_tracker_state = copy.deepcopy(self.tracker.state_dict())
        self.dataset = build_dataset(data_cfg, "train")
        # The learner's only source of randomness (trained steps, SFT timesteps and noise). CPU, so
        # draws do not depend on the device; identical on every rank.
        self.generator = torch.Generator().manual_seed(learner_cfg.seed)
        self._version = 0
        self._prepared: _Prepared | None = None  # a batch between prepare() and optimize()
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self._schedulers: dict[int, Any] = {}
        self._pg: Any = None  # data-parallel process group (stateless)
        self._store: Any = None
        self._sync: CollectiveEndpoint | None = None
        self._ray_metrics: dict[str, Any] | None = None
        self._gt = functools.lru_cache(maxsize=_GT_CACHE)(self._load_gt)

    # ------------------------------------------------------------------------------ basics
    @property
    def version(self) -> int:
        """Policy version of the current weights: +1 for every update that changed them."""
        return self._version

    def num_inputs(self) -> int:
        """Size of the training dataset (the driver draws input ids from it)."""
        return len(self.dataset)

    def get_version(self) -> int:
        return self._version

    def pid(self) -> int:
        """This actor's process id (fault-injection tests kill it by PID)."""
        return os.getpid()

    def reset_reward_tracker(self) -> None:
        """Forget the reward history: iterative RL changed the reward model, and scores of
        different reward-model versions are not comparable (``reward.iqa_train.refresh_tracker``)."""
        self.tracker.load_state_dict(copy.deepcopy(self._empty_tracker_state))

    def uses_cuda(self) -> bool:
        return self.device.type == "cuda"

    def get_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, {name: tensor}) of exactly the trainable tensors, cloned to CPU."""
        return self._version, {k: v.cpu() for k, v in self.policy.trainable_state_dict(clone=True).items()}

    def _load_gt(self, input_id: int) -> np.ndarray:
        return self.dataset[input_id].gt

    def _gt_images(self, input_ids: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] ground truths of the inputs."""
        n = len(self.dataset)
        bad = [int(i) for i in input_ids.tolist() if not 0 <= int(i) < n]
        if bad:
            raise IndexError(f"input ids {bad[:5]} outside the training dataset of {n} pairs")
        return torch.from_numpy(np.stack([self._gt(int(i)) for i in input_ids.tolist()]))

    def _scheduler(self, traj: Trajectory):
        K = traj.num_steps
        sched = self._schedulers.get(K)
        if sched is None:
            sched = copy.deepcopy(self.policy.scheduler)
            sched.set_timesteps(K, device=self.device)
            self._schedulers[K] = sched
        if not torch.equal(sched.timesteps.cpu().to(torch.int64), traj.timesteps.cpu()):
            raise ValueError(
                f"Trajectory.timesteps {traj.timesteps.tolist()} differ from the policy scheduler's "
                f"{sched.timesteps.tolist()} for K={K}: sampled with another schedule"
            )
        return sched

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _model_fn(self, control: torch.Tensor):
        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.policy.predict(x, t, control)  # returned in x's dtype (float32)

        return model_fn

    def _micro_batches(self, local: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(local, self.cfg.micro_batch_size))

    # ------------------------------------------------------------------------------ update
    def _rewards(self, traj: Trajectory, gt: torch.Tensor) -> torch.Tensor:
        """r [B, R] (§2.3)."""
        if self.algorithm.reward == "reconstruction":
            if traj.reward_images.shape[1] != traj.reward_steps.shape[0]:
                raise ValueError("algorithm.reward=reconstruction needs the trajectory's reward images; this batch "
                                 f"carries {traj.reward_images.shape[1]} of {traj.reward_steps.shape[0]} steps")
            return reconstruction_reward(traj.reward_images, gt)
        r = traj.rewards
        bad = ~torch.isfinite(r)
        if bad.any():
            i, k = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(
                f"Trajectory.rewards: {int(bad.sum())} non-finite value(s), e.g. sample {i} (input id "
                f"{int(traj.input_ids[i])}) at reward step {int(traj.reward_steps[k])} = {float(r[i, k])}; "
                "algorithm.reward=iqa needs every score gathered from the reward service (never a silent 0)"
            )
        return r

    def prepare_from_store(self, parts: Sequence[Any], keep: Any = None,
                           reward_images: Sequence[Any] | None = None) -> dict[str, float]:
        """:meth:`prepare` on a batch the rollout workers left in the object store (DESIGN.md §1):
        the driver passes only references, so no trajectory tensor crosses the driver.

        Args:
            parts: ``[ObjectRef]`` (or Trajectory) per rollout chunk, reward images left out.
            keep: bool [B] over the concatenated chunks (the driver's mask of unscorable rewards);
                None keeps all.
            reward_images: ``[ObjectRef]`` per chunk, uint8 [b, R, H, W, 3] — fetched only when
                given (the reconstruction reward reads them).
        """
        trajs = _fetch(list(parts))
        if reward_images is not None:
            for t, images in zip(trajs, _fetch(list(reward_images))):
                t.reward_images = images
        traj = Trajectory.concat(trajs)
        if keep is not None:
            keep = torch.as_tensor(np.asarray(keep), dtype=torch.bool)
            if keep.shape != (traj.batch_size,):
                raise ValueError(f"keep: expected bool [{traj.batch_size}], got {list(keep.shape)}")
            traj = traj.select(keep)
        return self.prepare(traj)

    def update_from_store(self, parts: Sequence[Any], keep: Any = None,
                          reward_images: Sequence[Any] | None = None) -> dict[str, float]:
        """:meth:`prepare_from_store` then :meth:`optimize`, in one call."""
        self.prepare_from_store(parts, keep, reward_images)
        return self.optimize()

    def update(self, traj: Trajectory) -> dict[str, float]:
        """One learner update on a rollout batch (module docstring): :meth:`prepare` then
        :meth:`optimize`; returns the metrics of both.

        Every data-parallel rank must call this with the same full batch.
        """
        self.prepare(traj)
        return self.optimize()

    def prepare(self, traj: Trajectory) -> dict[str, float]:
        """The paper's reward → advantage stage of an update (§2.3–§2.5): the batch's rewards (the
        service's scores, or the reconstruction reward computed here), their advantages per
        step (the reward tracker moves), and the difficulty weights. Held until :meth:`optimize`;
        returns these metrics. Every data-parallel rank must call this with the same full batch.
        """
        t_start = time.perf_counter()
        if not self.terms.needs_rollout:
            raise ValueError(f"algorithm.mode={self.algorithm.mode!r} trains without rollout: use sft_update")
        if self._prepared is not None:
            raise RuntimeError("Learner.prepare: the previous batch was prepared but never optimized (call optimize)")
        traj.validate()
        K = traj.num_steps
        sched = self._scheduler(traj)
        gt = self._gt_images(traj.input_ids)  # uint8 [B, H, W, 3]
        if gt.shape[1:] != traj.final_images.shape[1:]:
            raise ValueError(
                f"ground truth images are {list(gt.shape[1:])}, Trajectory.final_images {list(traj.final_images.shape[1:])}: "
                "rollout and learner must use the same data.resolution"
            )
        metrics: dict[str, float] = {}

        # 1.–2. rewards and advantages over the whole batch (§2.3, §2.4)           [B, R] → [B, K]
        adv_steps = None
        if self.terms.needs_reward:
            rewards = self._rewards(traj, gt)  # [B, R]
            scored = reward_increments(rewards) if self.algorithm.step_reward == "increment" else rewards
            adv = self.tracker.update(traj.input_ids, scored, traj.reward_steps)
            adv_steps = advantages_per_step(adv, traj.reward_steps, K)
            metrics["reward/mean"] = float(rewards.mean())
            metrics["reward/final_mean"] = float(rewards[:, -1].mean())
            metrics.update(self.tracker.stats())
        # 3. difficulty weights over the whole batch (§2.5)                                    [B]
        weights = difficulty_weights(traj.final_images, gt)
        metrics["weights/mean"] = float(weights.mean())
        metrics["weights/max_distance_rmse"] = float(
            torch.sqrt(((traj.final_images.float() - gt.float()) / 255).square().mean(dim=(1, 2, 3))).max()
        )
        self._prepared = _Prepared(traj, sched, gt, weights, adv_steps, t_start, dict(metrics))
        return metrics

    def optimize(self) -> dict[str, float]:
        """The update stage on the batch :meth:`prepare` held: PPO + SFT + KL (§2.6), the
        optimizer step(s); returns the metrics of both stages."""
        if self._prepared is None:
            raise RuntimeError("Learner.optimize: no prepared batch (call prepare first)")
        prep, self._prepared = self._prepared, None
        traj, sched, gt, weights, adv_steps = prep.traj, prep.sched, prep.gt, prep.weights, prep.adv_steps
        t_start, metrics = prep.t_start, prep.metrics
        B, K = traj.batch_size, traj.num_steps
        version_before = self._version

        local = torch.arange(self.rank, B, self.world_size)  # this rank's shard of the batch
        totals = torch.zeros(len(_S), dtype=torch.float64)
        grad_norms, applied = [], 0
        # log π_old [B, K]: the rollout's, or — when this learner still holds the weights that
        # sampled the batch — its own, filled in by the first pass before any optimizer step.
        recompute = (self.cfg.recompute_old_log_prob and self.terms.uses_rl
                     and traj.policy_version == self._version)
        old_lp = traj.log_probs.clone()
        known = torch.zeros(B, K, dtype=torch.bool)  # entries of old_lp the learner has recomputed
        E = self.cfg.ppo_epochs
        self._rollout_max_abs = 0.0  # max |log π_learner − log π_rollout| of this rank's first pass
        self._first_max_log_ratio = 0.0  # max |log ρ| of this rank's first pass (before any step)
        snapshot: list[torch.Tensor] = []
        for epoch in range(E):
            # Draws for the WHOLE batch, in a fixed order: independent of rank, world size and
            # micro-batching.                          train steps [B, n]; SFT t [B], noise [B, C, h, w]
            train_steps = None
            if self.terms.uses_rl:
                train_steps = select_train_steps(
                    K, traj.deterministic, self.algorithm.timestep_fraction, self.generator, batch_size=B
                )
                if recompute and epoch > 0 and not bool(known[local[:, None], train_steps[local]].all()):
                    # Steps epoch 0 did not train: their π_old is the pre-update policy's, which
                    # the weights no longer are. Never reached with ppo_epochs=1 (the default).
                    self._fill_old_log_probs(traj, sched, local, train_steps, old_lp, known, snapshot)
            if recompute and epoch == 0 and E > 1:
                snapshot = [p.detach().clone() for p in self.params]  # the sampling weights
            sft_t = sft_noise = None
            if self.terms.uses_sft:
                sft_t = sample_sft_timesteps(sched.config.num_train_timesteps, B, self.generator)
                sft_noise = torch.randn(traj.latents.shape[:1] + traj.latents.shape[2:], generator=self.generator)
            stats = torch.zeros(len(_S), dtype=torch.float64)
            for idx in self._micro_batches(local):
                self._backward_micro_batch(
                    traj, sched, gt, idx, B, weights, adv_steps, train_steps, sft_t, sft_noise, stats,
                    old_lp=old_lp, epoch0=epoch == 0, recompute=recompute, known=known,
                )
            ok, grad_norm = self._optimizer_step(stats)
            totals += stats
            grad_norms.append(grad_norm)
            applied += int(ok)
        if applied:
            self._version += 1

        entries = max(totals[_S["entries"]].item(), 1.0)
        if self._pg is not None:  # the maxima over every rank's shard (each rank saw only its own)
            self._first_max_log_ratio, self._rollout_max_abs = self._allreduce_max(
                [self._first_max_log_ratio, self._rollout_max_abs])
        first_entries = totals[_S["first_entries"]].item()  # the rollout_* slots count the first pass only
        if recompute and first_entries:
            clipfrac0 = totals[_S["rollout_clip_sum"]].item() / first_entries
            metrics["learner/rollout_log_ratio_mean_abs"] = totals[_S["rollout_absdiff_sum"]].item() / first_entries
            metrics["learner/rollout_log_ratio_max"] = self._rollout_max_abs
            metrics["learner/rollout_clipfrac"] = clipfrac0
            if clipfrac0 > _ROLLOUT_CLIPFRAC_WARN:
                log.warning("learner: %.1f%% of (sample, step) entries have a rollout log-prob more than the clip "
                            "range %.0e from the learner's own (max |log ρ| %.2e): the learner's π_old is used, but "
                            "rollout and learner numerics disagree (precision? model?)", 100 * clipfrac0,
                            self.algorithm.clip_range, self._rollout_max_abs)
        metrics["learner/recomputed_old_log_prob"] = float(recompute)
        if self.terms.uses_rl:
            metrics["losses/first_max_abs_log_ratio"] = self._first_max_log_ratio
        for part in ("loss", "rl", "sft", "kl"):
            metrics[f"losses/{'total' if part == 'loss' else part}"] = totals[_S[part]].item() / E
        for part in ("rl", "sft", "kl"):
            metrics[f"losses/{part}_raw"] = totals[_S[f"{part}_sum"]].item() / (B * E)
        metrics.update({
            "losses/approx_kl": totals[_S["approx_kl_sum"]].item() / entries,
            "losses/old_approx_kl": totals[_S["old_approx_kl_sum"]].item() / entries,
            "losses/clipfrac": totals[_S["clipfrac_sum"]].item() / entries,
            "learner/grad_norm": float(np.mean(grad_norms)),
            "learner/skipped": float(E - applied),
            "learner/skipped_total": float(self.skipped_steps),
            "learner/optimizer_steps": float(self.optimizer_steps),
            "learner/version": float(self._version),
            "learner/staleness": float(version_before - traj.policy_version),
            "learner/batch_size": float(B),
            "learner/step_seconds": time.perf_counter() - t_start,
        })
        self._record(metrics, E - applied, applied)
        return metrics

    def _backward_micro_batch(
        self,
        traj: Trajectory,
        sched: Any,
        gt: torch.Tensor,
        idx: torch.Tensor,
        m: int,
        weights: torch.Tensor,
        adv_steps: torch.Tensor | None,
        train_steps: torch.Tensor | None,
        sft_t: torch.Tensor | None,
        sft_noise: torch.Tensor | None,
        stats: torch.Tensor,
        *,
        old_lp: torch.Tensor,
        epoch0: bool = False,
        recompute: bool = False,
        known: torch.Tensor | None = None,
    ) -> None:
        """Accumulate the gradient of this micro-batch's share of L (see the module docstring).

        ``old_lp`` [B, K]: log π_old. ``epoch0``: the first pass, before any optimizer step of the
        update. With ``recompute`` the weights are then the ones that sampled the batch: the
        learner's own detached log-probs become π_old (ratio exactly 1), written to ``old_lp`` and
        ``known``, and the rollout's recorded ones are only compared."""
        dev = self.device
        control = images_to_tensor(traj.control_images[idx], dev)  # [b, 3, H, W]
        model_fn = self._model_fn(control)
        w = weights[idx].to(dev)  # [b]
        b = idx.numel()

        # L_diff,i on the ground-truth latent with the pre-drawn t and noise (§2.6)           [b]
        sft_i = None
        if self.terms.uses_sft:
            with torch.no_grad():
                x0 = self.policy.encode_images(gt[idx])  # [b, C, h, w], posterior mean
            t = sft_t[idx].to(dev)
            noisy, target = sft_inputs(sched, x0, sft_noise[idx].to(dev), t)
            sft_i = sft_diffusion_loss(model_fn(noisy, t), target)
            stats[_S["sft_sum"]] += float(sft_i.detach().sum())

        use_kl = self.terms.use_kl and self.algorithm.kl_coef > 0
        n = train_steps.shape[1] if train_steps is not None else 1
        for j in range(n):
            rl_i = kl_i = None
            if train_steps is not None:
                k = train_steps[idx, j]  # [b] step index per sample
                x_t = traj.latents[idx, k].to(dev)  # [b, C, h, w] state
                action = traj.latents[idx, k + 1].to(dev)  # [b, C, h, w] recorded x_{t'}
                t = traj.timesteps[k].to(dev)  # [b]
                out = policy_step(sched, model_fn, x_t, t, traj.eta,
                                  policy_target=self.algorithm.policy_target, prev_sample=action)
                recorded = traj.sigmas[k].to(out.std)
                if not torch.allclose(out.std, recorded, rtol=_SIGMA_RTOL, atol=1e-7):
                    raise ValueError(
                        f"σ_t recomputed with η={traj.eta} ({out.std.tolist()}) differs from the trajectory's "
                        f"({recorded.tolist()}): rollout and learner disagree on the schedule or η"
                    )
                if epoch0:
                    mine = out.log_prob.detach().float().cpu()  # [b] log π_θ in the learner's numerics
                    if recompute:
                        diff = (mine - traj.log_probs[idx, k]).abs()  # [b] vs the rollout's
                        stats[_S["rollout_absdiff_sum"]] += float(diff.sum())
                        stats[_S["rollout_clip_sum"]] += float((diff > self.algorithm.clip_range).sum())
                        stats[_S["first_entries"]] += b
                        self._rollout_max_abs = max(self._rollout_max_abs, float(diff.max()))
                        old_lp[idx, k] = mine
                        known[idx, k] = True  # type: ignore[index]
                    # |log ρ| PPO sees before any update: 0 when recomputed, the mismatch otherwise.
                    self._first_max_log_ratio = max(self._first_max_log_ratio,
                                                    float((mine - old_lp[idx, k]).abs().max()))
                ppo = ppo_clipped_loss(
                    out.log_prob[:, None], old_lp[idx, k][:, None].to(dev),
                    adv_steps[idx, k][:, None].to(dev), self.algorithm.clip_range,
                )
                rl_i = ppo.loss / n  # this step's share of L_rl,i                               [b]
                stats[_S["rl_sum"]] += float(rl_i.detach().sum())
                stats[_S["approx_kl_sum"]] += float(ppo.approx_kl) * b
                stats[_S["old_approx_kl_sum"]] += float(ppo.old_approx_kl) * b
                stats[_S["clipfrac_sum"]] += float(ppo.clipfrac) * b
                stats[_S["entries"]] += b
                if use_kl:
                    with torch.no_grad(), self.policy.reference():
                        ref = policy_step(sched, model_fn, x_t, t, traj.eta,
                                          policy_target=self.algorithm.policy_target, prev_sample=action)
                    kl_i = kl_loss(out.mean, ref.mean, out.std) / n  # [b]
                    stats[_S["kl_sum"]] += float(kl_i.detach().sum())
            sft_j = None
            if sft_i is not None:
                sft_j = sft_i if j == 0 else torch.zeros_like(sft_i)
            parts = total_loss(
                self.terms, weights=w, rl=rl_i, sft=sft_j, kl=kl_i,
                kl_coef=self.algorithm.kl_coef, num_samples=m,
            )
            self._accumulate(parts, stats)

    def _fill_old_log_probs(
        self, traj: Trajectory, sched: Any, local: torch.Tensor, train_steps: torch.Tensor,
        old_lp: torch.Tensor, known: torch.Tensor, snapshot: list[torch.Tensor],
    ) -> None:
        """log π_old of the (sample, step) entries of ``train_steps`` [B, n] not yet in ``known``,
        for this rank's ``local`` samples: evaluated without gradient under ``snapshot`` (the
        weights that sampled the batch), then the current weights are put back."""
        current = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, w in zip(self.params, snapshot):
                    p.copy_(w)
                for idx in self._micro_batches(local):
                    model_fn = self._model_fn(images_to_tensor(traj.control_images[idx], self.device))
                    for j in range(train_steps.shape[1]):
                        k = train_steps[idx, j]  # [b]
                        todo = ~known[idx, k]  # [b]
                        if not bool(todo.any()):
                            continue
                        out = policy_step(sched, model_fn, traj.latents[idx, k].to(self.device),
                                          traj.timesteps[k].to(self.device), traj.eta,
                                          policy_target=self.algorithm.policy_target,
                                          prev_sample=traj.latents[idx, k + 1].to(self.device))
                        old_lp[idx[todo], k[todo]] = out.log_prob.float().cpu()[todo]
                        known[idx[todo], k[todo]] = True
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, current):
                    p.copy_(w)

    def _accumulate(self, parts: Any, stats: torch.Tensor) -> None:
        loss = parts.loss
        if not bool(torch.isfinite(loss)):
            stats[_S["nonfinite"]] += 1  # never backpropagated; the step will be skipped
            return
        loss.backward()
        stats[_S["loss"]] += float(loss.detach())
        stats[_S["rl"]] += float(parts.rl.detach())
        stats[_S["sft"]] += float(parts.sft.detach())
        stats[_S["kl"]] += float(parts.kl.detach())

    def _optimizer_step(self, stats: torch.Tensor) -> tuple[bool, float]:
        """All-reduce (DP), clip, step — or skip on anything non-finite. Returns (applied, norm)."""
        for p in self.params:
            if p.grad is None:  # every rank must all-reduce the same tensors
                p.grad = torch.zeros_like(p)
        if self._pg is not None:
            self._allreduce_([p.grad for p in self.params])
            self._allreduce_([stats])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        ok = stats[_S["nonfinite"]].item() == 0 and math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
            self.optimizer_steps += 1
        else:
            self.skipped_steps += 1
            log.warning("learner rank %d: non-finite loss or gradient (grad norm %s): optimizer step skipped "
                        "(%d so far)", self.rank, grad_norm, self.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return ok, grad_norm

    # ------------------------------------------------------------------------------ SFT
    def sft_update(self, input_ids: Sequence[int]) -> dict[str, float]:
        """One step of plain SFT pre-training (``mode=sft``): uniform weight, no rollout.

        L = (1/m) Σ_i L_diff,i on the ground-truth latents of ``input_ids``, conditioned on their
        LQ images. Every data-parallel rank must get the same full id list.
        """
        t_start = time.perf_counter()
        ids = torch.as_tensor([int(i) for i in input_ids], dtype=torch.int64)
        if ids.numel() == 0:
            raise ValueError("sft_update: no input ids")
        m = ids.numel()
        gt = self._gt_images(ids)  # uint8 [m, H, W, 3]
        lq = torch.from_numpy(np.stack([self.dataset[int(i)].lq for i in ids.tolist()]))
        sched = self.policy.scheduler
        C, h, w = self.policy.latent_shape(self.data_cfg.resolution)
        t_all = sample_sft_timesteps(sched.config.num_train_timesteps, m, self.generator)
        noise_all = torch.randn((m, C, h, w), generator=self.generator)
        terms = loss_terms("sft")
        stats = torch.zeros(len(_S), dtype=torch.float64)
        for idx in self._micro_batches(torch.arange(self.rank, m, self.world_size)):
            with torch.no_grad():
                x0 = self.policy.encode_images(gt[idx])
            t = t_all[idx].to(self.device)
            noisy, target = sft_inputs(sched, x0, noise_all[idx].to(self.device), t)
            sft_i = sft_diffusion_loss(self._model_fn(images_to_tensor(lq[idx], self.device))(noisy, t), target)
            stats[_S["sft_sum"]] += float(sft_i.detach().sum())
            self._accumulate(total_loss(terms, sft=sft_i, num_samples=m), stats)
        ok, grad_norm = self._optimizer_step(stats)
        if ok:
            self._version += 1
        metrics = {
            "losses/total": stats[_S["loss"]].item(),
            "losses/sft": stats[_S["sft"]].item(),
            "losses/sft_raw": stats[_S["sft_sum"]].item() / m,
            "learner/grad_norm": grad_norm,
            "learner/skipped": float(not ok),
            "learner/skipped_total": float(self.skipped_steps),
            "learner/optimizer_steps": float(self.optimizer_steps),
            "learner/version": float(self._version),
            "learner/batch_size": float(m),
            "learner/step_seconds": time.perf_counter() - t_start,
        }
        self._record(metrics, int(not ok), int(ok))
        return metrics

    # ------------------------------------------------------------------------------ telemetry
    def _record(self, metrics: dict[str, float], skipped: int, applied: int) -> None:
        """``ray.util.metrics`` inside Ray (rank 0 only: the ranks take the same steps)."""
        if self.rank != 0:
            return
        try:
            import ray

            if not ray.is_initialized():
                return
        except ImportError:
            return
        if self._ray_metrics is None:
            from common.telemetry import ray_metric

            self._ray_metrics = {
                n: ray_metric(n) for n in ("learner_steps_total", "learner_step_seconds", "learner_loss", "reward_mean")
            }
            self._ray_metrics["policy_version"] = ray_metric("policy_version", {"role": "learner"})
        m = self._ray_metrics
        if applied:
            m["learner_steps_total"].inc(applied, tags={"status": "applied"})
        if skipped:
            m["learner_steps_total"].inc(skipped, tags={"status": "skipped"})
        m["learner_step_seconds"].observe(metrics["learner/step_seconds"])
        for part in ("total", "rl", "sft", "kl"):
            if f"losses/{part}" in metrics:
                m["learner_loss"].set(metrics[f"losses/{part}"], tags={"part": part})
        if "reward/mean" in metrics:
            m["reward_mean"].set(metrics["reward/mean"])
        m["policy_version"].set(self._version)

    # ------------------------------------------------------------------------------ data parallel
    def distributed_address(self) -> tuple[str, int]:
        """(address, free port) on this node for the data-parallel TCP store (rank 0)."""
        addr = node_address()
        return addr, free_port(addr)

    def init_distributed(self, master_addr: str, master_port: int, timeout_s: float = DDP_TIMEOUT_S) -> int:
        """Join the data-parallel group of ``world_size`` learners (all ranks call it at once).

        A stateless process group (not ``init_process_group``): see the module docstring.
        """
        import torch.distributed as dist

        if self.world_size == 1:
            return self.rank
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(master_addr, master_port, self.world_size, self.rank == 0, timeout=timeout)
        prefix = dist.PrefixStore("restore_rl/learners", self._store)
        if self.device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(prefix, self.rank, self.world_size, opts)
        else:
            self._pg = dist.ProcessGroupGloo(prefix, self.rank, self.world_size, timeout)
        self._allreduce_([torch.zeros(1, device=self.device)])  # fail here, not mid-update
        return self.rank

    def _allreduce_max(self, values: list[float]) -> list[float]:
        """Element-wise MAX of ``values`` over the learners."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self._pg.allreduce([t], opts).wait()
        return [float(v) for v in t.cpu()]

    def _allreduce_(self, tensors: list[torch.Tensor]) -> None:
        """In-place SUM over the learners, in flat buckets of one dtype and device."""
        bucket: list[torch.Tensor] = []
        size = 0

        def flush() -> None:
            if not bucket:
                return
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(self.device)
            self._pg.allreduce([flat]).wait()
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            bucket.clear()

        for t in tensors:
            if bucket and (t.dtype != bucket[0].dtype or size + t.numel() * t.element_size() > _ALLREDUCE_BUCKET_BYTES):
                flush()
                size = 0
            bucket.append(t)
            size += t.numel() * t.element_size()
        flush()

    # ------------------------------------------------------------------------------ checkpoints
    def _config_snapshot(self) -> str:
        import yaml

        return yaml.safe_dump({
            "model": self.model_cfg.model_dump(mode="json"),
            "data": self.data_cfg.model_dump(mode="json"),
            "algorithm": self.algorithm.model_dump(mode="json"),
            "learner": self.cfg.model_dump(mode="json"),
        }, sort_keys=False)

    def save_checkpoint(
        self,
        run_dir: str | Path,
        iteration: int,
        *,
        config_yaml: str | None = None,
        keep: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Write an atomic checkpoint (rank 0's job; :mod:`learner.checkpoint`); returns its path.

        ``config_yaml``: the full experiment config (default: this learner's sections).
        ``extra``: JSON-serialisable state of the caller (e.g. the driver's data order).
        """
        counters = {"optimizer_steps": self.optimizer_steps, "skipped_steps": self.skipped_steps}
        path = ckpt.save_checkpoint(
            run_dir, iteration, policy=self.policy, optimizer=self.optimizer,
            tracker_state=self.tracker.state_dict(),
            rng_state=ckpt.capture_rng_state({"learner": self.generator}),
            policy_version=self._version,
            config_yaml=config_yaml if config_yaml is not None else self._config_snapshot(),
            extra={"learner": counters, **(extra or {})}, keep=keep,
        )
        return str(path)

    def load_checkpoint(self, path: str | Path, verify_checksums: bool = True) -> dict[str, Any]:
        """Restore weights, optimizer, tracker, RNGs and version (every rank loads the same one).

        ``verify_checksums=False``: the caller has just verified them (the driver does, before Ray
        starts); the manifest and the file sizes are still checked.
        Returns ``{"iteration", "policy_version", "extra"}``.
        """
        self._prepared = None  # a batch prepared before the restore is not part of the restored state
        c = ckpt.load_checkpoint(path, verify_checksums=verify_checksums)
        ours = list(self.policy.trainable_state_dict(clone=False))
        if c.trainable_names != ours:
            raise ckpt.CheckpointError(
                f"{c.path}: its trainable tensors ({len(c.trainable_names)}) are not this policy's ({len(ours)}): "
                "resume with the model config it was trained with"
            )
        self.policy.load_trainable(c.trainable)
        self.optimizer.load_state_dict(c.optimizer_state)
        self.tracker.load_state_dict(c.tracker_state)
        ckpt.restore_rng_state(c.rng_state, {"learner": self.generator})
        self._version = c.policy_version
        counters = c.extra.get("learner", {})
        self.optimizer_steps = int(counters.get("optimizer_steps", 0))
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        return {"iteration": c.iteration, "policy_version": c.policy_version, "extra": c.extra}

    # ------------------------------------------------------------------------------ weight sync
    def weight_layout(self, bucket_bytes: int) -> WeightLayout:
        return WeightLayout.from_state(self.policy.trainable_state_dict(clone=False), bucket_bytes)

    def export_weights(self, bucket_bytes: int) -> WeightPayload:
        """Object-store sync: the current weights as a :class:`WeightPayload`."""
        state = self.policy.trainable_state_dict(clone=False)
        return WeightPayload.from_state(self._version, state, WeightLayout.from_state(state, bucket_bytes))

    def weight_sync_address(self) -> tuple[str, int]:
        addr = node_address()
        return addr, free_port(addr)

    def init_weight_sync(self, *, world_size: int, backend: str, master_addr: str, master_port: int,
                         timeout_s: float, layout: WeightLayout) -> int:
        """Join the weight-sync group as its rank 0 (:class:`learner.weight_sync.WeightSync`)."""
        if self.rank != 0:
            raise RuntimeError(f"learner rank {self.rank}: only rank 0 sends weights")
        if self._sync is not None:
            self._sync.close()
        self._sync = CollectiveEndpoint(world_size=world_size, rank=0, backend=backend, master_addr=master_addr,
                                        master_port=master_port, timeout_s=timeout_s, layout=layout,
                                        device=self.device)
        return 0

    def broadcast_weights(self, version: int) -> int:
        if self._sync is None:
            raise RuntimeError("broadcast_weights: no weight-sync group (init_weight_sync first)")
        if version != self._version:
            raise RuntimeError(f"broadcast_weights: asked for version {version}, holds {self._version}")
        self._sync.send(self._version, self.policy.trainable_state_dict(clone=False))
        return self._version

    def close_weight_sync(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


# ---------------------------------------------------------------------------------- Ray actors
def learner_actor_options(learner_cfg: LearnerConfig, placement_group: Any = None, bundle_index: int = 0) -> dict[str, Any]:
    """Ray options of one learner: its CPUs, GPUs and ``custom_resources`` (these pin it to the
    learner pool, with or without a placement group), and bundle ``bundle_index`` of
    ``placement_group`` when one is given."""
    opts = actor_resources(learner_cfg.num_cpus_per_learner, learner_cfg.num_gpus_per_learner,
                           learner_cfg.custom_resources)
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle_index)
    return opts


def create_learners(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    algorithm: AlgorithmConfig,
    learner_cfg: LearnerConfig,
    *,
    placement_group: Any = None,
    bundle_offset: int = 0,
    timeout_s: float = DDP_TIMEOUT_S,
) -> list[Any]:
    """Start ``learner_cfg.num_learners`` Learner actors and join them into one DP group.

    With ``placement_group``, learner r goes into bundle ``bundle_offset + r``. Returns the
    actors, rank 0 first (see :class:`LearnerGroup` for the driver-side calls).
    """
    import ray

    K = learner_cfg.num_learners
    actors = []
    for r in range(K):
        opts = learner_actor_options(learner_cfg, placement_group, bundle_offset + r)
        actors.append(ray.remote(Learner).options(**opts).remote(
            model_cfg, data_cfg, algorithm, learner_cfg, rank=r, world_size=K))
    if K > 1:
        addr, port = ray.get(actors[0].distributed_address.remote(), timeout=timeout_s)
        ray.get([a.init_distributed.remote(addr, port, timeout_s) for a in actors], timeout=timeout_s + 30)
    return actors


def _fetch(items: list[Any]) -> list[Any]:
    """ObjectRefs -> their values (one ray.get); anything else is passed through (in-process use)."""
    refs = [i for i in items if type(i).__name__ == "ObjectRef"]
    if not refs:
        return items
    import ray

    values = iter(ray.get(refs))
    return [next(values) if type(i).__name__ == "ObjectRef" else i for i in items]


class LearnerGroup:
    """Driver-side handle on the K learner actors: every rank gets the same call.

    ``get`` waits for a list of object refs and returns their values (default ``ray.get`` with
    ``timeout_s``); the driver passes its own, which notices a stop request while it waits.
    """

    def __init__(self, actors: Sequence[Any], timeout_s: float | None = None,
                 get: Callable[[list[Any]], list[Any]] | None = None):
        if not actors:
            raise ValueError("LearnerGroup: no learner actors")
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self._get = get if get is not None else self._ray_get

    def _ray_get(self, refs: list[Any]) -> list[Any]:
        import ray

        return ray.get(refs, timeout=self.timeout_s)

    @property
    def rank0(self) -> Any:
        return self.actors[0]

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def _rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._get([getattr(self.rank0, method).remote(*args, **kwargs)])[0]

    @staticmethod
    def _agreed(results: list[dict[str, float]]) -> dict[str, float]:
        versions = {r["learner/version"] for r in results}
        if len(versions) != 1:
            raise RuntimeError(f"learners disagree on the version after an update: {sorted(versions)}")
        return results[0]

    def num_inputs(self) -> int:
        return int(self._rank0("num_inputs"))

    def prepare_from_store(self, parts: Sequence[Any], keep: Any = None,
                           reward_images: Sequence[Any] | None = None) -> dict[str, float]:
        """Rewards → advantages → difficulty weights on every rank (:meth:`Learner.prepare_from_store`)."""
        return self._all("prepare_from_store", list(parts), keep, reward_images)[0]

    def optimize(self) -> dict[str, float]:
        """The update of the prepared batch on every rank (:meth:`Learner.optimize`)."""
        return self._agreed(self._all("optimize"))

    def update(self, traj: Trajectory) -> dict[str, float]:
        import ray

        ref = ray.put(traj)  # one copy in the object store for all ranks
        return self._agreed(self._all("update", ref))

    def sft_update(self, input_ids: Sequence[int]) -> dict[str, float]:
        return self._all("sft_update", list(input_ids))[0]

    def reset_reward_tracker(self) -> None:
        self._all("reset_reward_tracker")

    def version(self) -> int:
        return int(self._rank0("get_version"))

    def get_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self._rank0("get_weights")

    def save_checkpoint(self, run_dir: str | Path, iteration: int, **kwargs: Any) -> str:
        """Rank 0 writes: every rank holds identical weights, optimizer and tracker after an update."""
        return self._rank0("save_checkpoint", str(run_dir), iteration, **kwargs)

    def load_checkpoint(self, path: str | Path, verify_checksums: bool = True) -> dict[str, Any]:
        return self._all("load_checkpoint", str(path), verify_checksums)[0]
