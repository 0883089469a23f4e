"""The Serve deployment IQAScorer: options from the config, batches that really form (read from
the replica and from Ray's metrics export), every caller's own score back, the vLLM backend.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import RewardConfig
from reward_server.client import RewardClient, RewardError
from reward_server.factory import (
    ScoredImage,
    ScoreFailed,
    check_image,
    score_batch,
    scorer_spec,
    tiny_vlm_dir,
)
from reward_server.scoring import ScoreBatch
from reward_server.serve_app import deployment_options


# ------------------------------------------------------------------------------------ config -> options
def test_deployment_options_fixed_replicas():
    cfg = RewardConfig(
        backend="pyiqa",
        num_replicas=3,
        num_gpus_per_replica=0.5,
        num_cpus_per_replica=2,
        max_batch_size=32,
        max_ongoing_requests=96,
    )
    opts = deployment_options(cfg)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["max_ongoing_requests"] == 96  # not Serve's default 5, which caps batches at 5
    assert (
        opts["ray_actor_options"]["num_gpus"] == 0.5 and opts["ray_actor_options"]["num_cpus"] == 2
    )


def test_deployment_options_autoscaling():
    cfg = RewardConfig(
        backend="pyiqa",
        autoscaling=True,
        min_replicas=2,
        max_replicas=5,
        target_ongoing_requests=24,
    )
    opts = deployment_options(cfg)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 24,
    }


def test_tensor_parallel_needs_the_gpus():
    cfg = RewardConfig(backend="vllm", tensor_parallel_size=2, num_gpus_per_replica=1)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        deployment_options(cfg)
    assert (
        deployment_options(cfg.model_copy(update={"num_gpus_per_replica": 2}))["ray_actor_options"][
            "num_gpus"
        ]
        == 2
    )


def test_scorer_spec_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = scorer_spec(
        RewardConfig(
            backend="vllm",
            cache_dir=Path("cache"),
            tiny_seed=3,
            vllm_max_model_len=4096,
            tensor_parallel_size=2,
            num_gpus_per_replica=2,
        )
    )
    # cache_dir made absolute in the driver (a replica's working directory is not the driver's)
    assert (
        tiny.tiny_dir == str(tiny_vlm_dir(tmp_path / "cache", 3))
        and Path(tiny.tiny_dir).is_absolute()
    )
    assert tiny.model_path is None and tiny.tiny_seed == 3
    assert tiny.max_model_len == 512  # capped at the tiny model's context
    assert tiny.tensor_parallel_size == 2 and tiny.device == "cuda"
    local = scorer_spec(
        RewardConfig(backend="transformers", model_kind="local", model_path=Path("m"))
    )
    assert (
        local.model_path == str(tmp_path / "m")
        and local.device == "cpu"
        and local.max_model_len == 2048
    )
    iqa = scorer_spec(RewardConfig(backend="pyiqa", pyiqa_metric="entropy"))
    assert iqa.pyiqa_metric == "entropy" and iqa.resolve_model_path() is None


# ------------------------------------------------------------------------------------ the scoring step
class _OneNaNScorer:
    """Stub scorer (this test only): NaN for any batch holding a black image, as a backend gone bad."""

    name, version = "stub:one-nan", "0"

    def score(self, images):
        s = np.array([np.nan if im.max() == 0 else im.mean() / 255 for im in images])
        if np.isnan(s).any():
            return ScoreBatch(scores=s)  # raises ScoringError, as the real backends do
        return ScoreBatch(scores=s)


def test_score_batch_fails_only_the_bad_image():
    black, grey = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 51, np.uint8)
    out = score_batch(_OneNaNScorer(), ["ok0", "bad", "ok1"], [grey, black, grey])
    assert out[0] == ScoredImage("ok0", pytest.approx(0.2), None) and out[2].id == "ok1"
    # The model's own answer is not a score: unscorable (NaN to the caller, never retried).
    assert isinstance(out[1], ScoreFailed) and out[1].kind == "unscorable" and "'bad'" in str(out[1])


class _CrashingEngine:
    """Stub scorer (this test only): the engine raises for a batch holding a black image."""

    name, version = "stub:crash", "0"

    def score(self, images):
        if any(im.max() == 0 for im in images):
            raise RuntimeError("engine died")
        return ScoreBatch(scores=np.array([im.mean() / 255 for im in images]))


def test_an_engine_error_is_a_retryable_scoring_failure_of_its_image_only():
    black, grey = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 51, np.uint8)
    out = score_batch(_CrashingEngine(), ["ok0", "bad"], [grey, black])
    assert isinstance(out[0], ScoredImage)
    assert isinstance(out[1], ScoreFailed) and out[1].kind == "scoring" and "engine died" in str(out[1])


@pytest.mark.parametrize(
    "image, fragment",
    [
        (np.zeros((4, 4, 3), np.float32), "dtype uint8"),
        (np.zeros((4, 4, 4), np.uint8), "RGB"),
        (np.zeros((4, 4), np.uint8), "RGB"),
        ([[1, 2, 3]], "numpy array"),
        (np.zeros((100, 100, 3), np.uint8), "exceed the cap of 4096"),
    ],
)
def test_check_image_bad_input(image, fragment):
    with pytest.raises(ScoreFailed, match=fragment) as err:
        check_image(image, "x", max_pixels=4096)
    assert err.value.kind == "bad_input"


# ------------------------------------------------------------------------------------ Serve (slow)
@pytest.fixture(scope="module")
def piqe_app(serve_session):
    from reward_server.serve_app import deploy

    cfg = RewardConfig(
        backend="pyiqa",
        max_batch_size=16,
        max_ongoing_requests=64,
        batch_wait_timeout_s=0.25,
        num_cpus_per_replica=0.5,
        timeout_s=60,
    )
    handle = deploy(cfg, name="test-serve-piqe")
    yield cfg, handle
    serve_session.delete("test-serve-piqe")


def _scrape_ray_histogram(ray, name: str, worker_id: str) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of histogram ``name`` exported by one Ray worker."""
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name + "_bucket" and s.labels.get("WorkerId") == worker_id:
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


