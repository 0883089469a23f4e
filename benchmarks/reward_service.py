"""Reward service throughput on the tiny VLM: batching, and vLLM vs transformers (DESIGN.md §8).

    python -m benchmarks.reward_service [--images 64] [--rounds 5] [--transport http|serve]

Images per second through the whole service — client, transport, (micro-)batching, scorer — at
concurrency 1 (one single-image request at a time) and at concurrency 16 (16 single-image
requests in flight, as 16 rollout workers would send them), for the vllm and the transformers
backends on the same tiny seeded LLaVA. Headlines, all measured interleaved in one run:

* ``batched_vs_sequential_ratio`` — vllm images/s at concurrency 16 / at concurrency 1;
* ``vllm_vs_transformers_ratio`` — vllm images/s / transformers images/s, both at concurrency 16.

``--transport http`` (default): the standalone server (aiohttp, in this process) and the HTTP
client. ``--transport serve``: a local Ray with one Serve replica per backend and the
DeploymentHandle client (adds Ray start and replica start, ~1–2 min, to the run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

from benchmarks._common import emit, interleaved, print_table
from common.config import RewardConfig

BACKENDS = ("vllm", "transformers")


def _images(n: int, side: int) -> list[np.ndarray]:
    """Seeded smooth images with noise (distinct, photo-like enough for a 64 px VLM)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for i in range(n):
        wave = np.sin(2 * np.pi * (xx * (1 + i % 3) + yy * (1 + i % 4)))[..., None]
        out.append(
            np.clip(128 + 90 * wave + rng.normal(0, 4 + i, (side, side, 3)), 0, 255).astype(
                np.uint8
            )
        )
    return out


def _reward_config(backend: str, args: argparse.Namespace) -> RewardConfig:
    return RewardConfig(
        backend=backend,
        model_kind="tiny",
        cache_dir=args.cache_dir,
        dtype="float32",
        vllm_max_model_len=256,
        vllm_gpu_memory_utilization=0.1,
        max_batch_size=args.concurrency,
        max_ongoing_requests=max(64, args.concurrency),
        batch_wait_timeout_s=args.batch_wait,
        num_cpus_per_replica=1,
        timeout_s=300,
    )


def _run(client, images: list[np.ndarray], concurrency: int) -> None:
    """Score every image, ``concurrency`` single-image requests in flight at a time."""
    for start in range(0, len(images), concurrency):
        chunk = images[start : start + concurrency]
        handles = [client.submit(im[None], [f"{start + j}"]) for j, im in enumerate(chunk)]
        client.gather(handles)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=64, help="images scored per timed run")
    ap.add_argument("--side", type=int, default=64, help="image side (px)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--batch-wait",
        type=float,
        default=0.0,
        help="batch_wait_timeout_s. 0: no request waits for company; under load, batches still "
        "form from the requests that queue while the scorer is busy. A wait > 0 adds that "
        "much latency to every request at concurrency 1",
    )
    ap.add_argument("--transport", choices=("http", "serve"), default="http")
    ap.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "restore-rl-bench-cache"
    )
    args = ap.parse_args(argv)

    from reward_server.client import RewardClient

    images = _images(args.images, args.side)
    clients, batchers, teardown, startup = {}, {}, [], {}
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

    for backend in BACKENDS:
        cfg = _reward_config(backend, args)
        t0 = time.perf_counter()
        if args.transport == "serve":
            handle = deploy(cfg, name=f"bench-{backend}")
            clients[backend] = RewardClient.from_handle(handle, timeout_s=cfg.timeout_s)
            batchers[backend] = handle
        else:
            server = RewardHTTPServer.from_config(cfg, build_scorer_from_config(cfg))
            bg = BackgroundServer(server).start()
            teardown.append(bg.stop)
            clients[backend] = RewardClient.from_endpoint(bg.url, timeout_s=cfg.timeout_s)
            batchers[backend] = server.batcher
        startup[backend] = time.perf_counter() - t0
        teardown.append(clients[backend].close)

    try:
        # The same images, the same scores, whichever backend (they compute the same reward).
        ref = {
            b: clients[b].score(np.stack(images), [str(i) for i in range(len(images))])
            for b in BACKENDS
        }
        max_diff = float(np.max(np.abs(ref["vllm"] - ref["transformers"])))

        fns = {
            f"{b}_c{c}": (lambda b=b, c=c: _run(clients[b], images, c))
            for b in BACKENDS
            for c in (1, args.concurrency)
        }
        t = interleaved(fns, rounds=args.rounds, warmup=1)
        if args.transport == "serve":
            sizes = {
                b: batchers[b].stats.remote().result(timeout_s=60)["batch_sizes"] for b in BACKENDS
            }
        else:
            sizes = {b: batchers[b].batch_sizes for b in BACKENDS}
    finally:
        for fn in reversed(teardown):
            try:
                fn()
            except Exception as err:  # noqa: BLE001 — report, keep tearing down
                print(f"teardown: {err}")

    ips = {k: args.images / v["min_s"] for k, v in t.items()}
    c = args.concurrency
    rows = []
    for b in BACKENDS:
        for conc in (1, c):
            k = f"{b}_c{conc}"
            rows.append((b, conc, f"{t[k]['min_s']:.2f}", f"{ips[k]:.1f}"))
    print_table(
        f"reward service ({args.transport}), tiny LLaVA, {args.images} images of {args.side}px per run, "
        f"batch_wait_timeout_s={args.batch_wait} (best of {args.rounds})",
        rows,
        ("backend", "concurrency", "s", "images/s"),
    )
    big = {b: [s for s in sizes[b] if s > 1] for b in BACKENDS}
    print_table(
        "scorer batches formed (all runs)",
        [
            (
                b,
                len(sizes[b]),
                max(sizes[b]),
                f"{statistics.mean(sizes[b]):.2f}",
                f"{startup[b]:.1f}",
            )
            for b in BACKENDS
        ],
        ("backend", "batches", "max size", "mean size", "startup s"),
    )
    figures = {
        "batched_vs_sequential_ratio": round(ips[f"vllm_c{c}"] / ips["vllm_c1"], 3),
        "vllm_vs_transformers_ratio": round(ips[f"vllm_c{c}"] / ips[f"transformers_c{c}"], 3),
        "transformers_batched_vs_sequential_ratio": round(
            ips[f"transformers_c{c}"] / ips["transformers_c1"], 3
        ),
        "vllm_vs_transformers_ratio_sequential": round(ips["vllm_c1"] / ips["transformers_c1"], 3),
        **{f"images_per_s_{k}": round(v, 2) for k, v in ips.items()},
        "max_batch_size_observed": {b: max(sizes[b]) for b in BACKENDS},
        "batches_over_1": {b: len(big[b]) for b in BACKENDS},
        "vllm_transformers_max_score_diff": float(f"{max_diff:.3g}"),
        "startup_s": {b: round(v, 1) for b, v in startup.items()},
        "transport": args.transport,
        "concurrency": c,
        "images_per_run": args.images,
        "side": args.side,
        "batch_wait_timeout_s": args.batch_wait,
    }
    emit("reward_service", figures)
    return figures


if __name__ == "__main__":  # vLLM spawns processes: the engine must be created under this guard
    main()
