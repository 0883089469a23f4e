"""Fixtures of the reward-server tests: the tiny seeded VLM, real photos, one vLLM engine.

Heavy things are session-scoped: the tiny VLM is built once into a temporary folder and one vLLM
engine serves every test that needs it (DESIGN.md §8).
"""

from __future__ import annotations

import os

# Before anything imports transformers/vLLM: nothing may reach a model hub, and vLLM on CPU
# reserves its KV cache from host RAM (ENVIRONMENT.md "vLLM on CPU").
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from pathlib import Path

import numpy as np
import pytest


def _small(image: np.ndarray, height: int) -> np.ndarray:
    """Resize a photo to ``height`` px (aspect kept; RGB uint8)."""
    from PIL import Image

    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    h, w = image.shape[:2]
    pil = Image.fromarray(image[..., :3]).resize((round(w * height / h), height), Image.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Five real photos shipped with scikit-image, small, mostly non-square (exercises padding)."""
    from skimage import data

    return [
        _small(data.astronaut(), 64),  # 64 x 64
        _small(data.coffee(), 60),  # 60 x 90
        _small(data.chelsea(), 60),  # 60 x 90
        _small(data.camera(), 48),  # grey -> RGB, 48 x 48
        _small(data.rocket(), 80),  # 80 x 120
    ]


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reward_server.tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_vlm") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def hf_scorer(tiny_vlm_dir: Path):
    from reward_server.scoring import TransformersScorer

    return TransformersScorer(tiny_vlm_dir, "llava", dtype="float32")


@pytest.fixture(scope="session")
def vllm_scorer(tiny_vlm_dir: Path):
    """The one vLLM engine of the session (float32, eager, small memory: ENVIRONMENT.md)."""
    import time

    from reward_server.scoring import VLLMScorer

    start = time.perf_counter()
    scorer = VLLMScorer(
        tiny_vlm_dir, "llava", dtype="float32", max_model_len=256, gpu_memory_utilization=0.1
    )
    scorer.startup_s = time.perf_counter() - start  # reported by test_vllm_engine_start
    yield scorer
    core = getattr(scorer.llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


# ------------------------------------------------------------------ reward service (Serve, HTTP)
@pytest.fixture
def unused_port() -> int:
    """A TCP port free on 127.0.0.1 right now (nothing listens on it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def piqe_scorer():
    """pyiqa's PIQE (hand-crafted, no weights): the fast real scorer of the service tests."""
    from reward_server.scoring import PyIQAScorer

    return PyIQAScorer("piqe")


@pytest.fixture(scope="session")
def distinct_images(piqe_scorer) -> list[np.ndarray]:
    """32 images 64×64 (sinusoids + seeded noise of growing strength) whose PIQE scores are
    pairwise at least 1e-4 apart: a score returned for the wrong image cannot go unnoticed."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    kept: list[np.ndarray] = []
    scores: list[float] = []
    for i in range(96):
        wave = np.sin(2 * np.pi * (xx * (1 + i % 5) + yy * (1 + i // 5 % 4)))
        base = 128 + 100 * wave[..., None] * np.array([1.0, 0.8, 0.6])
        image = np.clip(base + rng.normal(0, 2 + 3 * (i % 32), (64, 64, 3)), 0, 255).astype(np.uint8)
        s = float(piqe_scorer.score([image]).scores[0])
        if all(abs(s - t) >= 1e-4 for t in scores):
            kept.append(image)
            scores.append(s)
        if len(kept) == 32:
            return kept
    raise AssertionError(f"only {len(kept)} images with distinct PIQE scores")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray on loopback (ENVIRONMENT.md), shared with other test packages.

    Started here only if no one has started it yet, with the same settings as
    tests/rollout/conftest.py (whichever package runs first starts it for both); shut down at
    the end of the session only if it was started here.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=8, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        started = True
    yield ray
    if started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_session(ray_cluster):
    """Ray Serve without an HTTP proxy (the job uses handles); shut down at session end. Test
    modules delete their own apps when they finish, so replicas never outlive their module."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    yield serve
    if ray_cluster.is_initialized():  # another package's fixture may have shut Ray down already
        serve.shutdown()
