"""The Ray driver: the whole training loop as named, timed stages (DESIGN.md §1).

    python -m deploy.driver --config FILE [--set k=v ...] [--resume auto|PATH]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m deploy.driver --config deploy/configs/pasd_lol_gpu.yaml --resume auto

One iteration, the paper's stages, each timed as ``seconds/<stage>`` in metrics.jsonl:
rollout (workers denoise and stream each reward step's images to the reward service meanwhile)
→ reward (the driver checks the gathered scores: one policy version, unscorable ones masked,
reward-model versions counted; ``rollout/reward_wait_s`` is how long a worker still waited for
scores after its last step) → advantages (in the learners: rewards, per-step advantages,
difficulty weights; :meth:`learner.learner.LearnerGroup.prepare_from_store`) → update (PPO + SFT
+ KL and the optimizer step; ``LearnerGroup.optimize``) → weight_sync → checkpoint. Every call
to the learners goes through :class:`learner.learner.LearnerGroup`.

Schedules: ``deploy.max_staleness: 0`` is synchronous. With ``max_staleness ≥ 1`` the next
rollout starts, with the weights the workers hold, before the learner updates on the current
batch; a batch is used only while ``learner_version − batch_version ≤ max_staleness``, otherwise
it is dropped and counted.

SIGTERM/SIGINT (e.g. ``ray job stop``): a stop that arrives during the rollout abandons that
rollout (it is a pure function of the inputs, the round and the weights: the resumed run redoes
it exactly); once the update has been sent, the iteration is finished — update, weight sync,
checkpoint if due, its record. Then the last completed iteration is checkpointed if it was not
already (every wait after a stop is bounded by ``deploy.stop_timeout_s``) and the driver exits
0; ``--resume auto`` continues with the next iteration. An iteration's record and its checkpoint
are one unit: the record is saved inside the checkpoint, and resume reconciles metrics.jsonl to
the checkpoint it loads (later records dropped, a missing record restored), so after any stop or
crash every iteration appears exactly once. A second SIGINT aborts at once (no checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from common.config import ExperimentConfig, add_config_args, config_from_args
from common.placement import bundle
from common.types import RolloutSummary, Trajectory
from deploy.outputs import RunDir, plot_curves, sample_grid

log = logging.getLogger("restore_rl.driver")

#: Round index of the fixed preview samples (before/after grids): never used by training.
PREVIEW_ROUND = 1_000_003


@dataclass
class RolloutLaunch:
    """One iteration's rollout in flight: a ref and an input chunk per worker, and the weights
    version the workers held when it was sent."""

    refs: list[list[Any]]  # per worker: [summary, trajectory, reward images] refs
    chunks: list[list[int]]
    iteration: int
    version: int


@dataclass
class RolloutChunk:
    """One worker's share of an iteration: its summary (in the driver) and the refs of its
    trajectory (reward images left out) and reward images, which stay in the object store."""

    summary: RolloutSummary
    trajectory: Any
    images: Any


def _sample_split(worker: Any, chunk: list[int], iteration: int) -> list[Any]:
    """[summary, trajectory, reward images] refs of ``RolloutWorker.sample_split``."""
    return worker.sample_split.options(num_returns=3).remote(chunk, iteration)


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived: leave the loop at the next safe point."""


@dataclass
class StageTimer:
    """Wall time of each named stage of one iteration."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def input_ids_for_iteration(iteration: int, inputs_per_iteration: int, num_inputs: int, seed: int) -> list[int]:
    """The inputs of one iteration: consecutive slices of per-epoch seeded permutations.

    A pure function of (iteration, seed): a resumed run draws exactly what the original would have.
    """
    start = iteration * inputs_per_iteration
    out = []
    for pos in range(start, start + inputs_per_iteration):
        epoch, offset = divmod(pos, num_inputs)
        perm = np.random.default_rng([seed, epoch]).permutation(num_inputs)
        out.append(int(perm[offset]))
    return out


class UnscorableRewards(RuntimeError):
    """More of an iteration's trajectories carry an unscorable reward than reward.max_invalid_fraction."""


def unscorable_rows(rewards: np.ndarray, input_ids: np.ndarray, max_fraction: float, iteration: int) -> np.ndarray:
    """keep: bool [B] — False for the trajectories whose rewards [B, R] hold a NaN (the reward
    model's answer for one of its images was not a score: deterministic, so re-scoring cannot
    help); they are dropped from the update.

    Raises :class:`UnscorableRewards`, naming the inputs, when more than ``max_fraction`` of the B
    trajectories would be dropped — a reward model that cannot score most images is broken, not
    noisy."""
    bad = ~np.isfinite(np.asarray(rewards, dtype=np.float64)).all(axis=1)  # [B]
    n_bad, B = int(bad.sum()), int(bad.shape[0])
    if n_bad > max_fraction * B:
        ids = sorted({int(i) for i in np.asarray(input_ids)[bad]})
        raise UnscorableRewards(
            f"iteration {iteration}: {n_bad} of {B} trajectories have an unscorable reward (the reward model's "
            f"answer was NaN or not a number; input ids {ids[:16]}), above reward.max_invalid_fraction "
            f"{max_fraction:g}: the reward model is broken for these inputs"
        )
    return ~bad


