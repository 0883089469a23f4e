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
