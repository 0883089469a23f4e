"""The one micro-batcher of both reward services (issue 16 item 3).

The Serve replica (:mod:`reward_server.serve_app`) and the standalone HTTP server
(:mod:`reward_server.http_server`) put every image they are asked to score into a
:class:`MicroBatcher`, which runs one (blocking) scorer call at a time in a worker thread and
collects the images that arrive meanwhile into the next call.

When a batch is cut (:func:`batch_target`): as soon as it holds ``max_batch_size`` images, or
``batch_wait_timeout_s`` after its first image arrived, or — the adaptive rule — as soon as it
holds as many images as were recently waiting or being scored at the same time (the largest
such count over the last ``memory`` batches; a batch that waits out the whole timeout short of
that count resets the memory, so a drop in load costs one wait, not ``memory`` of them). One
client sending one image at a time (concurrency 1) then never waits for company that cannot
come; 16 clients in lock step fill a batch of 16 and stop waiting the moment the 16th image
arrives. With ``adaptive=False`` a
batch waits for ``max_batch_size`` images or the timeout, as Ray Serve's ``@serve.batch``
does (``ray/serve/batching.py``: the batch is taken when full or ``batch_wait_timeout_s`` after
its first request).

Why one batcher and not Serve's HTTP ingress for both: rollout workers reach the replicas through
``DeploymentHandle`` calls with numpy arrays (no encoding, no proxy hop), and the standalone
server runs without Ray at all (one process, what a user outside the job runs); what the two
must share is how they batch and how they check a score, and both now share those code paths.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from reward_server.factory import ScoredImage, ScoreFailed, score_batch

if TYPE_CHECKING:
    from reward_server.scoring import Scorer

__all__ = ["BatchMetrics", "MicroBatcher", "batch_target"]


class BatchMetrics(Protocol):
    """Where a batcher reports each scorer call (Prometheus registry or Ray metrics)."""

    def batch(self, size: int, seconds: float, ok: int) -> None: ...


def batch_target(max_batch_size: int, recent_peaks: Sequence[int], adaptive: bool) -> int:
    """How many images a batch waits for (the timeout still bounds the wait).

    ``recent_peaks``: the most images outstanding at once (waiting or being scored) in each of the
    last few batch cycles, the current one included. No history yet: ``max_batch_size`` (nothing
    says the load is light). Pure: tested without an event loop.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if not adaptive or not recent_peaks:
        return max_batch_size
    return max(1, min(max_batch_size, max(recent_peaks)))


@dataclass
class _Item:
    image_id: str
    image: np.ndarray
    future: asyncio.Future
    arrived: float  # loop.time() when queued


class MicroBatcher:
    """Collects images from concurrent requests into scorer batches (one scorer call at a time).

    Args:
        scorer: any :class:`reward_server.scoring.Scorer` (blocking ``score``).
        max_batch_size: most images per scorer call.
        batch_wait_timeout_s: longest a batch waits to fill after its first image (0: never waits).
        metrics: receives every batch's size, seconds and scored count.
        adaptive: cut a batch once it holds as many images as were recently outstanding at once
            (module docstring); False: wait for a full batch or the timeout.
        memory: batch cycles the adaptive rule remembers.
        stats_window: how many recent batch sizes :attr:`batch_sizes` keeps.

    The scorer runs in a worker thread so the event loop keeps accepting requests (and filling the
    next batch) meanwhile. :meth:`start` must run on the loop that calls :meth:`score`.
    """

    def __init__(
        self,
        scorer: Scorer,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        metrics: BatchMetrics | None = None,
        *,
        adaptive: bool = True,
        memory: int = 8,
        stats_window: int = 10_000,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        if memory < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.metrics = metrics
        self.adaptive = adaptive
        self.batch_sizes: deque[int] = deque(maxlen=stats_window)  # recent batches (tests, stats)
        self.waits_run_out = 0  # batches cut because the wait ran out short of the target
        self.last_latency_s = 0.0
        #: Scorer calls in progress: call number -> when it started (time.monotonic()).
        self.calls: dict[int, float] = {}
        self._call_ids = itertools.count()
        self._outstanding = 0  # images queued or being scored
        self._cycle_peak = 0  # most images outstanding at once since the last cut
        self._peaks: deque[int] = deque(maxlen=memory)  # that peak, for each recent cycle
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None

    @property
    def busy_since(self) -> float | None:
        """When the oldest scorer call in progress started (time.monotonic()); None when idle."""
        return min(self.calls.values(), default=None)

    @property
    def started(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="reward-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ScoreFailed("server shutting down", "scoring"))

    async def score(
        self, ids: Sequence[str], images: Sequence[np.ndarray]
    ) -> list[ScoredImage | ScoreFailed]:
        """One result per image, in order (errors are returned, not raised)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if len(ids) != len(images):
            raise ValueError(f"MicroBatcher.score: {len(ids)} ids for {len(images)} images")
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [_Item(i, im, loop.create_future(), now) for i, im in zip(ids, images)]
        self._outstanding += len(items)
        self._cycle_peak = max(self._cycle_peak, self._outstanding)
        try:
            for item in items:
                self._queue.put_nowait(item)
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            self._outstanding -= len(items)

    def target(self) -> int:
        """Images the batch being formed waits for (see :func:`batch_target`)."""
        return batch_target(self.max_batch_size, [*self._peaks, self._cycle_peak] if self._peaks else [],
                            self.adaptive)

    async def _next_batch(self) -> list[_Item]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        cut = batch[0].arrived + self.batch_wait_timeout_s
        target, ran_out = self.max_batch_size, False
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            target = self.target()
            remaining = cut - loop.time()
            if remaining <= 0 or len(batch) >= target:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                ran_out = True
                break
        if ran_out:
            self.waits_run_out += 1
            # This batch waited the whole timeout short of what the memory promised: the load
            # fell. (A batch cut at once because its first image arrived while the scorer was
            # busy, long enough ago, proves nothing and keeps the memory.) The memory is
            # what is outstanding now (no scorer call runs between batches: the images waiting),
            # so that only this one batch pays the wait (not the next ``memory`` batches).
            self._peaks.clear()
            self._peaks.append(self._outstanding)
        else:
            # This cycle's peak joins the memory.
            self._peaks.append(self._cycle_peak)
        # The next cycle starts from what is still outstanding.
        self._cycle_peak = self._outstanding
        return [item for item in batch if not item.future.done()]  # drop abandoned requests

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            start = time.perf_counter()
            call = next(self._call_ids)
            self.calls[call] = time.monotonic()
            try:
                results = await asyncio.to_thread(
                    score_batch, self.scorer, [b.image_id for b in batch], [b.image for b in batch]
                )
            except Exception as err:  # noqa: BLE001 — score_batch returns errors; this is a bug guard
                results = [ScoreFailed(f"{type(err).__name__}: {err}", "scoring")] * len(batch)
            finally:
                del self.calls[call]
            self.last_latency_s = time.perf_counter() - start
            self.batch_sizes.append(len(batch))
            if self.metrics is not None:
                self.metrics.batch(
                    len(batch), self.last_latency_s, sum(isinstance(r, ScoredImage) for r in results)
                )
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)
