"""deploy/kuberay-rayjob.yaml would deploy: it validates against KubeRay's RayJob CRD (vendored,
tests/deploy/data), each worker group advertises exactly what its role asks for in the GPU
config, in the form KubeRay parses, each pod mounts only what its role uses, with access modes
that allow it, and the PodMonitor finds every Ray pod's metrics port.

Nothing here talks to Kubernetes: the checks mirror what the API server and KubeRay's pod builder
do with the manifest (sources cited per check). A real cluster is the remaining proof.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from common.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD = Path(__file__).with_name("data") / "ray.io_rayjobs.v1.7.0.yaml"
ROLES = ("rollout", "reward", "learner")


# ------------------------------------------------------------------------------------ loading
def _load_all(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRD is 1.4 MB
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return _load_all(DEPLOY / "kuberay-rayjob.yaml")


@pytest.fixture(scope="module")
def job(docs) -> dict:
    (rayjob,) = [d for d in docs if d["kind"] == "RayJob"]
    return rayjob


@pytest.fixture(scope="module")
def gpu_cfg():
    return load_config(DEPLOY / "configs" / "pasd_lol_gpu.yaml")


def _groups(job: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def _pods(job: dict) -> dict[str, dict]:
    """Every pod template: "head" and one per worker group."""
    return {"head": job["spec"]["rayClusterSpec"]["headGroupSpec"], **_groups(job)}


# ------------------------------------------------------------------------------- the CRD schema
def _strict(schema: object) -> object:
    """The CRD schema with unknown fields rejected, as the API server does under kubectl's
    default strict field validation (structural schemas: an object with `properties` and
    neither `additionalProperties` nor x-kubernetes-preserve-unknown-fields has no other fields).
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_validator():
    jsonschema = pytest.importorskip("jsonschema")  # in requirements/cpu.txt
    (crd,) = _load_all(CRD)
    assert crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def _errors(validator, doc: dict) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc))


def test_the_rayjob_validates_against_kuberays_crd(job, rayjob_validator):
    assert job["apiVersion"] == "ray.io/v1"
    assert _errors(rayjob_validator, job) == []


@pytest.mark.parametrize(("path", "value", "fragment"), [
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "4", "is not of type 'integer'"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "rayStartParams", "num-gpus"), 1, "is not of type 'string'"),
    (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParam"), {}, "Additional properties"),  # a typo
    (("spec", "shutdownAfterJobFinish"), True, "Additional properties"),
])
def test_the_schema_check_catches_a_wrong_type_or_an_unknown_field(job, rayjob_validator, path, value, fragment):
    bad = copy.deepcopy(job)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = _errors(rayjob_validator, bad)
    assert any(fragment in e for e in errors), errors


def test_sidecar_mode_rules_of_kuberay(job):
    # KubeRay v1.7.0 utils/validation.go ValidateRayJobSpec: SidecarMode takes no submitter
    # template/config and a head restartPolicy of Never or unset. SidecarMode exists since v1.5.0.
    spec = job["spec"]
    assert spec["submissionMode"] == "SidecarMode"
    assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") == "Never"


def test_ray_version_is_the_pinned_one(job):
    pin = re.search(r"^ray\[[^\]]*\]==(\S+)$", (ROOT / "requirements" / "common.txt").read_text(), re.MULTILINE)
    assert pin and job["spec"]["rayClusterSpec"]["rayVersion"] == pin.group(1)


# -------------------------------------------------------------------------------- resources
def kuberay_resources(value: str) -> dict[str, float]:
    """rayStartParams.resources as KubeRay >= 1.3 reads it (v1.7.0 common/pod.go getResourcesMap:
    strings.Trim(value, "'\\"` ") then json.Unmarshal into map[string]float64). A value that does
    not parse makes KubeRay skip adding num-gpus from the GPU limits."""
    parsed = json.loads(value.strip("'\"` "))
    if not isinstance(parsed, dict) or not all(isinstance(v, (int, float)) for v in parsed.values()):
        raise ValueError(f"not a map of numbers: {value!r}")
    return {k: float(v) for k, v in parsed.items()}


