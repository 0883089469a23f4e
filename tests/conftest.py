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
    if not ray.is_initialized():
        ray.init(_node_ip_address="127.0.0.2", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
