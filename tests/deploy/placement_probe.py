"""Where each role's actors land on a multi-node cluster (run as a script by test_placement.py).

A local ``ray.cluster_utils.Cluster`` on loopback (ENVIRONMENT.md): a head with no CPUs (the
driver and Serve's controller only) and one node per role advertising that role's resource,
named as in deploy/configs/pasd_lol_gpu.yaml (rollout_gpu, reward_gpu, learner_gpu). Every node
has free CPUs, so a role lands on its node only because of its custom resource.

The actors are placed by the code the job uses: the driver's placement groups
(:func:`deploy.driver.role_placement_group`) with the workers' and learners' own options
(:func:`rollout.worker.rollout_actor_options`, :func:`learner.learner.learner_actor_options`), and
the reward app of :func:`reward_server.serve_app.build_app`. Only the actor bodies are stand-ins:
a probe that reports its node, and a constant scorer (no model), to keep it cheap.

Steps, each recorded in the JSON printed on the last line (``NODE_MAP {...}``):

1. rollout workers and learners in their placement groups; the reward app with 1 replica;
2. the same reward app redeployed with 3 replicas (only ``reward.num_replicas`` changes);
3. a control app whose replicas have no custom resource: where the reward replicas went before
   ``custom_resources`` reached them (the reward node is full by then, so the control shows that
   the rollout and learner nodes take a replica that is not pinned).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIG = ROOT / "deploy" / "configs" / "pasd_lol_gpu.yaml"
NODE_CPUS = {"rollout": 4, "reward": 3, "learner": 4}  # reward: exactly the 3 replicas of step 2


class Probe:
    """Stand-in for a RolloutWorker / Learner: reports where it runs."""

    def where(self) -> dict[str, object]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "actor": ctx.get_actor_id(), "pid": os.getpid()}


class ConstScorer:
    """Stand-in for an IQA model (built inside the replica): 0.5 for every image."""

    name, version = "stub:const", "0"

    def score(self, images):
        import numpy as np

        from reward_server.scoring import ScoreBatch

        return ScoreBatch(scores=np.full(len(images), 0.5))


def main() -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from common.config import load_config
    from deploy.driver import role_placement_group
    from learner.learner import learner_actor_options
    from reward_server.serve_app import build_app
    from rollout.worker import rollout_actor_options

    # The GPU config's resource names and counts per role, on CPUs: no GPU here.
    cfg = load_config(GPU_CONFIG, overrides=[
        "rollout.num_workers=2", "rollout.num_gpus_per_worker=0", "rollout.num_cpus_per_worker=1",
        "learner.num_learners=2", "learner.num_gpus_per_learner=0", "learner.num_cpus_per_learner=1",
        "reward.num_replicas=1", "reward.num_gpus_per_replica=0", "reward.num_cpus_per_replica=1",
    ])
    wanted = {"rollout": cfg.rollout.custom_resources, "reward": cfg.reward.custom_resources,
              "learner": cfg.learner.custom_resources}
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.2", "num_cpus": 0, "include_dashboard": False})
    for role, n in (("rollout", cfg.rollout.num_workers), ("reward", 3), ("learner", cfg.learner.num_learners)):
        # A node holds n actors of its role: n units of each of the role's resources.
        cluster.add_node(node_ip_address="127.0.0.2", num_cpus=NODE_CPUS[role],
                         resources={k: v * n for k, v in wanted[role].items()})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    out: dict[str, object] = {}
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        out["nodes"] = {n["NodeID"]: {k: v for k, v in n["Resources"].items()
                                      if k in ("CPU",) or any(k in w for w in wanted.values())}
                        for n in nodes}
        out["role_node"] = {role: next(n["NodeID"] for n in nodes if set(res) <= set(n["Resources"]))
                            for role, res in wanted.items()}

        # 1. rollout workers and learners: the driver's placement groups + the actors' own options
        pg_ro = role_placement_group("rollout", cfg.rollout.num_workers, cfg.rollout.num_cpus_per_worker,
                                     cfg.rollout.num_gpus_per_worker, cfg.rollout.custom_resources, name="probe-rollout")
        pg_le = role_placement_group("learner", cfg.learner.num_learners, cfg.learner.num_cpus_per_learner,
                                     cfg.learner.num_gpus_per_learner, cfg.learner.custom_resources, name="probe-learner")
        probe = ray.remote(Probe)
        actors = {
            "rollout": [probe.options(**rollout_actor_options(cfg.rollout, pg_ro, i)).remote()
                        for i in range(cfg.rollout.num_workers)],
            "learner": [probe.options(**learner_actor_options(cfg.learner, pg_le, r)).remote()
                        for r in range(cfg.learner.num_learners)],
        }
        out["before"] = {role: ray.get([a.where.remote() for a in acts]) for role, acts in actors.items()}

        serve.start(proxy_location="Disabled")
        serve.run(build_app(cfg.reward, scorer_factory=ConstScorer), name="reward", route_prefix=None)
        out["reward_1"] = _replicas(cluster, "reward")

        # 2. the reward app again with 3 replicas: only reward.num_replicas changes
        cfg3 = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"num_replicas": 3})})
        handle = serve.run(build_app(cfg3.reward, scorer_factory=ConstScorer), name="reward", route_prefix=None)
        out["reward_3"] = _replicas(cluster, "reward")
        import numpy as np

        out["scored"] = handle.score.remote(np.zeros((8, 8, 3), np.uint8), "probe").result(timeout_s=60).score
        out["after"] = {role: ray.get([a.where.remote() for a in acts]) for role, acts in actors.items()}

        # 3. control: replicas with no custom resource (the reward node's CPUs are all taken)
        loose = cfg.reward.model_copy(update={"custom_resources": {}, "num_replicas": 2})
        serve.run(build_app(loose, scorer_factory=ConstScorer), name="control", route_prefix=None)
        out["control"] = _replicas(cluster, "control")
        serve.delete("control")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    print("NODE_MAP " + json.dumps(out), flush=True)


def _replicas(cluster, app: str) -> list[dict[str, str]]:
    """The alive Serve replicas of ``app``: actor id and node id (GCS actor table)."""
    table = cluster.global_state.actor_table(None)
    return sorted(({"actor": aid, "node": a["Address"]["NodeID"]} for aid, a in table.items()
                   if a["State"] == "ALIVE" and a["ActorClassName"].startswith(f"ServeReplica:{app}:")),
                  key=lambda r: r["actor"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
