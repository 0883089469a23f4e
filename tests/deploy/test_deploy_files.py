"""Deployment files agree with the code: metric names, resources, configs."""

import json
import re
from pathlib import Path

import yaml

from common.config import load_config
from common.telemetry import METRICS, PREFIX

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_dashboard_queries_only_known_metrics():
    dash = json.loads((DEPLOY / "grafana" / "restore-rl-dashboard.json").read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names.update(re.findall(r"ray_" + PREFIX + r"([a-z_]+?)(?:_bucket|_sum|_count)?\b", target["expr"]))
    known = set(METRICS)
    assert names and names <= known, names - known
    # the panels the issue asks for
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("rollout", "reward mean", "staleness", "weight sync", "reward latency", "batch size"):
        assert word in titles


def test_prometheus_scrapes_ray_service_discovery():
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    ray_job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")
    assert ray_job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_kuberay_worker_groups_match_gpu_config_resources():
    job = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "reward", "learner"}
    cfg = load_config(DEPLOY / "configs" / "pasd_lol_gpu.yaml")
    wanted = {"rollout": cfg.rollout.custom_resources, "reward": cfg.reward.custom_resources,
              "learner": cfg.learner.custom_resources}
    for name, g in groups.items():
        advertised = json.loads(yaml.safe_load(g["rayStartParams"]["resources"]))
        assert set(wanted[name]) <= set(advertised), (name, advertised)
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "deploy.driver" in job["spec"]["entrypoint"]


def test_shipped_configs_validate():
    for p in sorted((DEPLOY / "configs").glob("*.yaml")):
        load_config(p)
