"""Weight payloads and their transport: the contract between learner and rollout (DESIGN.md §4).

Only the trainable tensors travel (LoRA adapters, or the whole ControlNet), tagged with the
learner's policy version. Both sides use this module: the learner builds a :class:`WeightLayout`
and sends, a rollout worker receives (:func:`receive_weights`); the driver-side coordinator that
decides when and checks the result is :class:`learner.weight_sync.WeightSync`. Two transports:

* ``collective`` — a ``ray.util.collective`` group of learner rank 0 (group rank 0) and every
  rollout worker (group rank i + 1); gloo on CPU, NCCL on GPU. The tensors are flattened into
  buckets of at most ``bucket_mb`` (one per dtype run) and broadcast bucket by bucket after a
  small int64 header ``[version, num_buckets]`` that the receivers check
  (:class:`CollectiveEndpoint`).
* ``object_store`` — the learner flattens the same buckets into uint8 numpy arrays
  (:class:`WeightPayload`; Ray deserialises numpy zero-copy from shared memory, torch tensors
  would be pickled and copied) and returns them from a task; every worker ``ray.get``s that one
  object.
* ``auto`` (:func:`choose_method`) — ``collective`` only for weights on GPU (NCCL: no
  GPU→host→GPU copies) larger than :data:`AUTO_OBJECT_STORE_MAX_BYTES`; ``object_store``
  otherwise. On CPU the zero-copy object store was as fast as gloo at 4 MiB and 3× faster at
  192 MiB (``benchmarks/weight_sync.py``).

Timeouts on the members' side (the driver's is the third level, in :mod:`learner.weight_sync`):

1. every member runs its collective calls on a helper thread and gives up after ``timeout_s``
   (:class:`CollectiveEndpoint`); the endpoint is then *broken* and must be re-created;
2. the gloo process group itself is created with ``timeout=timeout_s``, so the helper thread
   is released by the backend too (NCCL relies on 1 and 3).

Why the gloo group is the process's *default* torch.distributed group: ray.util.collective's
gloo backend is built on ``torch.distributed`` and derives every group from the default one.
Data-parallel learners therefore all-reduce gradients over a separate, stateless process group
(:mod:`learner.learner`), which leaves the default group of learner rank 0 to this module.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "AUTO_OBJECT_STORE_MAX_BYTES",
    "DRIVER_GRACE_S",
    "GROUP_NAME",
    "CollectiveEndpoint",
    "StaleWorkerError",
    "WeightLayout",
    "WeightPayload",
    "WeightSyncError",
    "WeightSyncTimeout",
    "choose_method",
    "free_port",
    "node_address",
    "receive_weights",
    "state_nbytes",
]

log = logging.getLogger(__name__)

Method = Literal["collective", "object_store"]

#: ``auto`` sends GPU weights larger than this by NCCL broadcast; smaller ones, and all CPU weights,
#: through the object store (no group to form or break; survives a worker restart). Measured on 2
#: CPU cores over loopback, 2 receivers (benchmarks/results/weight_sync.json): 4 MiB took ~20 ms
#: either way (Ray call overhead); 192 MiB took 0.16 s by object store (zero-copy numpy from shared
#: memory, ~memcpy speed) vs 0.48 s by gloo broadcast.
AUTO_OBJECT_STORE_MAX_BYTES = 32 * 2**20

#: Extra seconds the driver waits beyond ``timeout_s`` so members can report their own timeout.
DRIVER_GRACE_S = 5.0

#: ray.util.collective group name. "default" maps to torch.distributed's WORLD group in the gloo
#: backend, i.e. the group created here with our timeout (a named sub-group would get torch's
#: 30-minute default), and destroying it frees the process for a fresh group after a failure.
GROUP_NAME = "default"


class WeightSyncError(RuntimeError):
    """A weight sync that did not complete on every member; the message names each member."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A member's collective call did not finish within ``timeout_s``."""


class StaleWorkerError(WeightSyncError):
    """A rollout worker does not hold the learner's version after a sync."""