def shell_resources(value: str) -> dict[str, float]:
    """The same value as `ray start` receives it: KubeRay writes ` --resources=<value> ` into the
    container's shell command (common/pod.go convertParamMap)."""
    (arg,) = shlex.split(f"--resources={value}")
    return {k: float(v) for k, v in json.loads(arg.removeprefix("--resources=")).items()}


def test_the_old_resources_form_does_not_parse_in_kuberay():
    old = '"{\\"rollout_gpu\\": 1}"'  # the manifest's form before: fine for a shell, not for KubeRay
    assert shell_resources(old) == {"rollout_gpu": 1.0}
    with pytest.raises(ValueError):
        kuberay_resources(old)


def _role_request(cfg, role: str) -> tuple[int, float, float, dict[str, float]]:
    """(actors, CPUs, GPUs, custom resources) one actor of ``role`` asks for."""
    if role == "rollout":
        r = cfg.rollout
        return r.num_workers, r.num_cpus_per_worker, r.num_gpus_per_worker, r.custom_resources
    if role == "reward":
        r = cfg.reward
        return r.num_replicas, r.num_cpus_per_replica, r.num_gpus_per_replica, r.custom_resources
    r = cfg.learner
    return r.num_learners, r.num_cpus_per_learner, r.num_gpus_per_learner, r.custom_resources


def test_each_group_advertises_exactly_what_its_role_asks_for(job, gpu_cfg):
    groups = _groups(job)
    assert set(groups) == set(ROLES)
    for role in ROLES:
        g = groups[role]
        actors, cpus, gpus, custom = _role_request(gpu_cfg, role)
        params = g["rayStartParams"]
        advertised = kuberay_resources(params["resources"])
        assert advertised == shell_resources(params["resources"]), role
        # One actor per pod: the pod's custom resources are one actor's, and the group has one pod
        # per actor; nothing of another role's resources.
        assert advertised == {k: float(v) for k, v in custom.items()}, (role, advertised, custom)
        assert g["replicas"] == actors, role
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert params["num-gpus"] == str(int(gpus)) == limits["nvidia.com/gpu"], role  # GPUs explicit
        assert float(limits["cpu"]) >= cpus, role
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and head["num-gpus"] == "0" and "resources" not in head


def test_each_role_resource_is_advertised_by_one_group_only(job):
    seen: dict[str, str] = {}
    for name, g in _groups(job).items():
        for res in kuberay_resources(g["rayStartParams"]["resources"]):
            assert res not in seen, (res, seen.get(res), name)
            seen[res] = name


