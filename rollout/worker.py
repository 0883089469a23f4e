"""RolloutWorker: a Ray actor that holds a policy and samples trajectories (DESIGN.md §1).

The class is plain Python (testable in-process); :func:`create_rollout_workers` wraps it with
``ray.remote`` and the resources of the rollout section of the config.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.config import AlgorithmConfig, DataConfig, ModelConfig, RolloutConfig
from common.data import build_dataset
from common.placement import actor_resources
from common.policy import build_policy
from common.reward_sink import RewardSink
from common.types import RolloutSummary, Trajectory
from rollout.sampler import SamplerSettings, sample_trajectories

__all__ = ["RolloutWorker", "StaleWeightsError", "sampler_settings", "create_rollout_workers", "rollout_actor_options"]

log = logging.getLogger(__name__)


class StaleWeightsError(RuntimeError):
    """Weights whose version does not move forward: a missed or reordered sync."""


def sampler_settings(rollout: RolloutConfig, algorithm: AlgorithmConfig) -> SamplerSettings:
    return SamplerSettings(
        num_inference_steps=rollout.num_inference_steps,
        eta=rollout.eta,
        samples_per_input=rollout.samples_per_input,
        reward_steps=algorithm.reward_steps,
        policy_target=algorithm.policy_target,
    )


class RolloutWorker:
    """Holds one policy replica and the training inputs; samples on request.

    Args:
        worker_index: rank among the rollout workers (metrics tag, logs).
        model_cfg, resolution: what :func:`common.policy.build_policy` needs.
        data_cfg: the dataset to look inputs up in (by id: only ids cross the wire).
        settings: K, η, G, reward steps, policy target.
        seed: base seed of the sampling noise.
        reward_sink_factory: builds the sink the reward-step images go to (called once, in
            the actor); None: rewards stay NaN (SFT, or reconstruction reward in the learner).
    """

    def __init__(
        self,
        worker_index: int,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        settings: SamplerSettings,
        seed: int,
        reward_sink_factory: Callable[[], RewardSink] | None = None,
    ):
        self.worker_index = worker_index
        self.settings = settings
        self.seed = seed
        self.policy = build_policy(model_cfg, data_cfg.resolution).eval()
        self.dataset = build_dataset(data_cfg, "train")
        self.sink = reward_sink_factory() if reward_sink_factory is not None else None
        self.version = 0
        self._metrics = self._make_metrics()

    def _make_metrics(self) -> dict[str, Any] | None:
        import ray

        if not ray.is_initialized():
            return None
        from common.telemetry import ray_metric

        tags = {"worker": str(self.worker_index)}
        m = {name: ray_metric(name, tags) for name in
             ("rollout_trajectories_total", "rollout_denoise_steps_total", "rollout_trajectory_seconds")}
        m["policy_version"] = ray_metric("policy_version", {"role": f"rollout-{self.worker_index}"})
        return m

    # -- weights -----------------------------------------------------------------------------
    def set_weights(self, version: int, state: dict[str, torch.Tensor], allow_same: bool = False) -> int:
        """Load trainable weights of ``version`` (must be newer than what this worker holds;
        ``allow_same``: or equal — the driver re-sending the current weights to every worker after
        one of them restarted)."""
        if version < self.version or (version == self.version and not allow_same):
            raise StaleWeightsError(
                f"rollout worker {self.worker_index}: got weights version {version}, holds {self.version}; "
                "versions must increase"
            )
        self.policy.load_trainable_state_dict(state)
        self.version = version
        if self._metrics:
            self._metrics["policy_version"].set(version)
        return version

    def policy_version(self) -> int:
        return self.version

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors this worker holds (tests compare them with the learner's)."""
        return self.policy.trainable_state_dict(clone=True)

    # -- weight sync, receiving side (the protocol lives in common/weight_transport.py) ----------
    def init_weight_sync(self, *, rank: int, world_size: int, backend: str, master_addr: str, master_port: int,
                         timeout_s: float, layout: Any) -> int:
        """Join the learner's weight-sync collective group as ``rank`` (1 + worker index)."""
        from common.weight_transport import CollectiveEndpoint

        layout.check(self.policy.trainable_state_dict(clone=False), who=f"rollout worker {self.worker_index}")
        self.close_weight_sync()
        self._weight_sync = CollectiveEndpoint(
            world_size=world_size, rank=rank, backend=backend, master_addr=master_addr, master_port=master_port,
            timeout_s=timeout_s, layout=layout, device=self.policy.device,
        )
        return rank

    def receive_weights(self, version: int, payload: Sequence[Any] | None = None, timeout_s: float = 60.0,
                        allow_same: bool = False) -> int:
        """Receive weights of ``version`` (collective broadcast, or ``[ObjectRef]`` of the object
        store) and load them; returns the version now held."""
        from common.weight_transport import receive_weights

        state = receive_weights(getattr(self, "_weight_sync", None), version, payload, timeout_s=timeout_s,
                                device=self.policy.device)
        return self.set_weights(version, state, allow_same=allow_same)

    def pid(self) -> int:
        """This actor's process id (fault-injection tests kill it by PID)."""
        return os.getpid()

    def close_weight_sync(self) -> None:
        sync = getattr(self, "_weight_sync", None)
        if sync is not None:
            sync.close()
            self._weight_sync = None

    # -- sampling ----------------------------------------------------------------------------
    def num_inputs(self) -> int:
        return len(self.dataset)

    def sample(self, input_ids: Sequence[int], round_index: int = 0) -> Trajectory:
        """Sample G trajectories for each input id; the trajectory carries this worker's version."""
        if len(input_ids) == 0:
            raise ValueError("sample: no input ids")
        bad = [i for i in input_ids if not 0 <= int(i) < len(self.dataset)]
        if bad:
            raise IndexError(f"sample: input ids {bad} outside the dataset of {len(self.dataset)} pairs")
        control = np.stack([self.dataset[int(i)].lq for i in input_ids])  # uint8 [N, H, W, 3]
        t0 = time.perf_counter()
        traj = sample_trajectories(
            self.policy, control, [int(i) for i in input_ids], self.settings,
            policy_version=self.version, seed=self.seed, round_index=round_index, sink=self.sink,
        )
        # Which reward model scored this batch (iterative RL rolls the reward app over in place).
        drain = getattr(self.sink, "drain_versions", None)
        if drain is not None:
            traj.extras["reward_versions"] = drain()
        if self._metrics:
            B = traj.batch_size
            self._metrics["rollout_trajectories_total"].inc(B)
            self._metrics["rollout_denoise_steps_total"].inc(B * traj.num_steps)
            self._metrics["rollout_trajectory_seconds"].observe(time.perf_counter() - t0)
        return traj


    def sample_split(self, input_ids: Sequence[int], round_index: int = 0) -> tuple[RolloutSummary, Trajectory,
                                                                                    torch.Tensor]:
        """:meth:`sample`, returned as three objects (the driver calls it with ``num_returns=3``):
        the small :class:`RolloutSummary` the driver reads, the trajectory without its reward
        images, and the reward images uint8 [B, R, H, W, 3]. The last two stay in the object
        store: the learners fetch the trajectory themselves, and the reward images only where a
        reward needs them (reconstruction; iterative RL's refresh in the driver)."""
        traj = self.sample(input_ids, round_index)
        light, images = traj.split_reward_images()
        return RolloutSummary.of(traj), light, images

    def sample_preview(self, input_ids: Sequence[int], round_index: int) -> dict[str, np.ndarray]:
        """One sample per input, for before/after grids: LQ, output, GT, uint8 [N, H, W, 3] each.

        Sampled without the reward sink (previews are not training data) and without metrics.
        """
        pairs = [self.dataset[int(i)] for i in input_ids]
        settings = SamplerSettings(
            num_inference_steps=self.settings.num_inference_steps, eta=self.settings.eta, samples_per_input=1,
            reward_steps="last", policy_target=self.settings.policy_target,
        )
        traj = sample_trajectories(self.policy, np.stack([p.lq for p in pairs]), [int(i) for i in input_ids],
                                   settings, policy_version=self.version, seed=self.seed, round_index=round_index)
        return {"lq": np.stack([p.lq for p in pairs]), "output": traj.final_images.numpy(),
                "gt": np.stack([p.gt for p in pairs])}


