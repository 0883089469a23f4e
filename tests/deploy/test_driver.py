"""Driver behaviour that needs no Ray job: who owns the local Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "demo_cpu.yaml"


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init / ray.shutdown / ray.is_initialized recorded instead of run."""
    import ray

    state = {"up": False, "calls": []}

    def init(**kwargs):
        state["up"] = True
        state["calls"].append(("init", kwargs.get("num_cpus")))

    def shutdown():
        state["up"] = False
        state["calls"].append(("shutdown", None))

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return state


def _driver(tmp_path, state):
    from deploy.driver import Driver

    d = Driver(load_config(DEMO, [f"deploy.output_dir={tmp_path}", "algorithm.mode=sft"]))
    d._run_loop = lambda: (d._connect_ray(), 0)[1]  # the job itself is not the point here
    d.shutdown = lambda: state["calls"].append(("teardown", None))
    return d


def test_a_driver_shuts_down_the_local_ray_it_started(fake_ray, tmp_path):
    """The CI failure of 2026-12-01: the demo's SFT pre-training (a Driver run inside a library
    call) started a 2-CPU local Ray and left it up; every later job in the process inherited it
    and could not place its actors."""
    assert _driver(tmp_path, fake_ray).run_loop() == 0
    (kind, cpus), teardown, shutdown = fake_ray["calls"]
    assert kind == "init" and cpus >= 2 and teardown[0] == "teardown" and shutdown[0] == "shutdown"
    assert fake_ray["up"] is False


def test_a_ray_started_before_the_run_stays_up(fake_ray, tmp_path):
    from deploy.driver import Driver

    Driver(load_config(DEMO, [f"deploy.output_dir={tmp_path}"]))._connect_ray()  # as the demo and compare do
    assert _driver(tmp_path, fake_ray).run_loop() == 0
    assert [c[0] for c in fake_ray["calls"]] == ["init", "teardown"] and fake_ray["up"] is True


def test_reconcile_metrics_keeps_each_iteration_once_up_to_the_checkpoint(tmp_path):
    from deploy.outputs import RunDir, read_metrics

    run = RunDir(tmp_path / "r")
    # What the issue found after a stop and a resume that started afresh: [0, 1, 0, 1, 2, 3, 4];
    # and a line cut by a crash at the end.
    for i, it in enumerate([0, 1, 0, 1, 2, 3, 4]):
        run.append_metrics({"iteration": it, "n": i})
    with open(run.metrics_path, "a") as f:
        f.write('{"iteration": 5, "n"')
    assert run.reconcile_metrics(2) == [0, 1, 2]
    assert [(r["iteration"], r["n"]) for r in read_metrics(run.metrics_path)] == [(0, 2), (1, 3), (2, 4)]
    # The checkpoint of iteration 3 was written, its record never appended: restored from it.
    assert run.reconcile_metrics(3, {"iteration": 3, "n": 99}) == [0, 1, 2, 3]
    assert read_metrics(run.metrics_path)[-1] == {"iteration": 3, "n": 99}
    # A record already there wins over the checkpoint's copy (it has the checkpoint's own time).
    assert run.reconcile_metrics(3, {"iteration": 3, "n": -1}) == [0, 1, 2, 3]
    assert read_metrics(run.metrics_path)[-1]["n"] == 99
    assert run.reconcile_metrics(-1) == [] and read_metrics(run.metrics_path) == []  # no checkpoint: afresh


def _traj(rewards):
    import torch

    from common.types import Trajectory

    B, R = rewards.shape
    K, H = 3, 4
    return Trajectory(
        input_ids=torch.arange(B, dtype=torch.int64) // 2, latents=torch.randn(B, K + 1, 1, 2, 2),
        log_probs=torch.zeros(B, K), timesteps=torch.tensor([900, 500, 100]), sigmas=torch.full((K,), 0.1),
        reward_steps=torch.tensor([1, 2])[:R], reward_images=torch.arange(B, dtype=torch.uint8).view(B, 1, 1, 1, 1)
        .expand(B, R, H, H, 3).contiguous(), rewards=rewards,
        final_images=torch.zeros(B, H, H, 3, dtype=torch.uint8), control_images=torch.zeros(B, H, H, 3, dtype=torch.uint8),
        policy_version=0, eta=1.0,
    ).validate()


def test_unscorable_rewards_mask_their_trajectories_up_to_the_configured_fraction():
    import torch

    from deploy.driver import UnscorableRewards, mask_unscorable

    nan = float("nan")
    rewards = torch.tensor([[0.1, 0.2], [nan, 0.4], [0.5, 0.6], [0.7, nan]])
    kept, n = mask_unscorable(_traj(rewards), 0.5, iteration=3)
    assert n == 2 and kept.batch_size == 2
    assert kept.input_ids.tolist() == [0, 1] and kept.rewards.tolist() == [pytest.approx([0.1, 0.2]),
                                                                            pytest.approx([0.5, 0.6])]
    assert kept.reward_images[:, 0, 0, 0, 0].tolist() == [0, 2]  # every per-sample field follows
    kept.validate()
    clean, n = mask_unscorable(_traj(torch.rand(4, 2)), 0.0, iteration=0)
    assert n == 0 and clean.batch_size == 4
    with pytest.raises(UnscorableRewards, match=r"iteration 3: 2 of 4 .*input ids \[0, 1\].*0\.25"):
        mask_unscorable(_traj(rewards), 0.25, iteration=3)
