"""Run the standalone reward service (HTTP + msgpack; DESIGN.md §3).

    python -m reward_server --config deploy/configs/demo_cpu.yaml --set reward.port=8710

Reads the ``reward`` section of the experiment config: the scorer (backend, model, preset), the
address (``host``, default 127.0.0.1; ``port``), the caps, the micro-batching and the optional
bearer token. Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from common.config import add_config_args, config_from_args
from reward_server.factory import build_scorer_from_config
from reward_server.http_server import RewardHTTPServer, run_server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m reward_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(ap)
    args = ap.parse_args(argv)
    reward = config_from_args(args).reward
    if reward.backend == "vllm":
        # ENVIRONMENT.md: on CPU vLLM reserves its KV cache from host RAM; 1 GiB unless told.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    start = time.perf_counter()
    print(f"reward server: building the {reward.backend} scorer ...", file=sys.stderr, flush=True)
    scorer = build_scorer_from_config(reward)
    print(
        f"reward server: scorer ready in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    server = RewardHTTPServer.from_config(reward, scorer)
    asyncio.run(run_server(server, reward.host, reward.port))
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the engine must be created under this guard
    sys.exit(main())
