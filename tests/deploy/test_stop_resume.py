"""Exact stop/resume (issue 13): a stop requested at any stage boundary, or a driver that dies
there, costs a retry, never an iteration lost or repeated.

The stop is requested through the driver's stage hook (what the SIGTERM handler does, at an
exact point instead of a racing signal; the real signal is tested in test_driver_e2e.py). After
``--resume auto`` the run's metrics hold iterations 0..N−1 exactly once, with the rewards and
losses of an uninterrupted run. The reconstruction reward keeps these runs free of a reward
service (the reward path is tested elsewhere); everything else is the real Ray job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "demo_cpu.yaml"
N = 5
SMALL = [
    "data.resolution=32", "data.num_synthetic=4", "data.num_test=1", "rollout.num_inference_steps=2",
    "rollout.batch_size=4", "rollout.samples_per_input=2", "rollout.num_workers=1", "algorithm.reward=reconstruction",
    "logging.progress=false",
    f"deploy.iterations={N}",
]
#: What must match an uninterrupted run, per iteration.
KEYS = ("reward/mean", "losses/total", "learner/version")


class Crash(Exception):
    """The driver dying at a stage boundary (no stop path runs)."""


def _config(out: Path, name: str, every: int):
    return load_config(DEMO, [*SMALL, f"deploy.output_dir={out}", f"deploy.run_name={name}",
                              f"deploy.checkpoint_every={every}"])


def _run(cfg, resume=None, hook=None) -> int:
    from deploy.driver import Driver

    d = Driver(cfg, resume=resume)
    d.stage_hook = hook and hook(d)
    return d.run_loop()


def _values(run: Path) -> list[tuple]:
    from deploy.outputs import read_metrics

    return [(r["iteration"], *(float(r[k]) for k in KEYS)) for r in read_metrics(run / "metrics.jsonl")]


def _same(got: list[tuple], want: list[tuple]) -> bool:
    """Same iterations in the same order, each value equal to float rounding (1e-6 relative)."""
    return [g[0] for g in got] == [w[0] for w in want] and all(
        g[1:] == pytest.approx(w[1:], rel=1e-6, abs=1e-9) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert _run(_config(out, "ref", 1)) == 0
    values = _values(out / "ref")
    assert [v[0] for v in values] == list(range(N))
    return values


def _stop_at(stage: str, iteration: int):
    def make(driver):
        def hook(s, it):
            if (s, it) == (stage, iteration):
                driver.request_stop()
        return hook
    return make


def _crash_at(stage: str, iteration: int):
    def make(driver):  # noqa: ARG001
        def hook(s, it):
            if (s, it) == (stage, iteration):
                raise Crash(f"{s}@{it}")
        return hook
    return make


#: One chain of stops per checkpoint cadence: each run is stopped at (stage, iteration), then the
#: next resumes it, until a last resume completes the run. Together they hit every stage boundary
#: (a stop during the rollout abandons that iteration; once the update is sent it is finished),
#: both before and on checkpoint iterations. The iterations done after each stop are given.
CHAINS = {
    1: [(("start", 1), [0]), (("rollout", 1), [0]), (("update", 1), [0, 1]), (("weight_sync", 2), [0, 1, 2]),
        (("checkpoint", 3), [0, 1, 2, 3])],
    3: [(("start", 1), [0]), (("rollout", 1), [0]), (("update", 1), [0, 1]), (("checkpoint", 2), [0, 1, 2]),
        (("record", 3), [0, 1, 2, 3])],
}


@pytest.mark.parametrize("every", sorted(CHAINS), ids=[f"checkpoint_every={e}" for e in sorted(CHAINS)])
def test_stops_at_every_stage_then_resume_equal_an_uninterrupted_run(reference, tmp_path, every):
    from learner.checkpoint import latest_checkpoint

    cfg = _config(tmp_path, "r", every)
    for n, ((stage, at), want) in enumerate(CHAINS[every]):
        assert _run(cfg, resume="auto" if n else None, hook=_stop_at(stage, at)) == 0
        done = _values(tmp_path / "r")
        assert [v[0] for v in done] == want, (stage, at, done)
        assert _same(done, reference[: len(want)]), (stage, at)
        # The stop saved the last completed iteration (on a cadence of 3 too).
        assert latest_checkpoint(tmp_path / "r").name == f"ckpt-{want[-1]:06d}", (stage, at)
    assert _run(cfg, resume="auto") == 0
    assert _same(_values(tmp_path / "r"), reference), (_values(tmp_path / "r"), reference)


@pytest.mark.parametrize("stage,every,at", [("checkpoint", 1, 1), ("record", 3, 1), ("update", 1, 1)],
                         ids=["after-checkpoint-before-record", "no-checkpoint-yet", "mid-iteration"])
def test_a_driver_dying_at_a_boundary_then_resume_equals_an_uninterrupted_run(reference, tmp_path, stage, every, at):
    """Died right after writing a checkpoint (its record not yet appended: resume restores it
    from the checkpoint); after records but before any checkpoint (resume starts afresh and never
    appends: the issue's [0, 1, 0, 1, 2, ...]); after an update that no checkpoint holds."""
    cfg = _config(tmp_path, "r", every)
    with pytest.raises(Crash):
        _run(cfg, hook=_crash_at(stage, at))
    assert _run(cfg, resume="auto") == 0
    assert _same(_values(tmp_path / "r"), reference), (_values(tmp_path / "r"), reference)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    from learner.checkpoint import list_checkpoints

    cfg = _config(tmp_path, "r", 1)
    assert _run(cfg) == 0
    ckpts = list_checkpoints(tmp_path / "r")
    assert [c.name for c in ckpts] == [f"ckpt-{i:06d}" for i in range(N - 3, N)]  # keep_checkpoints = 3
    opt = ckpts[-1] / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-100])  # truncated
    # Resume: the last iteration is redone from the one before, its record replaced, not repeated.
    assert _run(cfg, resume="auto") == 0
    assert _same(_values(tmp_path / "r"), reference), (_values(tmp_path / "r"), reference)


