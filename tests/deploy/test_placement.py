"""Each role's actors run on the node that advertises its resource, on a multi-node local cluster
(tests/deploy/placement_probe.py), and scaling the reward app moves only reward replicas.

The cluster runs in a subprocess with its own Ray temp dir: it cannot meet the session's Ray
(tests/conftest.py) or another process's ``ray.init()`` on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("placement_probe.py")


@pytest.fixture(scope="module")
def node_map() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # A short private temp dir: Ray's unix sockets live under it (paths of at most 107 bytes).
    with tempfile.TemporaryDirectory(prefix="rrl-") as tmp:
        env["RAY_TMPDIR"] = tmp
        proc = subprocess.run([sys.executable, str(PROBE)], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("NODE_MAP ")]
    assert proc.returncode == 0 and lines, f"probe failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(lines[-1][len("NODE_MAP "):])
    print(_table(out))  # the node map, in the test output (pytest -s / -rP)
    return out


def _table(out: dict) -> str:
    short = {node: node[:8] for node in out["nodes"]}
    names = {n: r for r, n in out["role_node"].items()}
    rows = [f"{'node':<8}  {'advertises':<44} runs"]
    for node, res in out["nodes"].items():
        runs = []
        for step in ("before", "after"):
            for role, acts in out[step].items():
                runs += [f"{role}@{step}" for a in acts if a["node"] == node]
        for step in ("reward_1", "reward_3", "control"):
            runs += [step for r in out[step] if r["node"] == node]
        label = names.get(node, "head")
        rows.append(f"{short[node]}  {label + ' ' + json.dumps(res):<44} {', '.join(runs) or '-'}")
    return "\n".join(rows)


@pytest.mark.slow
def test_each_role_runs_on_the_node_that_advertises_its_resource(node_map):
    role_node = node_map["role_node"]
    assert len(set(role_node.values())) == 3  # one node per role
    for role in ("rollout", "learner"):
        assert [a["node"] for a in node_map["before"][role]] == [role_node[role]] * 2, role
    assert [r["node"] for r in node_map["reward_1"]] == [role_node["reward"]]


@pytest.mark.slow
def test_more_reward_replicas_land_on_the_reward_node_and_nothing_else_moves(node_map):
    role_node = node_map["role_node"]
    assert len(node_map["reward_3"]) == 3
    assert {r["node"] for r in node_map["reward_3"]} == {role_node["reward"]}
    assert node_map["scored"] == 0.5  # the replicas answer (the constant stand-in scorer)
    # rollout workers and learners: the same actors, same processes, same nodes after the redeploy
    assert node_map["after"] == node_map["before"]


@pytest.mark.slow
def test_a_replica_without_custom_resources_lands_on_rollout_or_learner_nodes(node_map):
    # The control: what the reward replicas did before custom_resources reached them. The nodes
    # had CPUs free, so it is the custom resource, not a lack of room, that keeps them apart.
    role_node = node_map["role_node"]
    assert node_map["control"] and {r["node"] for r in node_map["control"]} <= {role_node["rollout"],
                                                                                role_node["learner"]}