def mask_unscorable(traj: Trajectory, max_fraction: float, iteration: int) -> tuple[Trajectory, int]:
    """:func:`unscorable_rows` applied to a whole batch: (the trajectories kept, how many were dropped)."""
    keep = unscorable_rows(traj.rewards.numpy(), traj.input_ids.numpy(), max_fraction, iteration)
    n_bad = int((~keep).sum())
    return (traj, 0) if n_bad == 0 else (traj.select(torch.from_numpy(keep)), n_bad)


def split_evenly(items: list[int], n: int) -> list[list[int]]:
    """Split into ``n`` contiguous chunks whose sizes differ by at most one (empty chunks dropped)."""
    k, r = divmod(len(items), n)
    chunks, i = [], 0
    for j in range(n):
        size = k + (1 if j < r else 0)
        chunks.append(items[i : i + size])
        i += size
    return [c for c in chunks if c]


class Driver:
    def __init__(self, cfg: ExperimentConfig, resume: str | None = None):
        self.cfg = cfg
        self.resume = resume
        self.run = RunDir(Path(cfg.deploy.output_dir) / cfg.deploy.run_name)
        self._stop = False
        self._actors: list[Any] = []
        self._pgs: list[Any] = []
        self._serve_started = False
        self._owns_ray = False  # this driver started the local Ray: run_loop shuts it down
        self._stop_deadline = float("inf")
        self._worker_version = 0  # the weights version the rollout workers hold (pushed by the driver)
        #: Recoveries by role (a re-sent rollout chunk, ...), also the Prometheus counter recovered_total.
        self.recovered: dict[str, int] = {}
        self.workers: list[Any] = []
        #: Test hook: called as ``stage_hook(stage, iteration)`` at each stage boundary (``_at``).
        self.stage_hook: Any = None
        self._metrics: dict[str, Any] = {}
        self.dropped_total = 0
        self._dataset: Any = None  # the training pairs, checked before Ray (iterative RL labels against them)
        self._reward_index: tuple[Any, int] = (None, 0)  # (model folder, its version index)
        self._restart_began: float | None = None  # when a restart after an actor's death began

    # ------------------------------------------------------------------------------ set-up
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self._stop and signum == signal.SIGINT:
                raise KeyboardInterrupt("second interrupt: stopping without a checkpoint")
            log.warning("received signal %s: stopping after checkpointing the last completed iteration", signum)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _connect_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        d = self.cfg.deploy
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if d.ray_address == "local" and not os.environ.get("RAY_ADDRESS"):
            # A private local cluster on loopback (ENVIRONMENT.md: 127.0.0.1 is rewritten).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            # address="local": always a new instance, never a cluster someone else started on this
            # machine (a bare ray.init() attaches to the latest `ray start` cluster it finds).
            ray.init(address="local", _node_ip_address=d.node_ip_address, namespace=d.namespace, include_dashboard=False,
                     configure_logging=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, self._cpus_needed()))
            self._owns_ray = True
        else:
            # Inside `ray job submit` RAY_ADDRESS is set; "auto" finds the running cluster.
            ray.init(address=None if d.ray_address == "local" else d.ray_address, namespace=d.namespace)

    def _cpus_needed(self) -> int:
        """Logical CPUs the job's actors reserve. A local cluster advertises at least this many:
        on a small machine the actors share the cores (they mostly wait on each other)."""
        c = self.cfg
        n = c.learner.num_learners * c.learner.num_cpus_per_learner
        if c.algorithm.uses_rollout:
            n += c.rollout.num_workers * c.rollout.num_cpus_per_worker
            replicas = c.reward.max_replicas if c.reward.autoscaling else c.reward.num_replicas
            n += replicas * c.reward.num_cpus_per_replica
        return int(n) + 1

    def request_stop(self) -> None:
        """What SIGTERM does: finish or abandon the iteration in flight (see the module doc),
        checkpoint, exit 0. Safe to call from a signal handler or a stage hook."""
        if not self._stop:
            self._stop = True
            self._stop_deadline = time.monotonic() + self.cfg.deploy.stop_timeout_s

    def _at(self, stage: str, iteration: int) -> None:
        """A stage boundary: the test hook (``stage_hook(stage, iteration)``) runs here, so a test
        can request a stop at an exact point instead of racing a signal against a sleep."""
        if self.stage_hook is not None:
            self.stage_hook(stage, iteration)

    def _get(self, refs: Any, timeout_s: float | None = None, *, stoppable: bool = True) -> Any:
        """ray.get in short slices so a stop request is noticed while waiting.

        ``stoppable``: a stop raises :class:`StopRequested` at once (the rollout: redone on
        resume). Otherwise the call is waited for (its effect on the learner state must be
        kept, e.g. an update or a checkpoint), but after a stop only until ``deploy.stop_timeout_s``
        from the stop request."""
        import ray

        single = not isinstance(refs, list)
        pending = [refs] if single else list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._stop and stoppable:
                raise StopRequested()
            _, not_ready = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if not not_ready:
                out = ray.get(pending)
                return out[0] if single else out
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(not_ready)} of {len(pending)} tasks not done after {timeout_s} s")
            if self._stop and time.monotonic() > self._stop_deadline:
                raise TimeoutError(
                    f"stop: {len(not_ready)} of {len(pending)} tasks not done {self.cfg.deploy.stop_timeout_s} s "
                    "after the stop request (deploy.stop_timeout_s); exiting without them"
                )

    def _placement_group(self, role: str, n: int, cpus: float, gpus: float, custom: dict[str, float]):
        pg = role_placement_group(role, n, cpus, gpus, custom, name=f"restore-rl-{self.cfg.deploy.run_name}-{role}",
                                  on_created=self._pgs.append)
        return pg

    def _start_reward(self) -> Any:
        """The reward sink factory for rollout workers, or None when no IQA reward is needed."""
        cfg = self.cfg
        if not (cfg.algorithm.uses_rl and cfg.algorithm.reward == "iqa"):
            return None
        from reward_server.client import make_reward_sink_factory

        if cfg.reward.endpoint:
            log.info("reward: external endpoint %s", cfg.reward.endpoint)
            return make_reward_sink_factory(cfg.reward)
        if self._serve_started:  # a restart after an actor died: the reward app is still up
            return make_reward_sink_factory(cfg.reward, app_name="reward")
        from reward_server.serve_app import deploy

        t0 = time.perf_counter()
        deploy(cfg.reward, name="reward")
        self._serve_started = True
        log.info("reward: Serve app up (%s backend, %d replica(s)) in %.1f s", cfg.reward.backend,
                 cfg.reward.num_replicas, time.perf_counter() - t0)
        return make_reward_sink_factory(cfg.reward, app_name="reward")

    # ------------------------------------------------------------------------------ the loop
    def run_loop(self) -> int:
        """Run the whole job; the actors and the reward app are torn down however it ends, and a
        local Ray that this call started is shut down (a later job in the same process, e.g. the
        demo's RL run after its SFT pre-training, would otherwise inherit a cluster sized for this
        one). A Ray started before the call (the demo, the compare tool, tests) stays up."""
        import ray

        started_here = not self._owns_ray
        restarts = 0
        try:
            while True:
                try:
                    return self._run_loop()
                except ray.exceptions.RayActorError as err:
                    # A learner died (or a worker outside the rollout's own re-send path, e.g. in
                    # the weight sync): rebuild the actors and resume from the newest checkpoint
                    # that verifies. The resume path is exact, so the iterations since that
                    # checkpoint are redone with the same results and appear once.
                    if self._stop or restarts >= self.cfg.deploy.max_restarts:
                        raise
                    restarts += 1
                    self._restart_began = time.monotonic()
                    log.warning("an actor died (%s): rebuilding the job's actors and resuming from the newest "
                                "checkpoint (restart %d of deploy.max_restarts=%d)",
                                type(err).__name__, restarts, self.cfg.deploy.max_restarts)
                    self._count_recovery("learner")
                    self._teardown_actors()
                    self.resume = "auto"
        except StopRequested:  # during set-up, before the first iteration: nothing to checkpoint
            log.warning("stopped before the first iteration")
            return 0
        finally:
            self.shutdown()
            if started_here and self._owns_ray:
                import ray

                ray.shutdown()
                self._owns_ray = False

    def _run_loop(self) -> int:
        import ray

        from learner.checkpoint import resolve_resume
        from learner.learner import LearnerGroup, create_learners
        from learner.weight_sync import WeightSync
        from rollout.worker import create_rollout_workers

        cfg = self.cfg
        # The checkpoint to resume from is chosen and verified (checksums) before Ray starts: a
        # corrupt one is named in seconds, and an older one that verifies is used instead.
        ckpt = None
        if self.resume:
            ckpt = resolve_resume(self.run.root, "latest" if self.resume == "auto" else self.resume)
        elif self.run.metrics_path.exists():
            raise RuntimeError(
                f"{self.run.root} already holds a run: pass --resume auto to continue it, "
                "or choose another deploy.run_name"
            )
        # The data path too: a missing folder or bad files are named on the console now, not in
        # a worker's log after Ray and Serve are up (the driver keeps the dataset: iterative RL
        # labels against its ground truth).
        self._dataset = self._check_data(cfg)
        if (cfg.algorithm.uses_rl and cfg.algorithm.reward == "iqa" and cfg.reward.model_kind == "trained"
                and not cfg.reward.endpoint):  # an external reward server brings its own model
            from deploy.reward_model import with_trained_reward

            # Before Ray starts: training uses every core for a few minutes (cached afterwards).
            self.cfg = cfg = with_trained_reward(cfg)
        self.run.write_config(cfg.to_yaml())
        self._connect_ray()
        self._install_signal_handlers()  # after ray.init, which installs its own SIGTERM handler
        for reason, n in getattr(self._dataset, "skipped", {}).items():
            self._metric("data_skipped_files", "set", n, {"reason": reason})

        uses_rollout = cfg.algorithm.uses_rollout
        learner_pg = self._placement_group("learner", cfg.learner.num_learners, cfg.learner.num_cpus_per_learner,
                                           cfg.learner.num_gpus_per_learner, cfg.learner.custom_resources)
        learners = create_learners(cfg.model, cfg.data, cfg.algorithm, cfg.learner, placement_group=learner_pg)
        self._actors = list(learners)
        # Every call to the learners goes through the group: all ranks get it, rank 0 answers; the
        # waits notice a stop request (bounded by deploy.stop_timeout_s after one).
        group = LearnerGroup(learners, get=lambda refs: self._get(refs, stoppable=False))
        workers, sync = [], None
        if uses_rollout:
            sink_factory = self._start_reward()
            rollout_pg = self._placement_group("rollout", cfg.rollout.num_workers, cfg.rollout.num_cpus_per_worker,
                                               cfg.rollout.num_gpus_per_worker, cfg.rollout.custom_resources)
            workers = create_rollout_workers(cfg.rollout, cfg.algorithm, cfg.model, cfg.data, sink_factory, rollout_pg)
            self._actors += workers
            self.workers = workers  # for stage hooks (fault-injection tests)
            sync = WeightSync.from_config(group.rank0, workers, cfg.deploy.weight_sync)
        num_inputs = group.num_inputs()

        # Resume: learners load the checkpoint; workers get its weights.
        start = 0
        if self.resume:
            if ckpt is None:
                log.info("resume auto: no checkpoint in %s, starting fresh", self.run.checkpoints)
                self.run.reconcile_metrics(-1)  # records no checkpoint covers: redone, never appended to
                self.dropped_total = 0
            else:
                # resolve_resume verified its checksums before Ray started: not hashed again per rank.
                info = group.load_checkpoint(ckpt, verify_checksums=False)
                start = int(info["iteration"]) + 1
                self.dropped_total = int(info["extra"].get("dropped_total", 0))
                reward_path = info["extra"].get("reward_model_path")
                if reward_path and self._serve_started and reward_path != str(cfg.reward.model_path):
                    # Iterative RL had refreshed the reward model: score with the version reached.
                    self._rollover_reward(Path(reward_path))
                    cfg = self.cfg
                self.run.reconcile_metrics(int(info["iteration"]), info["extra"].get("record"))
                print(f"resumed from {ckpt}: continuing at iteration {start} "
                      f"(policy version {info['policy_version']})", flush=True)
        if self._restart_began is not None:
            log.warning("restarted in %.1f s: continuing at iteration %d", time.monotonic() - self._restart_began,
                        start)
            self._restart_began = None
        if sync is not None:
            sync.setup()
            if ckpt is not None:
                sync.sync()
                self._worker_version = int(info["policy_version"])

        G = cfg.rollout.samples_per_input
        n_inputs = cfg.rollout.batch_size // G
        preview_ids = list(range(min(4, num_inputs)))
        if uses_rollout and start == 0:
            self._save_preview(workers, preview_ids, "samples_before.png")

        last_done, last_ckpt = start - 1, start - 1
        last_record: dict[str, Any] | None = None
        pending = None  # async: the rollout of the next iteration, in flight
        refresh_every = cfg.reward.iqa_train.refresh_every if self._serve_started else 0
        recent: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input ids [B], reward images) since the refresh
        self._metric("reward_model_version", "set", self.reward_model_index)
        progress = _progress(cfg, start)
        try:
            for it in range(start, cfg.deploy.iterations):
                self._at("start", it)
                if self._stop:
                    raise StopRequested()
                timer = StageTimer()
                record: dict[str, Any] = {"iteration": it}
                ids = input_ids_for_iteration(it, n_inputs, num_inputs, cfg.rollout.seed)
                if not uses_rollout:
                    with timer.stage("update"):
                        metrics = group.sft_update(ids)
                    self._at("update", it)
                else:
                    with timer.stage("rollout"):
                        refs = pending if pending is not None else self._launch_rollout(workers, ids, it)
                        pending = None
                        if cfg.deploy.max_staleness > 0 and it + 1 < cfg.deploy.iterations:
                            # Async: workers start the next batch with the weights they hold now.
                            nxt = input_ids_for_iteration(it + 1, n_inputs, num_inputs, cfg.rollout.seed)
                            pending = self._launch_rollout(workers, nxt, it + 1)
                        self._at("launched", it)
                        # reward is overlapped: workers gathered scores before returning
                        # Summaries only: each chunk's trajectory and reward images stay in the
                        # object store, and the learners fetch them (no trajectory tensor here).
                        chunks = self._gather_rollout(refs, workers, sync)
                    self._at("rollout", it)
                    if self._stop:  # the last point where this iteration can be abandoned
                        raise StopRequested()
                    with timer.stage("reward"):
                        # The rewards the workers gathered: one policy version, unscorable ones masked, the
                        # reward-model versions counted (scoring itself overlapped the rollout).
                        summaries = [c.summary for c in chunks]
                        versions = {s.policy_version for s in summaries}
                        if len(versions) != 1:
                            raise RuntimeError(f"iteration {it}: rollout chunks sampled by versions {sorted(versions)}")
                        batch_version = versions.pop()
                        rewards = np.concatenate([s.rewards for s in summaries])  # [B, R]
                        batch_ids = np.concatenate([s.input_ids for s in summaries])  # [B]
                        B = int(batch_ids.shape[0])
                        reward_versions: dict[str, int] = {}
                        for summary in summaries:
                            for v, n in summary.reward_versions.items():
                                reward_versions[v] = reward_versions.get(v, 0) + n
                        keep, n_kept = None, B
                        # Every record carries the traffic, an iteration whose trajectories were all masked too.
                        record["driver/trajectory_bytes"] = 0
                        record["rollout/trajectory_bytes"] = sum(s.trajectory_bytes for s in summaries)
                        record["rollout/reward_wait_s"] = max(s.reward_wait_s for s in summaries)
                        if reward_versions:
                            record["reward_model_versions"] = reward_versions
                            record["reward_model_index"] = self.reward_model_index
                        if cfg.algorithm.uses_rl and cfg.algorithm.reward == "iqa":
                            keep = unscorable_rows(rewards, batch_ids, cfg.reward.max_invalid_fraction, it)
                            masked = B - int(keep.sum())
                            n_kept = B - masked
                            record["reward/masked"] = masked
                            if masked:
                                log.warning("iteration %d: %d trajectories with an unscorable reward masked", it, masked)
                                self.dropped_total += masked
                                self._metric("dropped_trajectories_total", "inc", masked,
                                             {"reason": "unscorable_reward"})
                            else:
                                keep = None
                            if n_kept == 0:  # every trajectory masked (max_invalid_fraction 1): no update
                                record.update(dropped=masked, dropped_total=self.dropped_total)
                                self.run.append_metrics(record)
                                self._at("record", it)
                                continue
                        driver_bytes = 0
                        if refresh_every:
                            # Iterative RL labels the policy's reward images here: the one fetch of
                            # trajectory data into the driver (only with reward.iqa_train.refresh_every).
                            images = torch.cat(self._get([c.images for c in chunks], stoppable=False))
                            ids_t = torch.from_numpy(batch_ids)
                            if keep is not None:
                                images, ids_t = images[torch.from_numpy(keep)], ids_t[torch.from_numpy(keep)]
                            driver_bytes += int(images.numel())
                            recent.append((ids_t.repeat_interleave(images.shape[1]), images.flatten(0, 1)))
                        record["driver/trajectory_bytes"] = driver_bytes
                    self._at("reward", it)
                    learner_version = group.version()
                    staleness = learner_version - batch_version
                    record.update(staleness=staleness, batch_version=batch_version)
                    if staleness > cfg.deploy.max_staleness:
                        self.dropped_total += n_kept
                        self._metric("dropped_trajectories_total", "inc", n_kept, {"reason": "stale"})
                        record.update(dropped=n_kept, dropped_total=self.dropped_total)
                        self.run.append_metrics(record)
                        self._at("record", it)
                        continue
                    with timer.stage("advantages"):
                        # Rewards (the reconstruction reward is computed here) → advantages →
                        # difficulty weights, in the learners, which fetch the batch themselves.
                        parts = [c.trajectory for c in chunks]
                        images_refs = [c.images for c in chunks] if cfg.algorithm.reward == "reconstruction" else None
                        metrics = group.prepare_from_store(parts, keep, images_refs)
                    self._at("advantages", it)
                    with timer.stage("update"):
                        metrics = group.optimize()
                    self._at("update", it)
                    with timer.stage("weight_sync"):
                        sync_info = sync.sync()
                        self._worker_version = int(sync_info["weight_sync/version"])
                    self._at("weight_sync", it)
                    record.update(sync_info)
                    record.update(
                        trajectories=n_kept,
                        trajectories_per_s=n_kept / max(timer.seconds["rollout"], 1e-9),
                    )
                record.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
                if refresh_every and (it + 1) % refresh_every == 0 and it + 1 < cfg.deploy.iterations and recent:
                    # "with Iter. RL" (paper §6.2.7): the reward model learns the current policy's outputs.
                    with timer.stage("reward_refresh"):
                        record.update(self._refresh_reward(group, recent, it))
                    recent = []
                    cfg = self.cfg
                    self._at("reward_refresh", it)
                record["dropped_total"] = self.dropped_total
                if getattr(self._dataset, "skipped_files", None):
                    record["data/skipped_files"] = len(self._dataset.skipped_files)
                if self.recovered:
                    record.update({f"recovered_total/{k}": v for k, v in self.recovered.items()})
                if (it + 1) % cfg.deploy.checkpoint_every == 0 or it == cfg.deploy.iterations - 1:
                    with timer.stage("checkpoint"):
                        # The record travels inside the checkpoint: resume restores it if the
                        # driver dies between this save and the append below.
                        self._checkpoint(group, it, self._finished(record, timer))
                    last_ckpt = it
                    self._at("checkpoint", it)
                record = self._finished(record, timer)
                self.run.append_metrics(record)
                last_record, last_done = record, it
                self._at("record", it)
                if "staleness" in record:
                    self._metric("staleness", "set", record["staleness"])
                progress.update(1)
                progress.set_postfix(_postfix(record))
        except StopRequested:
            log.warning("stopped at iteration %d", last_done + 1)
            if last_done > last_ckpt:
                self._checkpoint(group, last_done, last_record)
            progress.close()
            self._finish(workers, preview_ids, final=False)
            return 0
        progress.close()
        if pending is not None:
            ray.get([r for refs in pending.refs for r in refs])
        self._finish(workers, preview_ids, final=True)
        return 0

    def _teardown_actors(self) -> None:
        """Kill this run's actors and remove their placement groups (the reward app stays)."""
        import ray

        from ray.util import remove_placement_group

        for a in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        for pg in self._pgs:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
        self._actors, self._pgs, self.workers = [], [], []

    def shutdown(self) -> None:
        """Kill this run's actors and the reward app (the Ray cluster itself stays up)."""
        self._teardown_actors()
        if self._serve_started:
            from ray import serve

            with contextlib.suppress(Exception):
                serve.delete("reward")
            self._serve_started = False

    def _launch_rollout(self, workers: list[Any], ids: list[int], it: int) -> RolloutLaunch:
        # Each worker gets a contiguous chunk of the inputs; chunks are sampled in parallel. A
        # worker runs its calls in order, so in async mode the next batch queues behind this one.
        chunks = split_evenly(ids, len(workers))
        refs = [_sample_split(w, chunk, it) for w, chunk in zip(workers, chunks)]
        return RolloutLaunch(refs, chunks, it, self._worker_version)

    def _gather_rollout(self, launch: RolloutLaunch, workers: list[Any], sync: Any) -> list[RolloutChunk]:
        """The launch's chunks (the summary fetched; trajectory and reward images left as refs in
        the object store); a chunk whose worker died (Ray restarts it: ``max_restarts``)
        or came back holding other weights than it was launched with (restarted before it ran)
        is re-sent after the current weights are pushed to every worker. Its trajectories are the
        ones the dead worker would have returned: the seeds depend on the inputs and the round,
        never on the worker. At most ``rollout.max_restarts`` re-sends per launch."""
        import ray

        refs, out = list(launch.refs), [None] * len(launch.refs)
        expected = [launch.version] * len(refs)  # a re-sent chunk: the version pushed before it
        for attempt in range(self.cfg.rollout.max_restarts + 1):
            failed: list[tuple[int, str]] = []
            for i, ref in enumerate(refs):
                if out[i] is not None:
                    continue
                try:
                    summary = self._get(ref[0])
                except ray.exceptions.RayActorError as err:
                    failed.append((i, f"died ({type(err).__name__})"))
                    continue
                if summary.policy_version != expected[i]:
                    failed.append((i, f"sampled with weights v{summary.policy_version}, launched at v{expected[i]}"))
                    continue
                out[i] = RolloutChunk(summary, ref[1], ref[2])
            if not failed:
                return out  # type: ignore[return-value]
            if attempt == self.cfg.rollout.max_restarts:
                break
            for i, why in failed:
                log.warning("rollout worker %d %s: re-sending its %d input(s) of iteration %d (retry %d of %d)",
                            i, why, len(launch.chunks[i]), launch.iteration, attempt + 1, self.cfg.rollout.max_restarts)
                self._count_recovery("rollout")
            self._wait_alive([workers[i] for i, _ in failed])
            version = self._worker_version
            if sync is not None:
                # The restarted worker holds its initial weights; the others get theirs again.
                version = int(sync.resend()["weight_sync/version"])
                self._worker_version = version
            for i, _ in failed:
                refs[i], expected[i] = _sample_split(workers[i], launch.chunks[i], launch.iteration), version
        raise RuntimeError(
            f"iteration {launch.iteration}: rollout worker(s) {[i for i, _ in failed]} failed "
            f"{self.cfg.rollout.max_restarts + 1} times ({'; '.join(w for _, w in failed)}); "
            "rollout.max_restarts bounds the retries"
        )

    def _wait_alive(self, workers: list[Any], timeout_s: float = 300.0) -> None:
        """Until each (restarting) worker answers a call: its constructor has run again."""
        import ray

        deadline = time.monotonic() + timeout_s
        for w in workers:
            while True:
                try:
                    self._get(w.policy_version.remote(), timeout_s=max(1.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    @staticmethod
    def _finished(record: dict[str, Any], timer: StageTimer) -> dict[str, Any]:
        """The iteration's record with its stage times and wall time (a copy)."""
        out = {**record, **{f"seconds/{k}": round(v, 4) for k, v in timer.seconds.items()}}
        out["seconds/iteration"] = round(sum(timer.seconds.values()), 4)
        out["wall_time"] = time.time()
        return out

    def _checkpoint(self, group: Any, iteration: int, record: dict[str, Any] | None = None) -> None:
        # Rank 0 writes (all ranks hold identical weights/optimizer/tracker after the update).
        # Never abandoned by a stop (bounded by deploy.stop_timeout_s after one).
        group.save_checkpoint(
            self.run.root, iteration, config_yaml=self.cfg.to_yaml(), keep=self.cfg.deploy.keep_checkpoints,
            extra={"dropped_total": self.dropped_total,
                   "reward_model_path": None if self.cfg.reward.model_path is None else str(self.cfg.reward.model_path),
                   "reward_model_index": self.reward_model_index,
                   "record": record})

    # ------------------------------------------------------------------------ iterative RL
    @property
    def reward_model_index(self) -> int:
        """Version index of the reward model in use: 0 for the first, +1 per refresh (its card,
        read once per model folder)."""
        from reward_server.iqa_train import read_card

        path = self.cfg.reward.model_path
        if self._reward_index[0] != path:
            card = read_card(path) if path is not None else None
            self._reward_index = (path, int(card.get("version", 0)) if card else 0)
        return self._reward_index[1]

    def _rollover_reward(self, model_path: Path) -> None:
        """Redeploy the reward app under the same name with another model folder. Serve starts
        the new replicas, then retires the old ones: requests in flight finish on the old model,
        every later one is scored by the new one; the workers' handles stay valid."""
        from common.config import parse_config
        from reward_server.serve_app import deploy

        data = self.cfg.model_dump(mode="json")
        data["reward"]["model_kind"] = "local"
        data["reward"]["model_path"] = str(model_path)
        self.cfg = parse_config(data, source="config with the refreshed reward model")
        t0 = time.perf_counter()
        deploy(self.cfg.reward, name="reward")
        log.info("reward: rolled over to %s in %.1f s", model_path, time.perf_counter() - t0)
        self._metric("reward_model_version", "set", self.reward_model_index)

    def _refresh_reward(self, group: Any, recent: list[tuple[Any, Any]], iteration: int) -> dict[str, Any]:
        """Fine-tune the reward model on the policy's recent reward images, labelled against their
        ground truth by the configured label source, roll the app over, and apply the tracker rule."""
        import torch

        from deploy.reward_model import RefreshRejected, refresh_reward_model

        t = self.cfg.reward.iqa_train
        ids = torch.cat([r[0] for r in recent]).numpy()
        images = torch.cat([r[1] for r in recent]).numpy()
        keep = np.linspace(0, len(ids) - 1, min(len(ids), t.refresh_images)).round().astype(int)
        ids, images = ids[keep], images[keep]
        refs = np.stack([self._dataset[int(i)].gt for i in ids])
        before = self.reward_model_index
        try:
            new_path = refresh_reward_model(self.cfg, images, refs, iteration=iteration,
                                            run_name=self.cfg.deploy.run_name)
        except RefreshRejected as err:
            log.warning("iterative RL: refresh rejected, scoring on with v%d: %s", before, err)
            print(f"[iter-rl] iteration {iteration}: refresh rejected, keeping reward model v{before} ({err})",
                  flush=True)
            return {"reward_refresh_rejected": str(err)[:300]}
        self._rollover_reward(new_path)
        if t.refresh_tracker == "reset":
            group.reset_reward_tracker()
        print(f"[iter-rl] iteration {iteration}: reward model v{before} -> v{self.reward_model_index} "
              f"({len(images)} policy images labelled; tracker {t.refresh_tracker})", flush=True)
        # This iteration's rewards came from the old model: its record keeps reward_model_index.
        return {"reward_refreshed_to": self.reward_model_index}

    def _save_preview(self, workers: list[Any], ids: list[int], name: str) -> None:
        if not workers or not ids:
            return
        tr = self._get(workers[0].sample_preview.remote(ids, PREVIEW_ROUND))
        rows = [(tr["lq"][i], tr["output"][i], tr["gt"][i]) for i in range(len(ids))]
        sample_grid(rows, self.run.root / name)

    def _finish(self, workers: list[Any], preview_ids: list[int], final: bool) -> None:
        from deploy.outputs import read_metrics

        records = read_metrics(self.run.metrics_path) if self.run.metrics_path.exists() else []
        keys = [k for k in ("reward/mean", "losses/total", "trajectories_per_s") if any(k in r for r in records)]
        if records and keys:
            plot_curves(records, keys, self.run.root / "reward_curve.png", title=self.cfg.deploy.run_name)
        if final and workers:
            self._save_preview(workers, preview_ids, "samples_after.png")
        print(f"outputs: {self.run.root.resolve()}", flush=True)

    # ------------------------------------------------------------------------------ telemetry
    def _count_recovery(self, role: str) -> None:
        """One recovery of ``role``: the run's records (recovered_total/<role>) and Prometheus."""
        self.recovered[role] = self.recovered.get(role, 0) + 1
        self._metric("recovered_total", "inc", 1, {"role": role})

    def _metric(self, name: str, op: str, value: float, tags: dict[str, str] | None = None) -> None:
        """``op`` ("set" | "inc") on the telemetry metric ``name`` (common/telemetry.py), built
        once. Metrics must never break training: a failure is logged at debug level."""
        try:
            if name not in self._metrics:
                from common.telemetry import ray_metric

                self._metrics[name] = ray_metric(name)
            getattr(self._metrics[name], op)(value, tags=tags)
        except Exception as err:  # noqa: BLE001
            log.debug("metrics: %s: %s", name, err)

    @staticmethod
    def _check_data(cfg: ExperimentConfig) -> Any:
        from common.data import build_dataset

        ds = build_dataset(cfg.data)
        if hasattr(ds, "summary"):  # each skipped file also had its own BadFileWarning
            print(f"[data] {ds.summary()}", flush=True)
        return ds


def role_placement_group(role: str, n: int, cpus: float, gpus: float, custom: dict[str, float], *, name: str,
                         timeout_s: float = 120.0, on_created: Callable[[Any], None] | None = None) -> Any:
    """Reserve ``n`` bundles of one role (CPUs, GPUs and its custom resources: they decide the
    node, so a role's actors land on the pool that advertises its resource) and wait until Ray
    has placed them. ``on_created`` gets the group before the wait (to remove it if the wait
    fails). Raises RuntimeError naming the role and what is free when it cannot be placed."""
    import ray
    from ray.util import placement_group

    one = bundle(cpus, gpus, custom)
    pg = placement_group([dict(one) for _ in range(n)], strategy="PACK", name=name)
    if on_created is not None:
        on_created(pg)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise RuntimeError(
            f"could not place {n} {role} actor(s) of {one} within {timeout_s:g} s: the cluster lacks the resources "
            f"(available: {ray.available_resources()}; held by: {_resource_holders()})"
        )
    return pg


def _resource_holders() -> str:
    """Alive actors and placement groups that hold resources, for a placement error (best effort:
    the state API needs the dashboard agent, which a minimal local Ray may lack)."""
    try:
        from ray.util import placement_group_table
        from ray.util.state import list_actors

        pgs = [f"{v.get('name') or k[:8]}:{v.get('state')}x{len(v.get('bundles', {}))}"
               for k, v in placement_group_table().items() if v.get("state") != "REMOVED"]
        actors = [f"{a.class_name}({a.state})" for a in list_actors(filters=[("state", "=", "ALIVE")], limit=50)]
        return f"placement groups {pgs}, actors {actors}"
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"unknown ({type(e).__name__})"


def _progress(cfg: ExperimentConfig, start: int):
    from tqdm import tqdm

    return tqdm(total=cfg.deploy.iterations, initial=start, desc=cfg.deploy.run_name, unit="it",
                disable=not cfg.logging.progress, file=sys.stderr, dynamic_ncols=True)


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    out = {}
    if "reward/mean" in record:
        out["reward"] = f"{record['reward/mean']:.4f}"
    if "trajectories_per_s" in record:
        out["img/s"] = f"{record['trajectories_per_s']:.2f}"
    for key in ("losses/total", "loss"):
        if key in record:
            out["loss"] = f"{record[key]:.4g}"
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.driver", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="continue from the latest checkpoint of the run (auto) or a checkpoint folder")
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Driver(cfg, resume=args.resume).run_loop()


if __name__ == "__main__":
    raise SystemExit(main())