# ------------------------------------------------------------------------------------ layout
def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32" (torch dtype name without the "torch." prefix)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Bucket:
    """Consecutive tensors of one dtype, flattened into a single 1-D buffer of ``numel``."""

    dtype: str
    entries: tuple[TensorMeta, ...]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class WeightLayout:
    """How a trainable state dict is cut into flat buckets; identical on sender and receivers.

    Built by the sender from its state dict (:meth:`from_state`) and sent once at set-up; a
    receiver :meth:`check`s it against its own trainable tensors, so a worker built from a
    different model config fails at set-up with the differing names, not mid-run.
    """

    buckets: tuple[Bucket, ...]

    @staticmethod
    def from_state(state: dict[str, torch.Tensor], bucket_bytes: int) -> WeightLayout:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes: expected >= 1, got {bucket_bytes}")
        if not state:
            raise ValueError("weight layout: the state dict is empty (no trainable tensors)")
        buckets: list[Bucket] = []
        current: list[TensorMeta] = []
        current_bytes = 0
        for name, t in state.items():
            meta = TensorMeta(name, tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))
            size = t.numel() * t.element_size()
            # A new bucket on a dtype change or when this tensor would overflow a non-empty one
            # (a single tensor larger than bucket_bytes gets a bucket of its own).
            if current and (meta.dtype != current[0].dtype or current_bytes + size > bucket_bytes):
                buckets.append(Bucket(current[0].dtype, tuple(current)))
                current, current_bytes = [], 0
            current.append(meta)
            current_bytes += size
        buckets.append(Bucket(current[0].dtype, tuple(current)))
        return WeightLayout(tuple(buckets))

    @property
    def names(self) -> list[str]:
        return [e.name for b in self.buckets for e in b.entries]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def check(self, state: dict[str, torch.Tensor], who: str = "receiver") -> None:
        """Raise a ValueError naming the tensors whose name, shape or dtype differ from ``state``."""
        ours = {e.name: e for b in self.buckets for e in b.entries}
        missing = sorted(set(ours) - set(state))
        extra = sorted(set(state) - set(ours))
        wrong = [
            f"{n}: sender {list(ours[n].shape)} {ours[n].dtype}, {who} {list(state[n].shape)} "
            f"{str(state[n].dtype).removeprefix('torch.')}"
            for n in sorted(set(ours) & set(state))
            if tuple(state[n].shape) != ours[n].shape
            or str(state[n].dtype).removeprefix("torch.") != ours[n].dtype
        ]
        if missing or extra or wrong:
            raise ValueError(
                f"weight sync: the {who}'s trainable tensors differ from the learner's "
                f"(only on the learner: {missing[:3]}; only on the {who}: {extra[:3]}; "
                f"shape/dtype: {wrong[:3]}); build both from the same model config"
            )

    def flatten(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One contiguous 1-D tensor per bucket (a copy), on the tensors' device."""
        return [
            torch.cat([state[e.name].detach().reshape(-1) for e in b.entries]) for b in self.buckets
        ]

    def empty(self, device: torch.device | str) -> list[torch.Tensor]:
        """Receive buffers: one uninitialised 1-D tensor per bucket."""
        return [torch.empty(b.numel, dtype=b.torch_dtype, device=device) for b in self.buckets]

    def unflatten(self, flats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: view into the flat buffers}, shaped as the layout says."""
        if len(flats) != len(self.buckets):
            raise ValueError(f"weight sync: expected {len(self.buckets)} buckets, got {len(flats)}")
        out: dict[str, torch.Tensor] = {}
        for b, flat in zip(self.buckets, flats):
            if flat.numel() != b.numel or flat.dtype != b.torch_dtype:
                raise ValueError(
                    f"weight sync: bucket of {b.numel} {b.dtype} expected, got {flat.numel()} {flat.dtype}"
                )
            offset = 0
            for e in b.entries:
                out[e.name] = flat[offset : offset + e.numel].view(e.shape)
                offset += e.numel
        return out


@dataclass(frozen=True)
class WeightPayload:
    """What travels through the object store: version + layout + one uint8 array per bucket."""

    version: int
    layout: WeightLayout
    buffers: tuple[np.ndarray, ...]

    @staticmethod
    def from_state(version: int, state: dict[str, torch.Tensor], layout: WeightLayout) -> WeightPayload:
        layout.check(state, who="learner")
        # Bytes, not typed arrays: works for bf16 too (numpy has no bfloat16).
        bufs = tuple(f.cpu().contiguous().view(torch.uint8).numpy() for f in layout.flatten(state))
        return WeightPayload(int(version), layout, bufs)

    def to_state(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            # Arrays from Ray's shared memory are read-only; we only read them (copied into the
            # parameters by load_trainable_state_dict).
            warnings.simplefilter("ignore", UserWarning)
            flats = [
                torch.from_numpy(buf).view(b.torch_dtype).to(device)
                for buf, b in zip(self.buffers, self.layout.buckets)
            ]
        return self.layout.unflatten(flats)


def choose_method(method: str, payload_bytes: int, on_gpu: bool = False) -> Method:
    """``auto`` → ``collective`` for GPU weights over :data:`AUTO_OBJECT_STORE_MAX_BYTES`, else
    ``object_store``; an explicit method is returned as is."""
    if method in ("collective", "object_store"):
        return method  # type: ignore[return-value]
    if method != "auto":
        raise ValueError(f"weight_sync.method: expected collective, object_store or auto, got {method!r}")
    return "collective" if on_gpu and payload_bytes > AUTO_OBJECT_STORE_MAX_BYTES else "object_store"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_address() -> str:
    """This node's address for a rendezvous; loopback stays 127.0.0.1 (ENVIRONMENT.md)."""
    try:
        import ray

        addr = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except Exception:  # noqa: BLE001 - outside Ray: a local run
        addr = "127.0.0.1"
    return "127.0.0.1" if addr.startswith("127.") else addr


# ------------------------------------------------------------------------- member endpoint
class CollectiveEndpoint:
    """One member of the weight-sync collective group, living inside an actor.

    Group rank 0 (the learner) sends, the others receive. Every collective call runs on a
    single helper thread and fails with :class:`WeightSyncTimeout` after ``timeout_s``; after a
    timeout or error the endpoint is *broken* (a thread may still sit in the backend, and the
    group has lost step with its peers): :meth:`close` it and build a new group.

    Args:
        world_size: 1 + number of rollout workers. rank: 0 for the learner, i + 1 for worker i.
        backend: ``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors; ray's NCCL groups need cupy).
        master_addr, master_port: the TCP rendezvous of the gloo group (rank 0's node).
        timeout_s: hard bound of one init / send / receive.
        layout: the bucket layout (sent by the learner at set-up).
        device: where this member's tensors live (receive buffers are allocated there).
    """

    def __init__(
        self,
        *,
        world_size: int,
        rank: int,
        backend: str,
        master_addr: str,
        master_port: int,
        timeout_s: float,
        layout: WeightLayout,
        device: torch.device | str = "cpu",
    ):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        self.world_size, self.rank, self.backend = world_size, rank, backend
        self.timeout_s = float(timeout_s)
        self.layout = layout
        self.device = torch.device(device)
        self.broken: str | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        try:
            self._run(lambda: self._init(master_addr, master_port), "init")
        except BaseException:
            self.close()  # leave no half-made default group behind: a later set-up must work
            raise

    # -- the helper thread ---------------------------------------------------------------
    def _run(self, fn: Callable[[], Any], what: str) -> Any:
        if self.broken is not None:
            raise WeightSyncError(
                f"weight-sync group rank {self.rank}: unusable after an earlier failure ({self.broken}); "
                "close it and set up a new group"
            )
        future = self._executor.submit(fn)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.broken = f"{what} timed out after {self.timeout_s:g} s"
            raise WeightSyncTimeout(
                f"weight-sync group rank {self.rank}: {what} did not finish within {self.timeout_s:g} s "
                "(a peer died, never joined, or is busy)"
            ) from None
        except Exception as err:
            self.broken = f"{what} failed: {type(err).__name__}: {err}"
            raise WeightSyncError(f"weight-sync group rank {self.rank}: {what} failed ({err})") from err

    def _init(self, master_addr: str, master_port: int) -> None:
        import torch.distributed as dist
        from ray.util import collective

        if self.backend == "gloo":
            if master_addr.startswith("127."):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            if dist.is_initialized():
                raise WeightSyncError(
                    "this process already has a default torch.distributed group; the gloo weight-sync "
                    "group needs it (data-parallel learners use a stateless group for this reason)"
                )
            # The default group, with our timeout; ray.util.collective's gloo group "default" is
            # exactly this WORLD group (it skips its own rendezvous when one exists).
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=self.timeout_s),
            )
        collective.init_collective_group(
            self.world_size, self.rank, backend=self.backend, group_name=GROUP_NAME,
            gloo_timeout=int(self.timeout_s * 1000),
        )

    # -- send / receive ------------------------------------------------------------------
    def send(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Broadcast ``state`` (rank 0 only); returns the bytes sent."""
        if self.rank != 0:
            raise WeightSyncError(f"weight-sync group rank {self.rank}: only rank 0 sends")
        self.layout.check(state, who="learner")

        def go() -> int:
            from ray.util import collective

            header = torch.tensor([int(version), len(self.layout.buckets)], dtype=torch.int64, device=self.device)
            collective.broadcast(header, src_rank=0, group_name=GROUP_NAME)
            sent = 0
            for flat in self.layout.flatten(state):
                collective.broadcast(flat.to(self.device), src_rank=0, group_name=GROUP_NAME)
                sent += flat.numel() * flat.element_size()
            return sent

        return self._run(go, f"send of version {version}")

    def receive(self, expected_version: int) -> dict[str, torch.Tensor]:
        """Receive one broadcast (ranks > 0); checks the header against ``expected_version``."""
        if self.rank == 0:
            raise WeightSyncError("weight-sync group rank 0 sends; it cannot receive")

        def go() -> dict[str, torch.Tensor]:
            from ray.util import collective

            header = torch.zeros(2, dtype=torch.int64, device=self.device)
            collective.broadcast(header, src_rank=0, group_name=GROUP_NAME)
            version, num_buckets = (int(v) for v in header.tolist())
            if version != expected_version or num_buckets != len(self.layout.buckets):
                raise WeightSyncError(
                    f"broadcast header says version {version} with {num_buckets} buckets; expected "
                    f"version {expected_version} with {len(self.layout.buckets)} (out of step with the learner)"
                )
            flats = self.layout.empty(self.device)
            for flat in flats:
                collective.broadcast(flat, src_rank=0, group_name=GROUP_NAME)
            return self.layout.unflatten(flats)

        return self._run(go, f"receive of version {expected_version}")

    def close(self) -> None:
        """Leave the group (best effort, bounded by ``timeout_s``); the endpoint is then unusable.

        Also undoes a half-finished init (default group made, ray group not), so that this
        process can join a new group later.
        """

        def destroy() -> None:
            import torch.distributed as dist
            from ray.util import collective

            try:
                if collective.is_group_initialized(GROUP_NAME):
                    collective.destroy_collective_group(GROUP_NAME)  # gloo: destroys WORLD too
            finally:
                if self.backend == "gloo" and dist.is_initialized():
                    dist.destroy_process_group()

        # A fresh thread: the helper thread may still be stuck in the backend.
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                destroy()
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
            finally:
                done.set()

        threading.Thread(target=run, name="weight-sync-close", daemon=True).start()
        if not done.wait(self.timeout_s):
            log.warning("weight-sync group rank %d: close did not finish within %.0f s", self.rank, self.timeout_s)
        elif errors:
            log.warning("weight-sync group rank %d: close: %s", self.rank, errors[0])
        self.broken = self.broken or "closed"
        self._executor.shutdown(wait=False)


def receive_weights(
    endpoint: CollectiveEndpoint | None,
    version: int,
    payload: Sequence[Any] | None,
    *,
    timeout_s: float,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The receiving side of one sync, for a rollout worker (see ``RolloutWorker.receive_weights``).

    ``payload``: ``[ObjectRef of a WeightPayload]`` (object store; wrapped in a list so Ray does
    not resolve it before the call, and the ``ray.get`` here is bounded by ``timeout_s``), or
    None for a collective broadcast through ``endpoint``.
    """
    if payload is not None:
        import ray

        obj = payload[0]
        if isinstance(obj, ray.ObjectRef):
            try:
                obj = ray.get(obj, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise WeightSyncTimeout(
                    f"object-store weights of version {version} not available within {timeout_s:g} s"
                ) from None
        if not isinstance(obj, WeightPayload):
            raise WeightSyncError(f"object-store weights: expected a WeightPayload, got {type(obj).__name__}")
        if obj.version != version:
            raise WeightSyncError(f"object-store weights are version {obj.version}; expected {version}")
        return obj.to_state(device)
    if endpoint is None:
        raise WeightSyncError("collective weight sync: this worker has no group (call init_weight_sync first)")
    return endpoint.receive(version)
