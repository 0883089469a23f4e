"""Learner → rollout weight sync, the driver's side (DESIGN.md §4).

:class:`WeightSync` decides the transport, forms the group, asks learner rank 0 to send and every
rollout worker to receive, and checks the result; the payloads, the transports and the members'
own timeouts are the contract in :mod:`common.weight_transport`, which learner and rollout share.

The third level of hard timeouts is here: the driver waits at most ``timeout_s +
DRIVER_GRACE_S`` for the members' answers and names each member that failed, died or never
answered, so a dead or wedged member can never hang the job.

Versions: a worker's ``set_weights`` rejects a version that does not move forward; after every
sync the driver checks that each worker now holds exactly the learner's version and raises
:class:`StaleWorkerError` naming the ones that do not — a missed sync is an error, never a
silently stale worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from common.weight_transport import (
    DRIVER_GRACE_S,
    Method,
    StaleWorkerError,
    WeightLayout,
    WeightSyncError,
    WeightSyncTimeout,
    choose_method,
)

__all__ = ["WeightSync"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- driver
def _ray_error_text(err: BaseException) -> str:
    import ray

    if isinstance(err, ray.exceptions.RayActorError):
        return "actor died or is unreachable"
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if getattr(err, "cause", None) is not None else err
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return f"{type(err).__name__}: {err}"


class WeightSync:
    """Driver-side weight sync from learner rank 0 to every rollout worker (DESIGN.md §4).

    ``learner`` is the rank-0 learner actor (``get_version``, ``weight_layout``,
    ``weight_sync_address``, ``init_weight_sync``, ``broadcast_weights``, ``export_weights``,
    ``close_weight_sync``); ``workers`` are RolloutWorker actors (``init_weight_sync``,
    ``receive_weights``, ``policy_version``, ``close_weight_sync``).

        sync = WeightSync(learner, workers, method="auto", bucket_mb=64, timeout_s=60)
        sync.setup()                  # picks the method; forms the group for collective
        metrics = sync.sync()         # after each update: raises WeightSyncError / StaleWorkerError

    Sync only while the workers are idle: a worker busy sampling starts its receive late, and
    that counts against ``timeout_s``. After a failed collective sync the group is broken:
    :meth:`reset` (optionally with replacement workers) forms a new one.
    """

    def __init__(
        self,
        learner: Any,
        workers: Sequence[Any],
        *,
        method: str = "auto",
        bucket_mb: float = 64.0,
        timeout_s: float = 60.0,
        backend: str = "auto",
    ):
        if not workers:
            raise ValueError("WeightSync: no rollout workers")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        self.learner = learner
        self.workers = list(workers)
        self.requested_method = method
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.timeout_s = float(timeout_s)
        self.backend = backend
        self.method: Method | None = None
        self.layout: WeightLayout | None = None
        self._on_gpu = False
        self.synced_version: int | None = None
        self._group_ready = False
        self._broken = False
        self._metrics: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, learner: Any, workers: Sequence[Any], cfg: Any, *, backend: str = "auto") -> WeightSync:
        """From a :class:`common.config.WeightSyncConfig`."""
        return cls(learner, workers, method=cfg.method, bucket_mb=cfg.bucket_mb, timeout_s=cfg.timeout_s,
                   backend=backend)

    # -- set-up ---------------------------------------------------------------------------
    def _names(self) -> list[str]:
        return ["learner"] + [f"rollout worker {i}" for i in range(len(self.workers))]

    def _gather(self, refs: dict[str, Any], what: str) -> dict[str, Any]:
        """Wait for every member's answer (bounded); raise one error naming every failure."""
        import ray

        deadline = time.monotonic() + self.timeout_s + DRIVER_GRACE_S
        pending = dict(refs)
        results: dict[str, Any] = {}
        problems: list[str] = []
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=left)
            for ref in ready:
                name = next(n for n, r in pending.items() if r == ref)
                del pending[name]
                try:
                    results[name] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - collected and reported together
                    problems.append(f"{name}: {_ray_error_text(err)}")
        problems += [f"{name}: no answer within {self.timeout_s + DRIVER_GRACE_S:g} s" for name in pending]
        if problems:
            for ref in pending.values():
                try:
                    ray.cancel(ref, force=False)
                except Exception as err:  # noqa: BLE001 - best effort: the member may be gone
                    log.debug("weight sync: cancel failed: %s", err)
            cls = WeightSyncTimeout if all("no answer" in p or "Timeout" in p for p in problems) else WeightSyncError
            raise cls(f"{what} failed on {len(problems)} member(s): " + "; ".join(problems))
        return results

    def setup(self) -> Method:
        """Read the learner's layout, pick the method, form the group (collective). Idempotent."""
        import ray

        if self.layout is None:
            self.layout = ray.get(self.learner.weight_layout.remote(self.bucket_bytes), timeout=self.timeout_s)
            self._on_gpu = bool(ray.get(self.learner.uses_cuda.remote(), timeout=self.timeout_s))
        self.method = choose_method(self.requested_method, self.layout.nbytes, self._on_gpu)
        if self.method == "collective" and not self._group_ready:
            backend = self.backend
            if backend == "auto":
                backend = "nccl" if self._on_gpu else "gloo"
            addr, port = ray.get(self.learner.weight_sync_address.remote(), timeout=self.timeout_s)
            world = 1 + len(self.workers)
            args = {"world_size": world, "backend": backend, "master_addr": addr, "master_port": port,
                        "timeout_s": self.timeout_s, "layout": self.layout}
            refs = {"learner": self.learner.init_weight_sync.remote(**args)}
            for i, w in enumerate(self.workers):
                refs[f"rollout worker {i}"] = w.init_weight_sync.remote(rank=i + 1, **args)
            try:
                self._gather(refs, f"weight-sync group set-up ({backend}, {world} members)")
            except WeightSyncError:
                self._broken = True
                raise
            self._group_ready, self._broken = True, False
        return self.method

    def reset(self, workers: Sequence[Any] | None = None) -> None:
        """Leave the (broken) group on every reachable member; the next :meth:`sync` forms a new one.

        ``workers``: replacements for the rollout workers (e.g. after one died); they must hold
        weights older than the learner's (a new worker holds version 0).
        """
        import ray

        members = [self.learner, *self.workers]
        if self._group_ready or self._broken:
            refs = [m.close_weight_sync.remote() for m in members]
            ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s + DRIVER_GRACE_S)
        if workers is not None:
            self.workers = list(workers)
            self.synced_version = None
        self._group_ready = self._broken = False

    def close(self) -> None:
        self.reset()

    # -- one sync -------------------------------------------------------------------------
    def _record(self, method: str, seconds: float, nbytes: int) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._metrics is None:
            from common.telemetry import ray_metric

            self._metrics = {n: ray_metric(n) for n in ("weight_sync_seconds", "weight_sync_bytes_total")}
        self._metrics["weight_sync_seconds"].observe(seconds, tags={"method": method})
        self._metrics["weight_sync_bytes_total"].inc(nbytes, tags={"method": method})

    def resend(self) -> dict[str, float]:
        """After a worker restarted (it holds its initial weights): form the group anew if there
        is one, and push the learner's current version to every worker, even those that hold it."""
        self.reset()
        self.synced_version = None
        return self.sync(allow_same=True)

    def sync(self, *, allow_same: bool = False) -> dict[str, float]:
        """Push the learner's current weights to every worker and check every worker's version.

        Returns ``weight_sync/{seconds,bytes,version,skipped}`` (``bytes`` = payload × workers).
        A version the workers already hold is not re-sent (``skipped`` = 1); ``allow_same``:
        workers accept a version they hold (see :meth:`resend`).
        """
        import ray

        if self._broken:
            raise WeightSyncError("weight sync: the group is broken by an earlier failure; call reset() first")
        method = self.setup()
        assert self.layout is not None
        version = int(ray.get(self.learner.get_version.remote(), timeout=self.timeout_s))
        if self.synced_version is not None and version <= self.synced_version:
            return {"weight_sync/seconds": 0.0, "weight_sync/bytes": 0.0,
                    "weight_sync/version": float(version), "weight_sync/skipped": 1.0}
        t0 = time.perf_counter()
        refs: dict[str, Any] = {}
        if method == "object_store":
            # Not gathered here (that would copy the payload into the driver): a failed export
            # surfaces in every worker's ray.get of it, naming the learner's error.
            payload_ref = self.learner.export_weights.remote(self.bucket_bytes)
            for i, w in enumerate(self.workers):
                refs[f"rollout worker {i}"] = w.receive_weights.remote(version, [payload_ref], self.timeout_s,
                                                                       allow_same)
        else:
            refs["learner"] = self.learner.broadcast_weights.remote(version)
            for i, w in enumerate(self.workers):
                refs[f"rollout worker {i}"] = w.receive_weights.remote(version, None, self.timeout_s, allow_same)
        try:
            results = self._gather(refs, f"weight sync of version {version} ({method})")
        except WeightSyncError:
            self._broken = method == "collective"
            raise
        seconds = time.perf_counter() - t0
        # A worker that acknowledged a different version is out of step: name it.
        stale = [
            f"rollout worker {i} holds version {results[f'rollout worker {i}']}"
            for i in range(len(self.workers))
            if results[f"rollout worker {i}"] != version
        ]
        if stale:
            raise StaleWorkerError(f"after the sync of version {version}: " + "; ".join(stale))
        self.synced_version = version
        nbytes = self.layout.nbytes * len(self.workers)
        self._record(method, seconds, nbytes)
        return {"weight_sync/seconds": seconds, "weight_sync/bytes": float(nbytes),
                "weight_sync/version": float(version), "weight_sync/skipped": 0.0}

    def verify(self, version: int | None = None) -> None:
        """Raise :class:`StaleWorkerError` naming every worker whose version is not ``version``
        (default: the learner's). Call before a rollout to rule out a silently stale worker."""
        import ray

        if version is None:
            version = int(ray.get(self.learner.get_version.remote(), timeout=self.timeout_s))
        refs = {f"rollout worker {i}": w.policy_version.remote() for i, w in enumerate(self.workers)}
        held = self._gather(refs, "version check")
        stale = [f"{n} holds version {held[n]}" for n in refs if held[n] != version]  # worker order
        if stale:
            raise StaleWorkerError(f"learner is at version {version}: " + "; ".join(stale))
