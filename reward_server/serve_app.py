"""The reward service inside the Ray job: Ray Serve deployment ``IQAScorer`` (DESIGN.md §3).

Each request is one image; the :class:`~reward_server.batcher.MicroBatcher` the standalone HTTP
server uses too gathers concurrent requests (from every rollout worker) into one scorer call. Rollout workers call it through a ``DeploymentHandle`` with numpy
arrays — no HTTP, no encoding — via :class:`reward_server.client.RewardClient`::

    handle = deploy(cfg.reward)                                   # in the driver
    scored = handle.score.remote(image, "7:0:3").result()         # ScoredImage(id, score, levels)

Sizing (all from ``RewardConfig``, independent of rollout):

* ``max_batch_size`` / ``batch_wait_timeout_s`` / ``adaptive_batch_wait``: the batch is cut when
  it is full, when the first request has waited that long, or (adaptive) once it holds as many
  images as were recently outstanding at once (:mod:`reward_server.batcher`).
* ``max_ongoing_requests`` per replica: Serve's default (5) would cap every batch at 5 requests;
  the config requires it to be >= ``max_batch_size``.
* ``num_replicas``, or ``autoscaling`` between ``min_replicas`` and ``max_replicas`` at
  ``target_ongoing_requests`` per replica.
* ``num_gpus_per_replica`` / ``num_cpus_per_replica`` / ``custom_resources`` (``ray_actor_options``:
  the custom resources keep every replica, a new one after a scale-up too, on the reward pool);
  ``tensor_parallel_size`` is passed to vLLM, which shards the model over the GPUs Ray gave the
  replica (so ``num_gpus_per_replica`` must be at least ``tensor_parallel_size``).

Metrics (``ray.util.metrics``, scraped from Ray's metrics export port with the ``ray_`` prefix):
reward_images_total, reward_batch_size, reward_latency_seconds, reward_queue_depth,
reward_errors_total{kind}. :meth:`IQAScorer.stats` returns the same counts from the replica.

A reward that cannot be computed (a scorer error, a non-finite score) fails its request with
:class:`~reward_server.factory.ScoreFailed` — never a 0. :meth:`IQAScorer.check_health` fails
while a scorer call is stuck (``reward.scorer_stall_s``): Serve replaces the replica.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from common.placement import actor_resources
from reward_server.batcher import MicroBatcher
from reward_server.factory import ScoredImage, ScoreFailed, check_image, scorer_spec

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from common.config import RewardConfig
    from reward_server.scoring import Scorer

__all__ = [
    "DEFAULT_APP_NAME",
    "DEPLOYMENT_NAME",
    "IQAScorer",
    "build_app",
    "deploy",
    "deployment_options",
    "get_handle",
]

DEPLOYMENT_NAME = "IQAScorer"
DEFAULT_APP_NAME = "reward"

# Environment the replicas need to see as the driver does: offline model hubs, vLLM's CPU KV
# cache size (ENVIRONMENT.md "vLLM on CPU"). Copied into the replicas' runtime_env when set.
_PROPAGATED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_CPU_KVCACHE_SPACE")


@serve.deployment(name=DEPLOYMENT_NAME)
class IQAScorer:
    """One reward replica: a scorer behind a batching queue.

    Args:
        scorer_factory: zero-arg callable that builds the scorer in the replica (a
            :class:`~reward_server.factory.ScorerSpec`; vLLM engines cannot be pickled).
        max_batch_size: most images per scorer call.
        batch_wait_timeout_s: longest wait for a batch to fill after its first request.
        adaptive_batch_wait: the batcher's adaptive cut (:class:`~reward_server.batcher.MicroBatcher`).
        max_image_pixels: per-image pixel cap (bad input otherwise).
        stats_window: how many recent batch sizes :meth:`stats` keeps.
        scorer_stall_s: a scorer call running longer than this fails :meth:`check_health`, and
            Serve replaces the replica (a stuck engine must not keep taking requests).
    """

    def __init__(
        self,
        scorer_factory: Callable[[], Scorer],
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        adaptive_batch_wait: bool = True,
        max_image_pixels: int | None = None,
        stats_window: int = 10_000,
        scorer_stall_s: float = 300.0,
    ) -> None:
        from common.telemetry import ray_metric

        self.scorer = scorer_factory()
        self.max_image_pixels = max_image_pixels
        tags = {"backend": self.scorer.name}
        self._m_images = ray_metric("reward_images_total", tags)
        self._m_batch = ray_metric("reward_batch_size", tags)
        self._m_latency = ray_metric("reward_latency_seconds", tags)
        self._m_queue = ray_metric("reward_queue_depth")
        self._m_errors = ray_metric("reward_errors_total")
        self._ongoing = 0  # requests waiting for a batch or being scored in this replica
        self._images = 0
        self._errors: Counter[str] = Counter()
        self.scorer_stall_s = scorer_stall_s
        # Started on the first request, on the event loop Serve runs this replica's requests on.
        self.batcher = MicroBatcher(self.scorer, max_batch_size, batch_wait_timeout_s, self,
                                    adaptive=adaptive_batch_wait, stats_window=stats_window)
        self._calls = self.batcher.calls  # scorer calls in progress: number -> start (monotonic)
        # Wall-clock time this replica became able to serve: a client whose request timed out
        # compares it with when it sent the request (a replica younger than the request = a restart).
        self._started_at = time.time()

    def check_health(self) -> None:
        """Serve's periodic health check: raises while a scorer call has run for longer than
        ``scorer_stall_s`` (Serve then replaces this replica)."""
        now = time.monotonic()
        stuck = [now - t for t in self._calls.values() if now - t > self.scorer_stall_s]
        if stuck:
            raise RuntimeError(
                f"scorer call running for {max(stuck):.0f} s (> scorer_stall_s {self.scorer_stall_s:g} s): "
                "the scoring engine is stuck"
            )

    # -- requests --------------------------------------------------------------------------
    async def score(self, image: np.ndarray, image_id: str) -> ScoredImage:
        """Score one uint8 [H, W, 3] RGB image; raises ScoreFailed (kind bad_input | unscorable |
        scoring)."""
        try:
            check_image(image, image_id, self.max_image_pixels)
        except ScoreFailed:
            self._error("bad_input")
            raise
        if not self.batcher.started:
            await self.batcher.start()
        self._ongoing += 1
        self._m_queue.set(self._ongoing)
        try:
            (result,) = await self.batcher.score([image_id], [image])
        finally:
            self._ongoing -= 1
            self._m_queue.set(self._ongoing)
        if isinstance(result, ScoreFailed):
            self._error(result.kind)
            raise result
        return result._replace(version=getattr(self.scorer, "version", None))

    def batch(self, size: int, seconds: float, ok: int) -> None:
        """The batcher's report of one scorer call (:class:`~reward_server.batcher.BatchMetrics`)."""
        self._m_batch.observe(size)
        self._m_latency.observe(seconds)
        if ok:
            self._images += ok
            self._m_images.inc(ok)

    def _error(self, kind: str) -> None:
        self._errors[kind] += 1
        self._m_errors.inc(1, tags={"kind": kind})

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What this replica observed: recent batch sizes, images scored, errors by kind."""
        import ray

        return {
            "batch_sizes": list(self.batcher.batch_sizes),
            "images": self._images,
            "errors": dict(self._errors),
            "ongoing": self._ongoing,
            "replica": ray.get_runtime_context().get_actor_name(),
            "worker_id": ray.get_runtime_context().get_worker_id(),  # WorkerId label of its metrics
            "pid": os.getpid(),
        }

    def info(self) -> dict[str, str]:
        """The scorer's name and version (echoed in HTTP responses), and when this replica started
        (``started_at``, Unix seconds)."""
        return {"model": self.scorer.name, "version": self.scorer.version, "started_at": f"{self._started_at:.3f}"}

    def __del__(self) -> None:
        # Serve calls __del__ on graceful shutdown: stop a vLLM engine's core process with the
        # replica instead of leaving it to be reaped later.
        from reward_server.scoring import shutdown_engine

        try:
            shutdown_engine(getattr(self, "scorer", None))
        except Exception as err:  # noqa: BLE001 — best effort while the replica goes away
            logging.getLogger(__name__).warning("vLLM engine shutdown failed: %s", err)


def deployment_options(reward: RewardConfig) -> dict[str, Any]:
    """Serve deployment options from the reward config (pure: testable without Ray)."""
    if (
        reward.backend == "vllm"
        and reward.num_gpus_per_replica > 0
        and reward.num_gpus_per_replica < reward.tensor_parallel_size
    ):
        raise ValueError(
            f"reward.num_gpus_per_replica ({reward.num_gpus_per_replica}) < reward.tensor_parallel_size "
            f"({reward.tensor_parallel_size}): vLLM shards the model over the replica's own GPUs"
        )
    # custom_resources pin the replicas to the reward pool (e.g. the KubeRay group advertising
    # reward_gpu); num_gpus alone would let a replica take a rollout or learner GPU.
    actor = actor_resources(reward.num_cpus_per_replica, reward.num_gpus_per_replica, reward.custom_resources)
    env = {k: os.environ[k] for k in _PROPAGATED_ENV if k in os.environ}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    opts: dict[str, Any] = {
        "max_ongoing_requests": reward.max_ongoing_requests,
        "ray_actor_options": actor,
    }
    if reward.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": reward.min_replicas,
            "max_replicas": reward.max_replicas,
            "target_ongoing_requests": reward.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = reward.num_replicas
    return opts


def build_app(
    reward: RewardConfig, *, scorer_factory: Callable[[], Scorer] | None = None
) -> serve.Application:
    """The Serve application of the reward service (bind only; :func:`deploy` runs it).

    ``scorer_factory``: overrides the config's scorer (must be picklable); default
    :func:`reward_server.factory.scorer_spec` of ``reward``.
    """
    factory = scorer_factory if scorer_factory is not None else scorer_spec(reward)
    return IQAScorer.options(**deployment_options(reward)).bind(
        factory,
        max_batch_size=reward.max_batch_size,
        batch_wait_timeout_s=reward.batch_wait_timeout_s,
        adaptive_batch_wait=reward.adaptive_batch_wait,
        max_image_pixels=reward.max_image_pixels,
        scorer_stall_s=reward.scorer_stall_s,
    )


def deploy(
    reward: RewardConfig,
    name: str = DEFAULT_APP_NAME,
    *,
    scorer_factory: Callable[[], Scorer] | None = None,
) -> DeploymentHandle:
    """Run the reward app on the connected Ray cluster and return its handle once it is ready.

    Serve is started without an HTTP proxy when this call starts it (the job talks to the
    replicas through handles; the standalone HTTP API is :mod:`reward_server.http_server`).
    """
    serve.start(proxy_location="Disabled")
    return serve.run(build_app(reward, scorer_factory=scorer_factory), name=name, route_prefix=None)


def get_handle(app_name: str = DEFAULT_APP_NAME) -> DeploymentHandle:
    """The handle of a running reward app (e.g. from inside a rollout actor)."""
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)