def test_a_rollout_worker_killed_mid_rollout_costs_a_retry_not_the_run(reference, tmp_path):
    """SIGKILL (by PID) of a rollout worker while it samples iteration 1: Ray restarts it, the
    driver pushes it the current weights and re-sends its chunk; the run completes every
    iteration once, with the rewards and losses of an uninterrupted run."""
    import os
    import signal

    import ray

    from deploy.outputs import read_metrics

    pids = {}

    def make(driver):
        def hook(stage, it):
            if (stage, it) == ("start", 1):
                pids["victim"] = ray.get(driver.workers[0].pid.remote(), timeout=60)
            if (stage, it) == ("launched", 1):
                os.kill(pids["victim"], signal.SIGKILL)
        return hook

    cfg = _config(tmp_path, "r", 1)
    assert _run(cfg, hook=make) == 0
    assert _same(_values(tmp_path / "r"), reference), (_values(tmp_path / "r"), reference)
    recs = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r.get("recovered_total/rollout", 0) for r in recs] == [0] + [1] * (N - 1)


def test_a_learner_killed_mid_run_restarts_from_the_checkpoint_and_redoes_only_since_then(reference, tmp_path):
    """SIGKILL (by PID) of the learner while iteration 2's rollout is in flight, checkpoints every
    2 iterations (ckpt-1 on disk): the driver rebuilds the actors, resumes from ckpt-1 and redoes
    iteration 2. Every iteration appears once, with an uninterrupted run's rewards and losses."""
    import os
    import signal

    import ray

    from deploy.outputs import read_metrics

    def make(driver):
        def hook(stage, it):
            if (stage, it) == ("launched", 2) and not driver.recovered:
                os.kill(ray.get(driver._actors[0].pid.remote(), timeout=60), signal.SIGKILL)
        return hook

    cfg = _config(tmp_path, "r", 2)
    assert _run(cfg, hook=make) == 0
    assert _same(_values(tmp_path / "r"), reference), (_values(tmp_path / "r"), reference)
    recs = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r.get("recovered_total/learner", 0) for r in recs] == [0, 0] + [1] * (N - 2)


def test_a_learner_that_keeps_dying_ends_the_run_after_max_restarts(tmp_path):
    """deploy.max_restarts bounds the restarts: a learner killed on every attempt ends the run
    with the actor's death, after exactly max_restarts rebuilds."""
    import os
    import signal

    import ray

    seen = []

    def make(driver):
        def hook(stage, it):
            if (stage, it) == ("launched", 0):
                seen.append(it)
                os.kill(ray.get(driver._actors[0].pid.remote(), timeout=60), signal.SIGKILL)
        return hook

    cfg = load_config(DEMO, [*SMALL, f"deploy.output_dir={tmp_path}", "deploy.run_name=r", "deploy.max_restarts=1"])
    with pytest.raises(ray.exceptions.RayActorError):
        _run(cfg, hook=make)
    assert len(seen) == 2  # the first attempt and one restart


