"""The reward-sink contract between rollout and the reward service (DESIGN.md §1, §2.3).

The sampler never waits for the score of step t before computing step t−1: it calls
``sink.submit`` with the decoded x̂0 images of a reward step and keeps denoising; the scores are
gathered once the trajectory is done. Implementations: the reward service's client
(:class:`reward_server.client.RewardClient`), and the local :class:`rollout.reward_sink.
ThreadPoolSink` / :class:`rollout.reward_sink.NullSink`. Every implementation returns its scores
through :func:`check_scores`, the project's one score validator (the scorers and both reward
services check with it too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["RewardError", "RewardSink", "check_scores"]


class RewardError(RuntimeError):
    """A reward that could not be obtained. Never replaced by a silent 0."""


class RewardSink(Protocol):
    def submit(self, images: np.ndarray, ids: Sequence[str]) -> Any:
        """Start scoring ``images`` uint8 [N, H, W, 3]; return a handle at once (non-blocking)."""
        ...

    def gather(self, handles: Sequence[Any]) -> list[np.ndarray]:
        """Wait for the handles; return one float32 [N] array of scores in [0, 1] per handle.
        NaN marks an image the reward model could not score (its answer was not a number): the
        driver drops that trajectory from the update (``reward.max_invalid_fraction``)."""
        ...


def show_ids(ids: Sequence[Any], limit: int = 8) -> str:
    """``ids`` for an error message: the first ``limit`` and how many more."""
    ids = list(ids)
    more = f" … (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return repr(ids[:limit])[:-1] + more + "]" if ids else "[]"


def valid_scores(scores: np.ndarray, *, nan_ok: bool = True) -> np.ndarray:
    """bool mask of the entries of ``scores`` that are scores: in [0, 1], or NaN where ``nan_ok``
    ("unscorable"). Pure; :func:`check_scores` and the per-image check of a scorer's batch share it."""
    arr = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ((arr >= 0.0) & (arr <= 1.0)) | (np.isnan(arr) & nan_ok)


def check_scores(
    scores: Any,
    n: int,
    *,
    nan_ok: bool = True,
    ids: Sequence[str] | None = None,
    source: str = "reward sink",
    error: Callable[[str], Exception] = RewardError,
    dtype: Any = np.float32,
) -> np.ndarray:
    """The one score check of the project: ``scores`` as a ``dtype`` [n] array of values in [0, 1].

    Every place a score enters or leaves (a scorer's ``ScoreBatch``, the scoring step of both
    services, the client reading an answer, a local sink) calls this, so a score means the same
    thing everywhere. NaN is "unscorable" (the reward model's answer for that image is not a score;
    the driver masks its trajectory): allowed where ``nan_ok``. Raises ``error(message)`` on a
    wrong count, or on ±inf, a NaN that is not allowed, or a value outside [0, 1]; the message
    names ``source`` and the offending ``ids`` (positions when None) and values.
    """
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise error(f"{source} returned {arr.shape[0]} scores for {n} images")
    where = np.flatnonzero(~valid_scores(arr, nan_ok=nan_ok)).tolist()
    if where:
        named = [ids[i] for i in where] if ids is not None else where
        kinds = sorted({"infinite" if np.isinf(arr[i]) else "NaN" if np.isnan(arr[i]) else "outside [0, 1]"
                        for i in where})
        raise error(
            f"{source} returned non-finite or out-of-range scores ({', '.join(kinds)}) for "
            f"{'ids' if ids is not None else 'positions'} {show_ids(named)}: {arr[where][:8].tolist()}"
        )
    return arr.astype(dtype, copy=False)
