"""The reward-sink contract between rollout and the reward service (DESIGN.md §1, §2.3).

The sampler never waits for the score of step t before computing step t−1: it calls
``sink.submit`` with the decoded x̂0 images of a reward step and keeps denoising; the scores are
gathered once the trajectory is done. Implementations: the reward service's client
(:class:`reward_server.client.RewardClient`), and the local :class:`rollout.reward_sink.
ThreadPoolSink` / :class:`rollout.reward_sink.NullSink`. Every implementation returns its scores
through :func:`check_scores`.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def check_scores(scores: Any, n: int) -> np.ndarray:
    """``scores`` as float32 [n]; :class:`RewardError` on a wrong count or an infinite score.

    NaN is allowed: an "unscorable" image, masked by the driver.
    """
    arr = np.asarray(scores, dtype=np.float32).reshape(-1)
    if arr.shape[0] != n:
        raise RewardError(f"reward sink returned {arr.shape[0]} scores for {n} images")
    if np.any(np.isinf(arr)):
        bad = np.flatnonzero(np.isinf(arr)).tolist()
        raise RewardError(f"reward sink returned infinite scores at positions {bad}")
    return arr