@pytest.mark.slow
def test_batches_form_under_16_concurrent_clients(
    piqe_app, ray_cluster, piqe_scorer, distinct_images
):
    """16 clients (own RewardClient each, one thread each) send at once, 2 rounds: the replica
    forms batches > 1 — read from its stats AND from Ray's metrics export — and every client gets
    its own image's score (distinct images with known, distinct scores; ids shuffled)."""
    cfg, handle = piqe_app
    images = distinct_images[:32]
    expected = {f"id-{i}": s for i, s in enumerate(piqe_scorer.score(images).scores)}
    ids = list(expected)
    random.Random(0).shuffle(ids)  # which client sends which image: not in index order
    image_of = {f"id-{i}": im for i, im in enumerate(images)}
    before = handle.stats.remote().result(timeout_s=30)
    barrier = threading.Barrier(16, timeout=60)

    def client_run(k: int) -> dict[str, float]:
        got = {}
        with RewardClient.from_handle(
            handle, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries
        ) as client:
            for r in range(2):
                image_id = ids[2 * k + r]
                barrier.wait()
                got[image_id] = float(client.score(image_of[image_id][None], [image_id])[0])
        return got

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client_run, range(16), timeout=120))
    got = {k: v for r in results for k, v in r.items()}
    assert got.keys() == expected.keys()
    for image_id, score in got.items():
        assert score == pytest.approx(expected[image_id], abs=1e-6), image_id

    stats = handle.stats.remote().result(timeout_s=30)
    sizes = stats["batch_sizes"][len(before["batch_sizes"]) :]
    print("Serve batch sizes under 16 concurrent clients:", sizes)
    assert sum(sizes) == 32 and max(sizes) > 1
    assert stats["errors"] == {}

    # The same, from Ray's metrics export (what Prometheus scrapes); exported every few seconds.
    name = "ray_restore_rl_reward_batch_size"
    deadline = time.monotonic() + 60
    while True:
        buckets = _scrape_ray_histogram(ray_cluster, name, stats["worker_id"])
        total = buckets.get(float("inf"), 0.0)
        if total >= len(stats["batch_sizes"]) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    print(f"{name} buckets of the replica:", buckets)
    assert total == len(stats["batch_sizes"]), buckets
    assert total - buckets[1.0] > 0  # batches of more than one image were observed


@pytest.mark.slow
def test_bad_input_over_serve_fails_at_once(piqe_app, distinct_images):
    _cfg, handle = piqe_app
    with RewardClient.from_handle(handle, timeout_s=30, max_retries=5) as client:
        with pytest.raises(RewardError, match=r"'rgba'.*RGB"):
            client.score(np.zeros((1, 8, 8, 4), np.uint8), ["rgba"])
        assert client.retries == 0  # bad input is not retried
        # ... and the replica still scores.
        assert client.score(distinct_images[:1], ["fine"]).shape == (1,)
    assert handle.stats.remote().result(timeout_s=30)["errors"].get("bad_input", 0) >= 1