class _SometimesNaN:
    """Fault injector (this test only): a reward model whose answer is NaN for about one image
    in three — decided by the image's bytes, so deterministic as a real model's NaN would be —
    and the mean brightness otherwise."""

    name, version = "stub:sometimes-nan", "0"

    def score(self, images):
        import hashlib

        import numpy as np

        from reward_server.scoring import ScoreBatch

        scores = [np.nan if hashlib.md5(im.tobytes()).digest()[0] % 3 == 0 else im.mean() / 255 for im in images]
        if any(np.isnan(scores)):
            from reward_server.scoring import ScoringError

            raise ScoringError(f"non-finite level log-probs for image(s): {scores}")
        return ScoreBatch(scores=np.asarray(scores, dtype=np.float64))


@pytest.mark.parametrize("fraction", [1.0, 0.0], ids=["masked", "above-the-fraction"])
def test_unscorable_rewards_are_masked_counted_and_fail_the_run_only_above_the_fraction(ray_local, tmp_path,
                                                                                         fraction):
    """A reward model that answers NaN for some images: each such trajectory is dropped from its
    update (counted in metrics.jsonl), nothing is retried, the run completes — unless more than
    reward.max_invalid_fraction of an iteration's trajectories are hit."""
    from deploy.driver import UnscorableRewards
    from deploy.outputs import read_metrics
    from reward_server.http_server import BackgroundServer, RewardHTTPServer

    with BackgroundServer(RewardHTTPServer(_SometimesNaN(), batch_wait_timeout_s=0.0)) as bg:
        overrides = [o for o in SMALL if not o.startswith("algorithm.reward=")] + [
            "algorithm.reward=iqa", f"reward.endpoint={bg.url}", "reward.max_retries=3",
            f"reward.max_invalid_fraction={fraction}", "deploy.iterations=3",
            f"deploy.output_dir={tmp_path}", "deploy.run_name=r"]
        cfg = load_config(DEMO, overrides)
        if fraction == 0.0:
            with pytest.raises(UnscorableRewards, match="above reward.max_invalid_fraction 0"):
                _run(cfg)
            return
        assert _run(cfg) == 0
        text = bg.server.metrics.render()[0].decode()
    recs = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    masked = [r["reward/masked"] for r in recs]
    assert sum(masked) > 0, masked
    for r in recs:
        assert r.get("trajectories", 0) + r["reward/masked"] == 4  # rollout.batch_size
        # An iteration whose every trajectory is masked makes no update; any other one does.
        assert ("losses/total" in r) == (r["reward/masked"] < 4), r
    assert recs[-1]["dropped_total"] == sum(masked)
    # Only summaries crossed the driver: the trajectories went worker -> object store -> learner.
    assert all(r["driver/trajectory_bytes"] == 0 and r["rollout/trajectory_bytes"] > 0 for r in recs)
    assert 'reward_errors_total{kind="unscorable"}' in text and 'kind="scoring"} 0.0' in text


def test_a_reward_replica_killed_mid_run_is_waited_for_and_changes_no_reward(ray_local, tmp_path):
    """SIGKILL (by PID) of the Serve reward replica (PIQE) while iteration 1's rollout streams
    images to it, with a reward deadline (5 s) shorter than Serve takes to notice the death and
    start a new replica (about 10 s + the start):
    the workers' requests wait for it (reward.recovery_timeout_s), the run completes every
    iteration once, with the rewards and losses of an uninterrupted run."""
    import os
    import signal

    from reward_server.serve_app import get_handle

    overrides = [o for o in SMALL if not o.startswith("algorithm.reward=")] + [
        "algorithm.reward=iqa", "reward.backend=pyiqa", "reward.pyiqa_metric=piqe", "reward.timeout_s=5",
        "reward.max_retries=0", "deploy.iterations=3", f"deploy.output_dir={tmp_path}"]
    assert _run(load_config(DEMO, [*overrides, "deploy.run_name=ref"])) == 0
    killed = []

    def make(driver):  # noqa: ARG001
        def hook(stage, it):
            if (stage, it) == ("launched", 1):
                pid = get_handle("reward").stats.remote().result(timeout_s=30)["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return hook

    assert _run(load_config(DEMO, [*overrides, "deploy.run_name=r"]), hook=make) == 0
    assert killed
    got, want = _values(tmp_path / "r"), _values(tmp_path / "ref")
    assert [v[0] for v in got] == [0, 1, 2] and _same(got, want), (got, want)
    from deploy.outputs import read_metrics

    waited = read_metrics(tmp_path / "r" / "metrics.jsonl")[1]["seconds/rollout"]
    assert waited > 5, waited  # the rollout outlived the reward deadline: it waited for the new replica
    print(f"reward replica SIGKILL mid-run: iteration 1's rollout took {waited:.1f} s (deadline 5 s)")
