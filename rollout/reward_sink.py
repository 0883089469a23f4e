"""Local reward sinks of the sampler (the contract is :mod:`common.reward_sink`).

:class:`ThreadPoolSink` wraps any local scoring callable (benchmarks, the compare tool, tests);
:class:`NullSink` is the sampler's default when no reward service is used (SFT, or a reward the
learner computes itself). The reward service's client (reward_server/) implements the same
Protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from common.reward_sink import check_scores

__all__ = ["NullSink", "ThreadPoolSink"]


class ThreadPoolSink:
    """Scores with a local callable ``fn(images uint8 [N,H,W,3]) -> [N]`` on background threads."""

    def __init__(self, fn: Callable[[np.ndarray], Any], max_workers: int = 1):
        self._fn = fn
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward-sink")

    def submit(self, images: np.ndarray, ids: Sequence[str]) -> Future:
        return self._pool.submit(lambda: check_scores(self._fn(images), len(images)))

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
