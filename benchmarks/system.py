"""The whole system on this machine (DESIGN.md §8).

    python -m benchmarks.system [--iterations 4]

Three figures, measured in one run with the same tiny models and the same work per iteration
(rollout of ``batch_size`` trajectories, PIQE reward on every reward step, one learner update,
weight sync):

* the stage-time breakdown of one (steady-state) iteration of the Ray job;
* ``async_vs_sync_ratio``: steady-state iteration time, synchronous / async (max_staleness 1)
  — above 1 means the async schedule is faster;
* ``ray_vs_single_process_ratio``: trajectories/s of the Ray job / a single-process loop doing
  the same work with the same models (no Ray, no Serve, no actors; target ≥ 0.9). The loop runs
  with 1 torch thread and with the default count, and the faster is the baseline: on these tiny
  models, intra-op threads cost more than they give (measured: 1.78 vs 3.06 s/iteration on 2
  cores), and the baseline must be the best a single process can do.

Steady state: the first iteration (warm-up: first forward passes, allocations) is excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import emit, print_table
from common.config import load_config
from deploy.outputs import read_metrics

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "configs" / "demo_cpu.yaml"


def _overrides(out: Path, iterations: int, run: str, staleness: int) -> list[str]:
    return [
        "reward.backend=pyiqa", "reward.pyiqa_metric=piqe", "data.resolution=32", "rollout.num_inference_steps=4",
        "rollout.batch_size=8", "rollout.samples_per_input=2", "rollout.num_workers=2", "logging.progress=false",
        f"deploy.iterations={iterations}", f"deploy.output_dir={out}", f"deploy.run_name={run}",
        f"deploy.max_staleness={staleness}", f"deploy.checkpoint_every={iterations}",
    ]


def _steady(records: list[dict]) -> list[dict]:
    return [r for r in records if r["iteration"] >= 1]


def run_ray(out: Path, iterations: int, staleness: int) -> dict:
    from deploy.driver import Driver

    cfg = load_config(CONFIG, _overrides(out, iterations, f"ray-s{staleness}", staleness))
    d = Driver(cfg)
    d._connect_ray()
    d.run_loop()
    recs = read_metrics(d.run.metrics_path)
    steady = _steady(recs)
    walls = np.diff([r["wall_time"] for r in recs])  # time between consecutive iteration ends
    stages = {k.split("/", 1)[1]: float(np.mean([r[k] for r in steady]))
              for k in steady[0] if k.startswith("seconds/")}
    trajs = sum(r.get("trajectories", 0) for r in steady)
    return {"iteration_s": float(np.mean(walls)), "stages": stages, "traj_per_s": trajs / float(np.sum(walls)),
            "driver_bytes": float(np.mean([r.get("driver/trajectory_bytes", 0) for r in recs])),
            "rollout_bytes": float(np.mean([r.get("rollout/trajectory_bytes", 0) for r in recs]))}


def trajectory_bytes(resolution: int, steps: int, reward_steps: int, batch: int, latent_channels: int = 4,
                     vae_factor: int = 8) -> dict[str, float]:
    """Bytes per iteration of one rollout batch, by part (the Trajectory's float32/uint8 layout):
    latents [B, K+1, C, h, w] f32, log-probs [B, K] f32, reward images [B, R, H, W, 3] u8,
    final + control images 2·[B, H, W, 3] u8, rewards [B, R] f32."""
    h = resolution // vae_factor
    return {
        "latents": batch * (steps + 1) * latent_channels * h * h * 4.0,
        "log_probs": batch * steps * 4.0,
        "reward_images": batch * reward_steps * resolution * resolution * 3.0,
        "final_and_control": 2.0 * batch * resolution * resolution * 3,
        "rewards": batch * reward_steps * 4.0,
    }


def scale_table(resolution: int = 512, steps: int = 20, reward_steps: int = 20, batch: int = 64) -> dict[str, float]:
    """Bytes through each role per iteration at the GPU config's shape, before and after the
    object-store data path (no measurement: the arithmetic of the layout above)."""
    p = trajectory_bytes(resolution, steps, reward_steps, batch)
    total = sum(p.values())
    no_images = total - p["reward_images"]
    return {
        "trajectory_bytes": total,
        # before: the driver ray.get'ed every chunk (total) and ray.put the concatenation (total)
        "driver_before": 2 * total, "driver_after": 0.0,
        # each learner fetched the whole batch; now the batch without reward images (IQA reward)
        "learner_before": total, "learner_after": no_images,
    }


def run_single_process(iterations: int, threads: int | None = None) -> dict:
    """Same work, one process: sample → score (overlapped on a thread) → update → copy weights.

    ``threads``: torch intra-op threads for the loop (None: leave the default).
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _single_process_loop(iterations) | {"threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(before)


def _single_process_loop(iterations: int) -> dict:
    from common.policy import build_policy
    from learner.learner import Learner
    from reward_server.scoring import PyIQAScorer
    from rollout.reward_sink import ThreadPoolSink
    from rollout.sampler import sample_trajectories
    from rollout.worker import sampler_settings

    cfg = load_config(CONFIG, _overrides(Path(tempfile.gettempdir()), iterations, "single", 0))
    learner = Learner(cfg.model, cfg.data, cfg.algorithm, cfg.learner)
    policy = build_policy(cfg.model, cfg.data.resolution).eval()
    scorer = PyIQAScorer("piqe")
    sink = ThreadPoolSink(lambda images: scorer.score(list(images)).scores)
    settings = sampler_settings(cfg.rollout, cfg.algorithm)
    G = cfg.rollout.samples_per_input
    from deploy.driver import input_ids_for_iteration

    ends = []
    for it in range(iterations):
        ids = input_ids_for_iteration(it, cfg.rollout.batch_size // G, len(learner.dataset), cfg.rollout.seed)
        control = np.stack([learner.dataset[i].lq for i in ids])
        traj = sample_trajectories(policy, control, ids, settings, policy_version=learner.version,
                                   seed=cfg.rollout.seed, round_index=it, sink=sink)
        learner.update(traj)
        policy.load_trainable_state_dict(learner.get_weights()[1])
        ends.append(time.perf_counter())
    sink.close()
    walls = np.diff(ends)
    return {"iteration_s": float(np.mean(walls)), "traj_per_s": cfg.rollout.batch_size / float(np.mean(walls))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=5)
    args = ap.parse_args(argv)
    import ray
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        singles = [run_single_process(args.iterations, threads) for threads in sorted({1, torch.get_num_threads()})]
        single = min(singles, key=lambda r: r["iteration_s"])
        sync = run_ray(out, args.iterations, staleness=0)
        asyn = run_ray(out, args.iterations, staleness=1)
    with contextlib.suppress(Exception):
        ray.shutdown()

    sc = scale_table()
    print_table("bytes per iteration at the GPU config's shape (512 px, K = 20, 20 reward steps, batch 64)",
                [(role, f"{sc[role + '_before'] / 2**20:.0f}", f"{sc[role + '_after'] / 2**20:.0f}")
                 for role in ("driver", "learner")], ("role", "MiB before", "MiB after"))
    print(f"measured here: driver {sync['driver_bytes']:.0f} B of trajectory per iteration "
          f"(before: {2 * sync['rollout_bytes']:.0f} B = get + put of {sync['rollout_bytes']:.0f} B)")
    print_table("one steady-state iteration of the Ray job (sync schedule), mean seconds per stage",
                [(k, f"{v:.3f}") for k, v in sync["stages"].items()], ("stage", "seconds"))
    print_table(
        f"system throughput, tiny policy 32px, K=4, 8 trajectories/iteration, {args.iterations - 1} steady iterations",
        [*((f"single process, {r['threads']} torch thread(s)", f"{r['iteration_s']:.2f}", f"{r['traj_per_s']:.2f}")
           for r in singles),
         ("Ray, sync", f"{sync['iteration_s']:.2f}", f"{sync['traj_per_s']:.2f}"),
         ("Ray, async (max_staleness 1)", f"{asyn['iteration_s']:.2f}", f"{asyn['traj_per_s']:.2f}")],
        ("run", "s/iteration", "trajectories/s"),
    )
    figures = {
        "ray_vs_single_process_ratio": round(sync["traj_per_s"] / single["traj_per_s"], 3),
        "async_vs_sync_ratio": round(sync["iteration_s"] / asyn["iteration_s"], 3),
        "stage_seconds_sync": {k: round(v, 4) for k, v in sync["stages"].items()},
        "iteration_s": {"single": round(single["iteration_s"], 3), "sync": round(sync["iteration_s"], 3),
                        "async": round(asyn["iteration_s"], 3),
                        **{f"single_{r['threads']}_threads": round(r["iteration_s"], 3) for r in singles}},
        "single_process_threads": single["threads"],
        # Trajectory bytes the driver fetched per iteration (0: only summaries cross it) and the
        # bytes the rollout left in the object store for the learners.
        "driver_trajectory_bytes_per_iteration": sync["driver_bytes"],
        "rollout_trajectory_bytes_per_iteration": sync["rollout_bytes"],
        "driver_trajectory_bytes_per_iteration_before": 2 * sync["rollout_bytes"],
        "scale_512px_K20_batch64": scale_table(),
        "target_ray_vs_single_process_ratio": 0.9,
    }
    emit("system", figures)
    return figures


if __name__ == "__main__":
    main()
