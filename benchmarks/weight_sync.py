"""Weight-sync throughput (collective vs object store) and learner step time (DESIGN.md §8).

    python -m benchmarks.weight_sync [--small-mb 4] [--large-mb 192] [--receivers 2] [--rounds 3]

1. One sender actor (group rank 0, as learner rank 0) and ``--receivers`` receiver actors (as
   rollout workers) on a local Ray over loopback, driven by the real
   :class:`learner.weight_sync.WeightSync` (same layout, buckets, endpoint and payload code as
   the Learner/RolloutWorker). Payloads: LoRA-sized (``--small-mb``, many small fp32 tensors)
   and ControlNet-sized (``--large-mb``; a real SD ControlNet is ~1.4 GB in fp32 — 192 MiB keeps
   sender + object store + 2 receivers under ~1.5 GB and a few minutes on 2 cores).
   Headline per size: ``collective_ratio_to_memcpy`` and ``object_store_ratio_to_memcpy`` =
   (time of a plain in-process copy of the delivered bytes, payload × receivers) / (time of one
   sync to every receiver), measured interleaved in the same run. Sync time is the driver's wall
   time of ``WeightSync.sync()`` (transfer, version checks, loading into the receivers' tensors).
2. One in-process Learner update of the tiny policy (32 px, K = 4, B = 4, adaptive mode with KL),
   ``standard`` vs ``enhanced`` action target (§2.2), interleaved: ``learner_enhanced_cost_ratio``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch

from benchmarks._common import emit, interleaved, print_table

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _state(total_bytes: int, tensor_bytes: int, seed: int) -> dict[str, torch.Tensor]:
    """fp32 tensors of ``tensor_bytes`` each summing to ``total_bytes``."""
    g = torch.Generator().manual_seed(seed)
    n_per = max(1, tensor_bytes // 4)
    state, left, i = {}, total_bytes // 4, 0
    while left > 0:
        n = min(n_per, left)
        state[f"layer{i}.weight"] = torch.randn(n, generator=g)
        left -= n
        i += 1
    return state


class Sender:
    """Stands in for learner rank 0 (the methods WeightSync calls)."""

    def __init__(self, total_bytes: int, tensor_bytes: int):
        self.state = _state(total_bytes, tensor_bytes, seed=0)
        self.version = 0
        self._sync = None

    def bump(self) -> int:  # a new version to send (an "update")
        self.version += 1
        for t in self.state.values():
            t[0] = float(self.version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def uses_cuda(self) -> bool:
        return False

    def weight_layout(self, bucket_bytes: int):
        from common.weight_transport import WeightLayout

        return WeightLayout.from_state(self.state, bucket_bytes)

    def weight_sync_address(self):
        from common.weight_transport import free_port, node_address

        addr = node_address()
        return addr, free_port(addr)

    def init_weight_sync(self, **kwargs: Any) -> int:
        from common.weight_transport import CollectiveEndpoint

        self._sync = CollectiveEndpoint(rank=0, **kwargs)
        return 0

    def broadcast_weights(self, version: int) -> int:
        self._sync.send(version, self.state)
        return version

    def export_weights(self, bucket_bytes: int):
        from common.weight_transport import WeightLayout, WeightPayload

        return WeightPayload.from_state(self.version, self.state, WeightLayout.from_state(self.state, bucket_bytes))

    def close_weight_sync(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


class Receiver:
    """Stands in for a rollout worker: loads what it receives into its own tensors."""

    def __init__(self, total_bytes: int, tensor_bytes: int):
        self.state = _state(total_bytes, tensor_bytes, seed=1)
        self.version = 0
        self._sync = None

    def init_weight_sync(self, *, rank: int, **kwargs: Any) -> int:
        from common.weight_transport import CollectiveEndpoint

        kwargs["layout"].check(self.state)
        self._sync = CollectiveEndpoint(rank=rank, **kwargs)
        return rank

    def receive_weights(self, version: int, payload=None, timeout_s: float = 60.0) -> int:
        from common.weight_transport import receive_weights

        state = receive_weights(self._sync, version, payload, timeout_s=timeout_s)
        with torch.no_grad():
            for k, t in self.state.items():
                t.copy_(state[k])
        self.version = version
        return version

    def policy_version(self) -> int:
        return self.version

    def first_values(self) -> list[float]:
        return [float(t[0]) for t in self.state.values()]

    def close_weight_sync(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def _bench_sync(ray, size_bytes: int, tensor_bytes: int, receivers: int, rounds: int, bucket_mb: float) -> dict:
    from learner.weight_sync import WeightSync

    sender = ray.remote(Sender).options(num_cpus=0.5).remote(size_bytes, tensor_bytes)
    recv = [ray.remote(Receiver).options(num_cpus=0.5).remote(size_bytes, tensor_bytes) for _ in range(receivers)]
    syncs = {
        "collective": WeightSync(sender, recv, method="collective", bucket_mb=bucket_mb, timeout_s=120),
        "object_store": WeightSync(sender, recv, method="object_store", bucket_mb=bucket_mb, timeout_s=120),
    }
    for s in syncs.values():
        s.setup()
    src = torch.randn(size_bytes // 4)

    def memcpy():
        for _ in range(receivers):  # the delivered bytes: payload × receivers
            src.clone()

    def run(name):
        def go():
            v = ray.get(sender.bump.remote())
            t0 = time.perf_counter()
            syncs[name].sync()
            go.seconds.append(time.perf_counter() - t0)
            assert all(x == float(v) for x in ray.get(recv[-1].first_values.remote()))

        go.seconds = []
        return go

    fns = {"memcpy": memcpy, "collective": run("collective"), "object_store": run("object_store")}
    wall = interleaved(fns, rounds=rounds)
    # The syncs' wall times include the version bump: use their sync-only times (warm-up dropped).
    t = {"memcpy": wall["memcpy"]["min_s"], **{k: min(fns[k].seconds[1:]) for k in ("collective", "object_store")}}
    for s in syncs.values():
        s.close()
    for a in [sender, *recv]:
        ray.kill(a)
    return t


def _bench_learner(rounds: int) -> dict[str, float]:
    from common.config import AlgorithmConfig, DataConfig, LearnerConfig, ModelConfig
    from learner.learner import Learner
    from rollout.sampler import SamplerSettings, sample_trajectories

    data = DataConfig(kind="synthetic", resolution=32, num_synthetic=4, num_test=1)
    learners, trajs = {}, {}
    for target in ("standard", "enhanced"):
        algo = AlgorithmConfig(mode="adaptive", policy_target=target, kl_coef=0.01)
        learner = Learner(ModelConfig(kind="tiny"), data, algo, LearnerConfig(micro_batch_size=4))
        control = np.stack([learner.dataset[i].lq for i in (0, 1)])
        settings = SamplerSettings(num_inference_steps=4, samples_per_input=2, policy_target=target)
        traj = sample_trajectories(learner.policy, control, [0, 1], settings, policy_version=0, seed=0)
        traj.rewards = torch.rand(traj.rewards.shape, generator=torch.Generator().manual_seed(0))
        learners[target], trajs[target] = learner, traj
    t = interleaved({k: (lambda k=k: learners[k].update(trajs[k])) for k in learners}, rounds=rounds)
    return {k: v["min_s"] for k, v in t.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-mb", type=float, default=4.0, help="LoRA-sized payload (MiB)")
    ap.add_argument("--large-mb", type=float, default=192.0, help="ControlNet-sized payload (MiB)")
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    args = ap.parse_args(argv)

    import ray

    ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=8, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    figures: dict[str, Any] = {}
    rows = []
    try:
        # (payload, tensor size): LoRA = many small tensors; ControlNet = larger conv/linear weights.
        for label, mb, tensor_kb in (("lora", args.small_mb, 16), ("controlnet", args.large_mb, 4096)):
            size = int(mb * 2**20)
            t = _bench_sync(ray, size, tensor_kb * 1024, args.receivers, args.rounds + 1, args.bucket_mb)
            delivered = size * args.receivers
            for method in ("collective", "object_store"):
                ratio = t["memcpy"] / t[method]
                figures[f"{label}_{method}_ratio_to_memcpy"] = round(ratio, 4)
                figures[f"{label}_{method}_mb_per_s"] = round(delivered / t[method] / 2**20, 1)
                rows.append((label, f"{mb:g}", method, f"{t[method] * 1e3:.1f}",
                             f"{delivered / t[method] / 2**20:.0f}", f"{ratio:.3f}"))
            figures[f"{label}_memcpy_mb_per_s"] = round(delivered / t["memcpy"] / 2**20, 1)
            figures[f"{label}_collective_vs_object_store"] = round(t["object_store"] / t["collective"], 3)
            rows.append((label, f"{mb:g}", "memcpy", f"{t['memcpy'] * 1e3:.1f}",
                         f"{delivered / t['memcpy'] / 2**20:.0f}", "1.000"))
    finally:
        ray.shutdown()
    print_table(
        f"weight sync to {args.receivers} receivers over loopback (best of {args.rounds}; MB/s of delivered bytes)",
        rows, ("payload", "MiB", "method", "ms", "MB/s", "ratio_to_memcpy"),
    )

    lt = _bench_learner(args.rounds)
    print_table("learner update, tiny policy 32 px, K=4, B=4 (best of rounds)",
                [(k, f"{v:.3f}") for k, v in lt.items()], ("policy_target", "s"))

    figures["collective_ratio_to_memcpy"] = {k: figures[f"{k}_collective_ratio_to_memcpy"] for k in ("lora", "controlnet")}
    figures["object_store_ratio_to_memcpy"] = {k: figures[f"{k}_object_store_ratio_to_memcpy"] for k in ("lora", "controlnet")}
    figures.update(
        learner_step_s_standard=round(lt["standard"], 4),
        learner_step_s_enhanced=round(lt["enhanced"], 4),
        learner_enhanced_cost_ratio=round(lt["enhanced"] / lt["standard"], 3),
        small_mb=args.small_mb, large_mb=args.large_mb, receivers=args.receivers, bucket_mb=args.bucket_mb,
    )
    emit("weight_sync", figures)
    return figures


if __name__ == "__main__":
    main()
