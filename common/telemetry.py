"""Metric names and constructors (DESIGN.md §5).

Inside Ray, metrics are ``ray.util.metrics`` objects, exported on Ray's metrics port with the
``ray_`` prefix (so ``restore_rl_rollout_trajectories_total`` is scraped as
``ray_restore_rl_rollout_trajectories_total``). The standalone reward server uses
``prometheus_client`` with the same names. One table of names keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "restore_rl_"

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without PREFIX
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)

METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in [
        MetricSpec("rollout_trajectories_total", "counter", "Trajectories sampled.", ("worker",)),
        MetricSpec("rollout_denoise_steps_total", "counter", "Denoising steps run (per trajectory).", ("worker",)),
        MetricSpec("rollout_trajectory_seconds", "histogram", "Wall time to sample one batch of trajectories.",
                   ("worker",), _SECONDS),
        MetricSpec("reward_images_total", "counter", "Images scored by the reward service.", ("backend",)),
        MetricSpec("reward_batch_size", "histogram", "Images per scoring batch.", ("backend",), _BATCH),
        MetricSpec("reward_latency_seconds", "histogram", "Latency of one scoring batch.", ("backend",), _SECONDS),
        MetricSpec("reward_queue_depth", "gauge", "Requests waiting or in flight in the reward service.", ()),
        MetricSpec("reward_errors_total", "counter", "Reward errors by kind.", ("kind",)),
        MetricSpec("learner_steps_total", "counter", "Optimizer steps (skipped ones tagged).", ("status",)),
        MetricSpec("learner_step_seconds", "histogram", "Wall time of one learner update.", (), _SECONDS),
        MetricSpec("learner_loss", "gauge", "Loss by part (total, rl, sft, kl).", ("part",)),
        MetricSpec("reward_mean", "gauge", "Mean reward of the last batch.", ()),
        MetricSpec("policy_version", "gauge", "Policy version held by a role.", ("role",)),
        MetricSpec("staleness", "gauge", "learner_version - trajectory version of the last batch used.", ()),
        MetricSpec("weight_sync_seconds", "histogram", "Wall time of one weight sync.", ("method",), _SECONDS),
        MetricSpec("weight_sync_bytes_total", "counter", "Bytes of trainable weights synced.", ("method",)),
        MetricSpec("dropped_trajectories_total", "counter", "Trajectories dropped, by reason.", ("reason",)),
        MetricSpec("data_skipped_files", "gauge", "Training files skipped as bad (data.on_bad_file=skip), by reason.",
                   ("reason",)),
        MetricSpec("recovered_total", "counter",
                   "Recoveries from a fault, by role (rollout: a dead worker's chunk re-sent; learner: the "
                   "actors rebuilt and resumed from the newest checkpoint).", ("role",)),
        MetricSpec("reward_model_version", "gauge",
                   "Version index of the reward model the job scores with (iterative RL bumps it).", ()),
    ]
}


def ray_metric(name: str, default_tags: dict[str, str] | None = None):
    """Construct the ``ray.util.metrics`` object for a metric of :data:`METRICS` (in an actor)."""
    from ray.util import metrics

    spec = METRICS[name]
    if spec.kind == "counter":
        m = metrics.Counter(spec.full_name, spec.description, tag_keys=spec.tag_keys)
    elif spec.kind == "gauge":
        m = metrics.Gauge(spec.full_name, spec.description, tag_keys=spec.tag_keys)
    else:
        m = metrics.Histogram(spec.full_name, spec.description, boundaries=list(spec.boundaries),
                              tag_keys=spec.tag_keys)
    if default_tags:
        m.set_default_tags(default_tags)
    return m


def prometheus_metric(name: str, registry=None):
    """Construct the ``prometheus_client`` object for a metric of :data:`METRICS` (standalone)."""
    import prometheus_client as pc

    spec = METRICS[name]
    kwargs = {"labelnames": spec.tag_keys, "registry": registry}
    if spec.kind == "counter":
        # prometheus_client appends _total itself
        return pc.Counter(spec.full_name.removesuffix("_total"), spec.description, **kwargs)
    if spec.kind == "gauge":
        return pc.Gauge(spec.full_name, spec.description, **kwargs)
    return pc.Histogram(spec.full_name, spec.description, buckets=spec.boundaries, **kwargs)
