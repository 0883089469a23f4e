"""Where the sampler hands reward-step images, as soon as each exists (DESIGN.md §1, §2.3).

The sampler never waits for the score of step t before computing step t−1: it calls
``sink.submit`` with the decoded x̂0 images of a reward step and keeps denoising; the scores are
gathered once the trajectory is done. The reward service client (reward_server/) implements the
same Protocol; :class:`ThreadPoolSink` wraps any local scoring callable.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

import numpy as np

__all__ = ["RewardSink", "ThreadPoolSink", "NullSink", "RewardError"]


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


def _check_scores(scores: Any, n: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float32).reshape(-1)
    if arr.shape[0] != n:
        raise RewardError(f"reward sink returned {arr.shape[0]} scores for {n} images")
    if np.any(np.isinf(arr)):  # NaN is allowed: "unscorable", masked by the driver
        bad = np.flatnonzero(np.isinf(arr)).tolist()
        raise RewardError(f"reward sink returned infinite scores at positions {bad}")
    return arr


class ThreadPoolSink:
    """Scores with a local callable ``fn(images uint8 [N,H,W,3]) -> [N]`` on background threads."""

    def __init__(self, fn: Callable[[np.ndarray], Any], max_workers: int = 1):
        self._fn = fn
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward-sink")

    def submit(self, images: np.ndarray, ids: Sequence[str]) -> Future:
        return self._pool.submit(lambda: _check_scores(self._fn(images), len(images)))

    def gather(self, handles: Sequence[Future]) -> list[np.ndarray]:
        return [h.result() for h in handles]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class NullSink:
    """No reward service (SFT, or a reward computed by the learner): scores are NaN placeholders."""

    def submit(self, images: np.ndarray, ids: Sequence[str]) -> int:
        return len(images)

    def gather(self, handles: Sequence[int]) -> list[np.ndarray]:
        return [np.full(n, np.nan, dtype=np.float32) for n in handles]
