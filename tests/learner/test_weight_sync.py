"""Learner → rollout weight sync (DESIGN.md §4): bucket layout, both transports between real
Learner / RolloutWorker actors, version checks, and a bounded failure when a worker dies."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from common.config import AlgorithmConfig, LearnerConfig, ModelConfig, RolloutConfig
from common.weight_transport import (
    AUTO_OBJECT_STORE_MAX_BYTES,
    StaleWorkerError,
    WeightLayout,
    WeightPayload,
    WeightSyncError,
    choose_method,
)
from learner.weight_sync import WeightSync

MODEL = ModelConfig(kind="tiny")


# ------------------------------------------------------------------------------ layout (fast)
def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(10, generator=g),
        "c": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "d": torch.randn(5, 5, generator=g),
    }


def test_layout_buckets_by_size_and_dtype_and_round_trips():
    state = _state()
    layout = WeightLayout.from_state(state, bucket_bytes=64)  # 16 floats per bucket
    # a (48 B) fits; b (40 B) would overflow → new; c is bf16 → new; d (100 B) alone, over the cap
    assert [[e.name for e in b.entries] for b in layout.buckets] == [["a"], ["b"], ["c"], ["d"]]
    assert layout.nbytes == sum(t.numel() * t.element_size() for t in state.values())
    back = layout.unflatten(layout.flatten(state))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    big = WeightLayout.from_state(state, bucket_bytes=2**20)
    assert [[e.name for e in b.entries] for b in big.buckets] == [["a", "b"], ["c"], ["d"]]


def test_payload_round_trip_is_bit_exact_including_bf16():
    state = _state()
    payload = WeightPayload.from_state(7, state, WeightLayout.from_state(state, 2**20))
    assert payload.version == 7 and all(b.dtype.name == "uint8" for b in payload.buffers)
    back = payload.to_state()
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_layout_check_names_the_mismatch():
    layout = WeightLayout.from_state(_state(), 2**20)
    other = dict(_state(), a=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"a: sender \[3, 4\] float32, worker \[4, 3\]"):
        layout.check(other, who="worker")


def test_auto_method_by_payload_size_and_device():
    big = AUTO_OBJECT_STORE_MAX_BYTES + 1
    assert choose_method("auto", big, on_gpu=True) == "collective"  # NCCL, no host round trip
    assert choose_method("auto", AUTO_OBJECT_STORE_MAX_BYTES, on_gpu=True) == "object_store"
    assert choose_method("auto", big, on_gpu=False) == "object_store"  # CPU: zero-copy object store wins
    assert choose_method("collective", 10) == "collective"
    with pytest.raises(ValueError, match="weight_sync.method"):
        choose_method("nccl", 10)


# ------------------------------------------------------------------------------ Ray (slow)
def _actors(data_cfg, n_workers=2):
    from learner.learner import create_learners
    from rollout.worker import create_rollout_workers

    algo = AlgorithmConfig(policy_target="standard", reward_steps="all")
    learner = create_learners(MODEL, data_cfg, algo, LearnerConfig(lr=1e-2, num_cpus_per_learner=0.5))[0]
    rollout = RolloutConfig(num_workers=n_workers, num_inference_steps=2, samples_per_input=2, batch_size=4,
                            num_cpus_per_worker=0.5)
    workers = create_rollout_workers(rollout, algo, MODEL, data_cfg)
    return learner, workers


def _train(ray, learner, worker):
    traj = ray.get(worker.sample.remote([0, 1]), timeout=120)
    traj.rewards = torch.rand(traj.rewards.shape, generator=torch.Generator().manual_seed(traj.policy_version))
    return ray.get(learner.update.remote(traj), timeout=120)


def _assert_in_sync(ray, learner, workers):
    version, state = ray.get(learner.get_weights.remote())
    for i, w in enumerate(workers):
        held = ray.get(w.trainable_state.remote())
        assert held.keys() == state.keys()
        assert all(torch.equal(held[k], v) for k, v in state.items()), f"worker {i} differs from the learner"
        assert ray.get(w.policy_version.remote()) == version


@pytest.mark.slow
def test_both_methods_make_workers_bit_identical_and_dead_workers_fail_fast(ray_local, tiny_data_config):
    ray = ray_local
    learner, workers = _actors(tiny_data_config)
    try:
        # object store
        _train(ray, learner, workers[0])
        sync = WeightSync(learner, workers, method="object_store", timeout_s=30)
        m = sync.sync()
        assert m["weight_sync/version"] == 1 and m["weight_sync/bytes"] > 0
        _assert_in_sync(ray, learner, workers)
        assert sync.sync()["weight_sync/skipped"] == 1  # same version: nothing re-sent
        sync.verify()

        # collective (gloo), two buckets to exercise the bucketing
        _train(ray, learner, workers[1])
        layout_bytes = ray.get(learner.weight_layout.remote(2**30)).nbytes
        coll = WeightSync(learner, workers, method="collective", bucket_mb=layout_bytes / 2 / 2**20, timeout_s=10)
        assert coll.setup() == "collective" and len(coll.layout.buckets) >= 2
        assert coll.sync()["weight_sync/version"] == 2
        _assert_in_sync(ray, learner, workers)
        _train(ray, learner, workers[0])
        assert coll.sync()["weight_sync/version"] == 3
        _assert_in_sync(ray, learner, workers)

        # A worker that missed a sync is named, not silently stale.
        _train(ray, learner, workers[0])
        with pytest.raises(StaleWorkerError, match=r"rollout worker 0 holds version 3; rollout worker 1 holds version 3"):
            coll.verify()

        # A worker killed mid-sync: the sync fails within the bound (timeout_s = 10) and names it.
        errors: list[BaseException] = []

        def run():
            try:
                coll.sync()
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        # Worker 1 is busy sampling, so its receive is queued and the broadcast cannot complete
        # before the kill: the kill lands mid-sync deterministically.
        busy = workers[1].sample.remote([0, 1, 2, 3] * 2)
        t0 = time.monotonic()
        th = threading.Thread(target=run)
        th.start()
        time.sleep(0.1)
        ray.kill(workers[1])
        th.join(timeout=60)
        elapsed = time.monotonic() - t0
        assert not th.is_alive() and errors, "the sync did not fail"
        assert isinstance(errors[0], WeightSyncError)
        assert "rollout worker 1" in str(errors[0])
        assert elapsed < 20, f"failure took {elapsed:.1f} s (timeout_s = 10)"
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(busy)
        print(f"\nkilled worker: sync failed after {elapsed:.1f} s: {errors[0]}")
        with pytest.raises(WeightSyncError, match="broken"):
            coll.sync()

        # The learner is still responsive, and a new group with the surviving worker works.
        assert ray.get(learner.get_version.remote(), timeout=10) == 4
        coll.reset(workers=[workers[0]])
        assert coll.sync()["weight_sync/version"] == 4
        _assert_in_sync(ray, learner, [workers[0]])

        # Object store with a dead worker: named; the live one still gets the new version.
        _train(ray, learner, workers[0])
        store = WeightSync(learner, workers, method="object_store", timeout_s=10)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"rollout worker 1: actor died") as err:
            store.sync()
        assert "rollout worker 0" not in str(err.value) and time.monotonic() - t0 < 20
        _assert_in_sync(ray, learner, [workers[0]])

        # A group that cannot form (a dead member) fails within the bound and leaves the live
        # processes able to form the next one.
        _train(ray, learner, workers[0])
        again = WeightSync(learner, workers, method="collective", timeout_s=5)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"set-up .* rollout worker 1: actor died"):
            again.setup()
        assert time.monotonic() - t0 < 15
        again.reset(workers=[workers[0]])
        assert again.sync()["weight_sync/version"] == 6
        _assert_in_sync(ray, learner, [workers[0]])
    finally:
        for a in [learner, *workers]:
            ray.kill(a)