def rollout_actor_options(rollout: RolloutConfig, placement_group: Any = None, index: int = 0) -> dict[str, Any]:
    """Ray options of rollout worker ``index``: its CPUs, GPUs and ``custom_resources`` (these pin it
    to the rollout pool, with or without a placement group), its restart policy, and bundle
    ``index`` of ``placement_group`` when one is given."""
    opts = actor_resources(rollout.num_cpus_per_worker, rollout.num_gpus_per_worker, rollout.custom_resources)
    opts.update(max_restarts=rollout.max_restarts, max_task_retries=0)
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=index)
    return opts


def create_rollout_workers(
    rollout: RolloutConfig,
    algorithm: AlgorithmConfig,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    reward_sink_factory: Callable[[], RewardSink] | None = None,
    placement_group: Any = None,
) -> list[Any]:
    """Start ``rollout.num_workers`` RolloutWorker actors (one bundle each in ``placement_group``)."""
    import ray

    settings = sampler_settings(rollout, algorithm)
    actors = []
    for i in range(rollout.num_workers):
        # A dead worker is restarted by Ray (its constructor runs again: initial weights, version
        # 0); its task is not retried by Ray: the driver re-sends the chunk after pushing the
        # current weights (deploy/driver.py, _gather_rollout), so the trajectories are the same.
        actor_cls = ray.remote(RolloutWorker).options(**rollout_actor_options(rollout, placement_group, i))
        actors.append(actor_cls.remote(i, model_cfg, data_cfg, settings, rollout.seed, reward_sink_factory))
    return actors
