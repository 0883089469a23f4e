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
    # A Ray cluster outside Kubernetes; on KubeRay, deploy/podmonitor.yaml (test_kuberay_manifest.py).
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    ray_job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")
    assert ray_job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_shipped_configs_validate():
    for p in sorted((DEPLOY / "configs").glob("*.yaml")):
        load_config(p)
