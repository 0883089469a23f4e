"""Step-wise advantages from per-(input, step) reward statistics (DESIGN.md §2.4, paper §4.2.2).

    A_{i,k} = clip( (r_{i,k} − μ) / √(max(σ², σ_floor²) + 1e-6), −adv_clip, +adv_clip )

μ, σ are taken per (input id, reward step index k), so a blurry early x̂0 is compared with the
early x̂0 of the same input, not with final outputs. σ is the population standard deviation
(ddof = 0, as ``np.std`` in ddpo-pytorch's PerPromptStatTracker).

Where μ (and, with ``adv_std=group``, σ) come from — ``advantage_norm``:

``track+batch`` (DDPO's PerPromptStatTracker, one reading of the paper's "history plus current
batch"):
    1. the input's history at step k (a deque of at most ``buffer_size`` rewards) is extended with
       this batch's rewards of that input at step k;
    2. if it now holds ≥ ``min_count`` rewards, μ, σ are the history's; otherwise they are the whole
       batch's rewards at step k (every input).
``track`` (ablation "Norm. from track"): μ, σ from the history as it was *before* this batch
(the whole batch's at step k while it holds < ``min_count``); the batch is appended afterwards.
``track+whole_batch`` (the paper's other reading: "the track of rewards for each input image and
the reward values from the current batch"): μ, σ over the input's history from before this batch
pooled with the WHOLE batch's rewards at step k (every input); the input's rewards are appended
afterwards.

Which σ divides — ``adv_std``:

``group``: the σ of the same pool as μ (above).
``step``: one σ per step k for the whole batch, the root mean square of the centred rewards
    r_{i,k} − μ_{input(i),k} over every sample of the batch — a normalisation across inputs at the
    same step. The restorations of one input often score nearly alike; dividing their differences
    by their own tiny spread blows noise up to full-size advantages (the "illusory advantage" of
    Pref-GRPO); a shared σ keeps an input whose samples barely differ near A = 0, and keeps the
    relative size of the inputs' differences.
``batch``: one σ for the whole batch, the RMS of the centred rewards over every sample AND every
    step: also keeps the relative size of the steps' differences. With ``step_reward=increment``
    a late step moves the score about 20× less than the first (measured, issue 12); ``group`` and
    ``step`` scale every step's advantages to unit size regardless.

``std_floor`` (reward units, default 0): a floor under σ, the other guard against the same.

The G samples of one input in a batch share its input id and its statistics.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["ADVANTAGE_NORMS", "ADVANTAGE_STDS", "RewardStatTracker", "advantages_per_step", "reward_increments"]

AdvantageNorm = Literal["track+batch", "track", "track+whole_batch"]
ADVANTAGE_NORMS: tuple[str, ...] = ("track+batch", "track", "track+whole_batch")
AdvantageStd = Literal["group", "step", "batch"]
ADVANTAGE_STDS: tuple[str, ...] = ("group", "step", "batch")

#: ε of the paper's A = (r − μ)/√(σ² + ε): keeps a constant-reward group finite (A = 0).
STD_EPS = 1e-6

_STATE_FORMAT = "restore_rl.reward_stat_tracker"
_STATE_VERSION = 1


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class RewardStatTracker:
    """Reward history per (input id, step index) and the advantages of each new batch (§2.4).

    Owned by the learner; its :meth:`state_dict` goes into checkpoints (plain lists and numbers,
    JSON- and msgpack-serializable). Memory: one deque of ≤ ``buffer_size`` floats per
    (input id, rewarded step) seen.

    Args:
        buffer_size: rewards kept per (input, step); the oldest are evicted first.
        min_count: below this many rewards in the statistics' source, use the batch's statistics.
        adv_clip: advantages are clipped to ±adv_clip.
        advantage_norm: ``"track+batch"``, ``"track"`` or ``"track+whole_batch"`` (module docstring).
        adv_std: ``"group"``, ``"step"`` or ``"batch"``: which σ divides (module docstring).
        std_floor: σ is raised to at least this (reward units; 0: no floor).
    """

    def __init__(
        self,
        buffer_size: int,
        min_count: int,
        adv_clip: float,
        advantage_norm: AdvantageNorm = "track+batch",
        adv_std: AdvantageStd = "group",
        std_floor: float = 0.0,
    ) -> None:
        if advantage_norm not in ADVANTAGE_NORMS:
            raise ValueError(
                f"advantage_norm: expected one of {ADVANTAGE_NORMS}, got {advantage_norm!r}"
            )
        if adv_std not in ADVANTAGE_STDS:
            raise ValueError(f"adv_std: expected one of {ADVANTAGE_STDS}, got {adv_std!r}")
        if not (std_floor >= 0 and np.isfinite(std_floor)):
            raise ValueError(f"std_floor: expected a finite value >= 0, got {std_floor}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size: expected >= 1, got {buffer_size}")
        if min_count < 1:
            raise ValueError(f"min_count: expected >= 1, got {min_count}")
        if not adv_clip > 0:
            raise ValueError(f"adv_clip: expected > 0, got {adv_clip}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.adv_clip = float(adv_clip)
        self.advantage_norm: str = advantage_norm
        self.adv_std: str = adv_std
        self.std_floor = float(std_floor)
        self._history: dict[tuple[int, int], deque[float]] = {}
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------------------ update
    def update(
        self,
        input_ids: torch.Tensor | np.ndarray,
        rewards: torch.Tensor | np.ndarray,
        steps: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """Record one batch of rewards and return its advantages.

        Args:
            input_ids: int [B] — dataset index of each sample's input (``Trajectory.input_ids``).
            rewards: float [B, R] — r_{i,k} at the R rewarded steps (``Trajectory.rewards``).
            steps: int [R] — the step index k of each reward column (``Trajectory.reward_steps``);
                the statistics are keyed on it. Default: 0..R−1 (the column index).

        Returns:
            float32 [B, R] advantages (a torch tensor on ``rewards``' device when it is one).

        Raises:
            ValueError: a NaN or infinite reward (never propagated into the loss), or inputs
                whose shapes/dtypes disagree with the above.
        """
        ids = _as_numpy(input_ids)
        r = _as_numpy(rewards)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"input_ids: expected an integer [B] array, "
                f"got dtype {ids.dtype} shape {list(ids.shape)}"
            )
        if r.ndim != 2 or r.shape[0] != ids.shape[0] or not np.issubdtype(r.dtype, np.floating):
            raise ValueError(
                f"rewards: expected a float [B, R] array with B = {ids.shape[0]} (input_ids), "
                f"got dtype {r.dtype} shape {list(r.shape)}"
            )
        if r.shape[0] == 0 or r.shape[1] == 0:
            raise ValueError(f"rewards: empty batch, shape {list(r.shape)}")
        num_rewards = r.shape[1]
        if steps is None:
            step_ids = np.arange(num_rewards)
        else:
            step_ids = _as_numpy(steps)
            if (
                step_ids.shape != (num_rewards,)
                or not np.issubdtype(step_ids.dtype, np.integer)
                or len(np.unique(step_ids)) != num_rewards
            ):
                raise ValueError(
                    f"steps: expected {num_rewards} distinct integer step indices (one per reward "
                    f"column), got {step_ids.tolist()}"
                )
        bad = ~np.isfinite(r)
        if bad.any():
            i, k = np.argwhere(bad)[0]
            raise ValueError(
                f"rewards: {int(bad.sum())} non-finite value(s), "
                f"e.g. rewards[{i}, {k}] = {r[i, k]} "
                f"(input id {int(ids[i])}, step {int(step_ids[k])}); a reward that could not be "
                "computed must fail the batch, not enter the advantages"
            )

        r64 = r.astype(np.float64)  # [B, R]
        mean = np.empty_like(r64)  # [B, R] μ of each sample's (input, step)
        std = np.empty_like(r64)  # [B, R] σ of the same pool (adv_std=group)
        unique_ids = np.unique(ids)
        fallback = 0
        for col in range(num_rewards):
            step = int(step_ids[col])
            column = r64[:, col]  # [B]
            # Whole-batch statistics at this step index: the fallback below min_count.
            batch_mean, batch_std = float(column.mean()), float(column.std())
            for uid in unique_ids:
                members = ids == uid  # [B] bool
                group = column[members]  # the G rewards of this input at this step
                history = self._history.get((int(uid), step))
                if history is None:
                    history = self._history[(int(uid), step)] = deque(maxlen=self.buffer_size)
                if self.advantage_norm == "track+batch":
                    history.extend(group.tolist())  # 1. history ← history + this batch
                    values = np.fromiter(history, dtype=np.float64, count=len(history))
                elif self.advantage_norm == "track":
                    values = np.fromiter(history, dtype=np.float64, count=len(history))
                else:  # track+whole_batch: history before this batch ∪ every reward at step k
                    values = np.concatenate([np.fromiter(history, dtype=np.float64), column])
                if len(values) >= self.min_count:
                    mean[members, col], std[members, col] = values.mean(), values.std()  # ddof = 0
                else:
                    mean[members, col], std[members, col] = batch_mean, batch_std
                    fallback += 1
                if self.advantage_norm != "track+batch":
                    history.extend(group.tolist())  # the batch joins the history afterwards
        centred = r64 - mean  # [B, R]
        if self.adv_std == "step":  # one σ per step for every input: RMS over the batch      [R]
            std[:] = np.sqrt(np.mean(centred**2, axis=0, keepdims=True))
        elif self.adv_std == "batch":  # one σ for the whole batch, every step                []
            std[:] = np.sqrt(np.mean(centred**2))
        adv = centred / np.sqrt(np.maximum(std * std, self.std_floor**2) + STD_EPS)  # [B, R]

        clipped = np.clip(adv, -self.adv_clip, self.adv_clip)
        self._last = {
            "advantages/reward_mean": float(r64.mean()),
            "advantages/reward_std": float(r64.std()),
            "advantages/mean": float(clipped.mean()),
            "advantages/std": float(clipped.std()),
            "advantages/clip_frac": float((np.abs(adv) > self.adv_clip).mean()),
            "advantages/batch_stats_frac": fallback / (len(unique_ids) * num_rewards),
        }
        out = torch.from_numpy(clipped.astype(np.float32))
        if isinstance(rewards, torch.Tensor):
            out = out.to(rewards.device)
        return out

    # ------------------------------------------------------------------------------ logging
    def stats(self) -> dict[str, float]:
        """Metrics for logging: the tracker's size and the last batch's reward/advantage figures.

        ``advantages/batch_stats_frac`` is the fraction of (input, step) groups of the last batch
        normalised with the whole batch's statistics (fewer than ``min_count`` tracked rewards).
        """
        lengths = [len(h) for h in self._history.values()]
        return {
            "advantages/tracked_inputs": float(len({uid for uid, _ in self._history})),
            "advantages/tracked_keys": float(len(self._history)),
            "advantages/mean_history_len": float(np.mean(lengths)) if lengths else 0.0,
            **self._last,
        }

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The reward history as plain Python values (JSON/msgpack-serializable).

        ``history`` is a list of ``[input_id, step, [rewards, oldest first]]``, sorted by key.
        The settings are recorded for inspection; :meth:`load_state_dict` keeps the instance's own.
        """
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "advantage_norm": self.advantage_norm,
            "adv_std": self.adv_std,
            "std_floor": self.std_floor,
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "history": [
                [uid, step, list(self._history[(uid, step)])] for uid, step in sorted(self._history)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the history with a :meth:`state_dict`'s.

        The settings (buffer_size, min_count, adv_clip, advantage_norm, adv_std, std_floor) stay those this tracker
        was built with, i.e. the run's config; a smaller ``buffer_size`` keeps the newest rewards.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"RewardStatTracker.load_state_dict: expected a dict with format {_STATE_FORMAT!r}"
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"RewardStatTracker.load_state_dict: unsupported version {state.get('version')!r} "
                f"(expected {_STATE_VERSION})"
            )
        history: dict[tuple[int, int], deque[float]] = {}
        for n, entry in enumerate(state.get("history", [])):
            try:
                uid, step, values = entry
                key = (int(uid), int(step))
                floats = [float(v) for v in values]
            except (TypeError, ValueError):
                raise ValueError(
                    f"RewardStatTracker.load_state_dict: history[{n}]: expected "
                    f"[input_id, step, [rewards...]], got {entry!r:.200}"
                ) from None
            if not all(np.isfinite(floats)):
                raise ValueError(
                    f"RewardStatTracker.load_state_dict: history[{n}]: non-finite reward"
                )
            if key in history:
                raise ValueError(f"RewardStatTracker.load_state_dict: duplicate key {key}")
            history[key] = deque(floats, maxlen=self.buffer_size)
        self._history = history
        self._last = {}


def advantages_per_step(
    advantages: torch.Tensor, reward_steps: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """Spread the R rewarded steps' advantages over all K steps: [B, R] → [B, K].

    Step k takes the advantage of the first rewarded step at or after it — the reward its action
    leads to next. ``all``: identity; ``last`` (ablation "Reward x0"): every step gets the final
    output's advantage, as in DDPO; ``every:n``: each block of n steps shares its block's reward.
    ``common.config.parse_reward_steps`` always rewards the last step, so every step has one.

    Args:
        advantages: float [B, R]. reward_steps: int64 [R], strictly increasing, in [0, K).
    """
    steps = torch.as_tensor(reward_steps, dtype=torch.int64, device=advantages.device)  # [R]
    if advantages.dim() != 2 or steps.shape != (advantages.shape[1],):
        raise ValueError(
            f"advantages [B, R] and reward_steps [R] disagree: {list(advantages.shape)} vs "
            f"{list(steps.shape)}"
        )
    if steps.numel() == 0 or bool((steps[1:] <= steps[:-1]).any()) or int(steps[0]) < 0:
        raise ValueError(
            f"reward_steps: expected strictly increasing indices >= 0, got {steps.tolist()}"
        )
    if int(steps[-1]) != num_steps - 1:
        raise ValueError(
            f"reward_steps: the last step ({num_steps - 1}) must be rewarded so that every step "
            f"has "
            f"a following reward, got {steps.tolist()}"
        )
    # column of the first reward step ≥ k, for each k                                        [K]
    column = torch.searchsorted(steps, torch.arange(num_steps, device=steps.device))
    return advantages[:, column]


def reward_increments(rewards: torch.Tensor) -> torch.Tensor:
    """``algorithm.step_reward=increment``: what each rewarded step added, [B, R] → [B, R].

    u_{i,0} = r_{i,0};  u_{i,j} = r_{i,j} − r_{i,j−1} for j ≥ 1 (columns are the rewarded steps, in
    order). Not in the paper: a variance reduction for the step-wise reward. Across the G samples
    of one input, most of the spread of r_{i,j} comes from the initial noise x_T and the earlier
    actions, which the action of step j does not control; the score of the state it started from
    (the previous rewarded image) is a baseline that removes that part. The increments telescope:
    Σ_j u_{i,j} = r_{i,R−1}. With R = 1 (``reward_steps=last``) it is the identity.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected [B, R], got shape {list(rewards.shape)}")
    out = rewards.clone()
    out[:, 1:] = rewards[:, 1:] - rewards[:, :-1]
    return out