@pytest.mark.slow
def test_vllm_backend_through_serve(serve_session, tmp_path_factory, photos, distinct_images):
    """The demo's path: model_kind=tiny (built under cache_dir by the factory), the vllm backend
    in one Serve replica; scores agree with the transformers reference on the same weights."""
    from reward_server.scoring import TransformersScorer
    from reward_server.serve_app import deploy

    cfg = RewardConfig(
        backend="vllm",
        model_kind="tiny",
        cache_dir=tmp_path_factory.mktemp("reward-cache"),
        dtype="float32",
        vllm_max_model_len=256,
        vllm_gpu_memory_utilization=0.1,
        max_batch_size=8,
        max_ongoing_requests=32,
        batch_wait_timeout_s=0.2,
        num_cpus_per_replica=1,
    )
    model_dir = scorer_spec(cfg).resolve_model_path()  # built here first; the replica reuses it
    images = list(photos) + list(distinct_images[:3])
    reference = TransformersScorer(model_dir, "llava", dtype="float32").score(images)
    start = time.perf_counter()
    handle = deploy(cfg, name="test-serve-vllm")
    print(f"vLLM replica ready in {time.perf_counter() - start:.1f} s")
    try:
        ids = [f"v{i}" for i in range(len(images))]
        with RewardClient.from_handle(handle, timeout_s=120) as client:
            # one submit per image, all in flight together: the replica batches them
            scores = np.concatenate(
                client.gather([client.submit(im[None], [i]) for im, i in zip(images, ids)])
            )
        np.testing.assert_allclose(scores, reference.scores, atol=1e-3)
        scored = handle.score.remote(photos[0], "p0").result(timeout_s=60)
        assert scored.id == "p0" and len(scored.levels) == 5
        assert sum(scored.levels) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(scored.levels, reference.levels[0], atol=1e-3)
        stats = handle.stats.remote().result(timeout_s=30)
        print("vLLM replica batch sizes:", stats["batch_sizes"])
        assert max(stats["batch_sizes"]) > 1 and stats["errors"] == {}
        assert (
            handle.info.remote().result(timeout_s=30)["model"].startswith("vllm:tiny-llava-seed0")
        )
    finally:
        serve_session.delete("test-serve-vllm")


@pytest.mark.slow
def test_rollover_to_a_new_model_changes_every_new_rewards_version_and_fails_no_request(
    serve_session, tmp_path_factory, distinct_images
):
    """Iterative RL's redeploy: the same app name with another model folder. Requests keep
    flowing during the rollover; none fails, each reports the version that scored it, and every
    request sent after ``deploy`` returns is scored by the new model."""
    from reward_server.serve_app import deploy
    from reward_server.tiny_vlm import build_tiny_llava

    root = tmp_path_factory.mktemp("rollover")
    dirs = [build_tiny_llava(root / f"m{seed}", seed=seed) for seed in (0, 1)]

    def cfg(path):
        return RewardConfig(backend="transformers", model_kind="local", model_path=path, dtype="float32",
                            max_batch_size=8, max_ongoing_requests=32, batch_wait_timeout_s=0.05,
                            num_cpus_per_replica=0.5)

    name = "test-serve-rollover"
    handle = deploy(cfg(dirs[0]), name=name)
    try:
        old = handle.info.remote().result(timeout_s=60)["version"]
        results: list[tuple[float, object]] = []
        stop = threading.Event()

        def fire():
            k = 0
            while not stop.is_set():
                im = distinct_images[k % len(distinct_images)]
                results.append((time.monotonic(), handle.score.remote(im, f"r{k}").result(timeout_s=120)))
                k += 1

        threads = [threading.Thread(target=fire) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        deploy(cfg(dirs[1]), name=name)  # blocks until the new replica serves
        switched = time.monotonic()
        new = handle.info.remote().result(timeout_s=60)["version"]
        after = [handle.score.remote(distinct_images[k], f"a{k}").result(timeout_s=60) for k in range(8)]
        stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        serve_session.delete(name)
    assert old != new
    assert all(isinstance(r, ScoredImage) for _, r in results) and len(results) > 8
    versions = [r.version for _, r in results]
    assert set(versions) <= {old, new} and old in versions
    assert all(r.version == new for r in after)
    # Requests issued well after the switch never reach the retired replica.
    assert all(r.version == new for t, r in results if t > switched + 1.0)


def test_check_health_fails_only_while_a_scorer_call_is_stuck():
    """Serve calls check_health every few seconds and replaces a replica whose check raises."""
    import time

    from reward_server.serve_app import IQAScorer

    cls = IQAScorer.func_or_class
    replica = cls.__new__(cls)  # the check reads only the call table and the threshold
    replica.scorer_stall_s, replica._calls = 5.0, {}
    replica.check_health()  # idle
    replica._calls = {0: time.monotonic() - 1.0}
    replica.check_health()  # busy, within the threshold
    replica._calls[1] = time.monotonic() - 6.0
    with pytest.raises(RuntimeError, match=r"running for 6 s .*scorer_stall_s 5"):
        replica.check_health()
