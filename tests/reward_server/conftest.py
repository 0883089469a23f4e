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