# ------------------------------------------------------------------------------------- code
def test_the_code_comes_from_a_fixed_path_in_the_image_with_the_runtime_envs_settings(job):
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    ref = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    workdir = env["working_dir"]
    # The submitter is the head image with none of the pod's mounts (KubeRay v1.7.0
    # common/job.go GetDefaultSubmitterContainer): a relative working_dir would pack its cwd.
    assert PurePosixPath(workdir).is_absolute(), workdir
    assert env["excludes"] == ref["excludes"] and env["env_vars"] == ref["env_vars"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^COPY \. {re.escape(workdir)}/?$", dockerfile, re.MULTILINE), "the image holds the code there"
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert set(ref["excludes"]) <= ignored
    # The entrypoint runs in the working dir: its config path is the repository's.
    m = re.fullmatch(r"python -m deploy\.driver --config (\S+) --resume auto", job["spec"]["entrypoint"])
    assert m and (ROOT / m.group(1)).is_file()


# ---------------------------------------------------------------------------------- storage
def _uses(cfg) -> dict[str, dict[str, bool]]:
    """Paths each pod's role uses → True where it writes there (read from the code: the driver
    reads the data (deploy/driver.py _check_data), the reward model's card and the run folder and
    writes the run's records; rollout workers build the policy and read the data; reward replicas
    load the IQA model; learners build the policy, read the data (ground truths), load checkpoints
    on every rank and write them from rank 0)."""
    policy, data, run = cfg.model.pretrained_dir, cfg.data.root, cfg.deploy.output_dir
    reward = cfg.reward.model_path
    return {
        "head": {str(data): False, str(cfg.data.test_root): False, str(reward): False, str(run): True},
        "rollout": {str(policy): False, str(data): False},
        "reward": {str(reward): False},
        "learner": {str(policy): False, str(data): False, str(run): True},
    }


def _under(path: str, mount: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(mount) or PurePosixPath(mount) in PurePosixPath(path).parents


def test_each_pod_mounts_only_what_its_role_uses(job, gpu_cfg):
    for pod, uses in _uses(gpu_cfg).items():
        spec = _pods(job)[pod]["template"]["spec"]
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        # A volume listed in the pod is attached to its node even if no container mounts it.
        assert set(volumes) == set(mounts), (pod, set(volumes) ^ set(mounts))
        used, written = set(), set()
        for path, writes in uses.items():
            names = [n for n, m in mounts.items() if _under(path, m["mountPath"])]
            assert len(names) == 1, f"{pod}: {path} is under the mounts {names}"
            used.add(names[0])
            if writes:
                written.add(names[0])
        assert set(mounts) == used, f"{pod} mounts {sorted(set(mounts) - used)}, which its role does not use"
        for name, mount in mounts.items():
            read_only = name not in written  # both the mount and the claim say so
            assert bool(mount.get("readOnly")) is read_only, (pod, name)
            assert bool(volumes[name]["persistentVolumeClaim"].get("readOnly")) is read_only, (pod, name)


def test_each_claim_has_the_access_modes_its_mounts_need(docs, job):
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pods_per_claim: dict[str, dict[str, int]] = {}  # claim -> {"rw": pods, "ro": pods}
    for g in _pods(job).values():
        spec = g["template"]["spec"]
        n = g.get("replicas", 1)
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        for v in spec["volumes"]:
            claim = v["persistentVolumeClaim"]["claimName"]
            kind = "ro" if mounts[v["name"]].get("readOnly") else "rw"
            pods_per_claim.setdefault(claim, {"rw": 0, "ro": 0})[kind] += n
    assert set(pods_per_claim) <= set(claims), set(pods_per_claim) - set(claims)
    for claim, count in pods_per_claim.items():
        modes = set(claims[claim]["spec"]["accessModes"])
        # Kubernetes access modes: RWO = one node; ROX = many nodes, read-only; RWX = many, writable.
        # Pods of different groups (and replicas of one) land on different nodes.
        if count["rw"] and count["rw"] + count["ro"] > 1:
            assert "ReadWriteMany" in modes, (claim, count, modes)
        elif count["ro"] > 1:
            assert modes & {"ReadOnlyMany", "ReadWriteMany"}, (claim, count, modes)
        if not count["rw"]:
            assert "ReadWriteMany" not in modes, f"{claim} is never written: ask for ReadOnlyMany"


# ---------------------------------------------------------------------------------- metrics
def test_the_podmonitor_scrapes_every_ray_pods_metrics_port(job):
    (pm,) = _load_all(DEPLOY / "podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    selector = pm["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    for pod, g in _pods(job).items():
        labels = g["template"].get("metadata", {}).get("labels", {})
        assert selector.items() <= labels.items(), (pod, labels)
        container = g["template"]["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports <= set(named), (pod, named)
        # the port Ray exports on (rayStartParams metrics-export-port) is the one scraped
        assert {named[p] for p in ports} == {int(g["rayStartParams"]["metrics-export-port"])}, pod
