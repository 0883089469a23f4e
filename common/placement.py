"""Where a role's Ray actors run: one role's resources as Ray actor options and bundles.

Every role (rollout worker, reward replica, learner) asks Ray for the same three things: CPUs,
GPUs and the role's ``custom_resources`` (e.g. ``{rollout_gpu: 1}``). On a cluster whose node
pools advertise one such resource each (deploy/kuberay-rayjob.yaml: one KubeRay worker group per
role), the custom resource is what pins a role to its pool; ``num_gpus`` alone would let Ray put
a reward replica on any free GPU, a rollout or learner one included.

The same request is used twice, and both must carry it:

* the placement-group bundle the driver reserves for each rollout worker and learner
  (:func:`bundle`): it decides the node;
* the actor's own options (:func:`actor_resources`): what the actor takes from its bundle, and
  the whole request where there is no placement group (a Serve replica, an actor started
  outside the driver). Ray requires an actor's request to fit inside its bundle, so both are
  built from the same numbers here.

Pure functions (no Ray import): tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RESERVED_RESOURCES", "actor_resources", "bundle", "check_custom_resources"]

#: Names Ray keeps for itself: ``ray.remote(resources=...)`` rejects CPU/GPU (use num_cpus /
#: num_gpus), and memory / object-store memory are not custom resources.
RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def check_custom_resources(custom: Mapping[str, float], field: str) -> dict[str, float]:
    """``custom`` as a plain dict; raises ValueError naming ``field`` for a name Ray keeps for
    itself, an empty name, or a non-positive amount (a 0 would request nothing and pin nothing)."""
    out: dict[str, float] = {}
    for name, amount in custom.items():
        if not name or not isinstance(name, str):
            raise ValueError(f"{field}: resource names must be non-empty strings, got {name!r}")
        if name in RESERVED_RESOURCES or name.startswith("node:"):
            raise ValueError(
                f"{field}: {name!r} is not a custom resource (Ray keeps {sorted(RESERVED_RESOURCES)} and node:*); "
                "CPUs and GPUs have their own num_cpus_* / num_gpus_* fields"
            )
        if not amount > 0:
            raise ValueError(f"{field}.{name}: expected an amount > 0, got {amount!r}")
        out[name] = float(amount)
    return out


def actor_resources(num_cpus: float, num_gpus: float, custom: Mapping[str, float]) -> dict[str, Any]:
    """Ray actor options of one actor of a role: ``num_cpus``, ``num_gpus`` and, when the role has
    any, ``resources`` (its custom resources)."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if custom:
        opts["resources"] = dict(custom)
    return opts


def bundle(num_cpus: float, num_gpus: float, custom: Mapping[str, float]) -> dict[str, float]:
    """The placement-group bundle of one actor of a role (zero amounts left out: Ray rejects a
    bundle whose resources are all zero, and a zero asks for nothing)."""
    wanted = {"CPU": num_cpus, "GPU": num_gpus, **custom}
    return {k: float(v) for k, v in wanted.items() if v}
