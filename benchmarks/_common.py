"""Shared conventions of the benchmarks (DESIGN.md §8).

Every headline figure is a ratio measured side by side in the same run; the last line printed
is one JSON object, also written to ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Run ``fn`` ``warmup + repeats`` times; return min/median seconds of the timed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times)}


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time several functions in alternation (A B A B ...) so machine drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"min_s": min(v), "median_s": statistics.median(v)} for k, v in times.items()}


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def emit(name: str, figures: dict[str, Any], *, write: bool = True) -> None:
    """Print the JSON object as the last line; with ``write``, also save it as results/<name>.json."""
    payload = {"benchmark": name, **figures, "machine": machine()}
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload))


class ServerProcess:
    """A server command in its own process group, its output in ``log_path`` (never this
    process's stdout, whose last line must be the JSON); ready once ``health_url`` answers 200.
    Used for ``python -m reward_server`` and ``vllm serve`` alike."""

    def __init__(self, cmd: list[str], log_path: Path, health_url: str, *, name: str,
                 startup_timeout_s: float = 900.0):
        import os
        import subprocess
        import urllib.request

        self.name = name
        self._log = open(log_path, "wb")  # noqa: SIM115 — closed in close()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=dict(os.environ))
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > startup_timeout_s:
                self.close()
                raise TimeoutError(f"{name} not ready within {startup_timeout_s:g} s; see {log_path}")
            time.sleep(1.0)
        self.startup_s = time.perf_counter() - t0

    def close(self) -> None:
        """SIGTERM to the process group, SIGKILL after 60 s."""
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()
