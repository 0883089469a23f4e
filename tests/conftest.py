"""Shared fixtures: seeded tiny models only; nothing is downloaded (HF_HUB_OFFLINE)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from common.config import ModelConfig, TinyModelConfig

#: Image side used by tests with the tiny policy (latent 16×16: fast on 2 CPU cores).
TINY_RESOLUTION = 32


@pytest.fixture
def tiny_model_config() -> TinyModelConfig:
    """The default tiny policy shape (block_out_channels (32, 64), cross_attention_dim 32)."""
    return TinyModelConfig()


@pytest.fixture
def tiny_resolution() -> int:
    return TINY_RESOLUTION


@pytest.fixture
def tiny_policy(tiny_model_config):
    """A fresh seeded tiny ControlNet + LoRA policy at TINY_RESOLUTION (about 0.1 s to build)."""
    from common.policy import build_policy

    return build_policy(ModelConfig(kind="tiny", tiny=tiny_model_config), TINY_RESOLUTION)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on loopback (127.0.0.2; ENVIRONMENT.md), started once per test session.

    Logical CPUs are over-provisioned (actors mostly wait on each other on 2 real cores).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    started = False
    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < 8:
        # Someone (a library call that started its own local Ray) left a smaller cluster behind:
        # the tests below size their jobs for 8 logical CPUs, so start the one they expect.
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


# ------------------------------------------------------------------------------ learner fixtures
@pytest.fixture(scope="session")
def tiny_data_config():
    """4 synthetic LQ/GT pairs at TINY_RESOLUTION (the learner looks ground truths up by input id)."""
    from common.config import DataConfig

    return DataConfig(kind="synthetic", resolution=TINY_RESOLUTION, num_synthetic=4, num_test=1)


@pytest.fixture(scope="session")
def tiny_trajectory(tiny_data_config):
    """Factory: ``tiny_trajectory(input_ids, num_steps=2, samples_per_input=2, policy_target=...,
    reward_steps=..., rewards=None)`` → a Trajectory sampled by a fresh seeded tiny policy (the
    learner's initial weights), version 0. Sampled once per argument set; each call returns a
    copy. ``rewards``: a [B, R] tensor to put in (default: the NaN placeholders of no sink)."""
    import copy

    import numpy as np
    import torch

    from common.data import build_dataset
    from common.policy import build_policy
    from rollout.sampler import SamplerSettings, sample_trajectories

    policy = build_policy(ModelConfig(kind="tiny"), TINY_RESOLUTION).eval()
    dataset = build_dataset(tiny_data_config, "train")
    cache = {}

    def make(input_ids, num_steps=2, samples_per_input=2, policy_target="standard", reward_steps="all",
             rewards=None, seed=0):
        key = (tuple(input_ids), num_steps, samples_per_input, policy_target, reward_steps, seed)
        if key not in cache:
            control = np.stack([dataset[i].lq for i in input_ids])
            settings = SamplerSettings(num_inference_steps=num_steps, eta=1.0, samples_per_input=samples_per_input,
                                       reward_steps=reward_steps, policy_target=policy_target)
            cache[key] = sample_trajectories(policy, control, list(input_ids), settings, policy_version=0, seed=seed)
        traj = copy.deepcopy(cache[key])
        if rewards is not None:
            traj.rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(traj.rewards.shape).clone()
        return traj

    return make
