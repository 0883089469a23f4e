"""Typed data that crosses role boundaries.

* :class:`Trajectory` — rollout -> learner: one batch of DDIM-η denoising trajectories.
* :class:`ScoreRequest` / :class:`ScoreResponse` — rollout (or anyone) -> reward service
  (DESIGN.md §3). Their wire form is in :mod:`common.wire`.

Notation: B trajectories in the batch (= inputs × G samples per input), K denoising steps,
R rewarded steps (R ≤ K, DESIGN.md §2.3), C×h×w the VAE latent, H×W the RGB image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

__all__ = ["Trajectory", "RolloutSummary", "ImageItem", "ScoreRequest", "ScoreResponse", "ShapeError", "LEVEL_NAMES"]

#: Quality levels of Q-Align/DeQA-style scorers, best first (DESIGN.md §3).
LEVEL_NAMES: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")


class ShapeError(ValueError):
    """A tensor whose shape or dtype disagrees with its documented contract."""


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int | None, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"Trajectory.{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ShapeError(f"Trajectory.{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise ShapeError(f"Trajectory.{name}: expected shape {want}, got {list(t.shape)}")


#: The Trajectory fields with a leading batch dimension B (concat, select and size follow them).
_PER_SAMPLE = ("input_ids", "latents", "log_probs", "reward_images", "rewards", "final_images", "control_images")


@dataclass
class Trajectory:
    """A batch of B denoising trajectories sampled by one policy version (DESIGN.md §2.1).

    Step k (0-based, sampling order) goes from state ``latents[:, k]`` (x_t, t = ``timesteps[k]``)
    to action ``latents[:, k + 1]`` (x_{t'}, the previous timestep in diffusion time).

    Attributes:
        input_ids: int64 [B] — dataset index of each sample's input; the G samples of one input
            share it (the advantage tracker keys on it, §2.4).
        latents: float32 [B, K+1, C, h, w] — x_T (initial noise), then every x_{t'} sampled.
        log_probs: float32 [B, K] — log π_old(x_{t'} | x_t, c), mean over latent elements (§2.1).
        timesteps: int64 [K] — the scheduler timestep t of each step (descending).
        sigmas: float32 [K] — σ_t of each step (η·DDIM variance^½); σ < 1e-8 means deterministic.
        reward_steps: int64 [R] — indices k of the steps whose action is rewarded.
        reward_images: uint8 [B, R, H, W, 3] — RGB, what the action of each reward step k led to:
            the decoded x̂0 predicted from latents[:, k+1] (k < K−1), or the output (k = K−1).
        rewards: float32 [B, R] — r_{i,k} ∈ [0, 1] for IQA; NaN until the scores are gathered.
        final_images: uint8 [B, H, W, 3] — the restored output y_i (decoded final x_0), RGB.
        control_images: uint8 [B, H, W, 3] — the LQ condition c_i, RGB.
        policy_version: int — version of the weights that sampled every trajectory in the batch.
        eta: float — DDIM η used for sampling.
    """

    input_ids: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    reward_steps: torch.Tensor
    reward_images: torch.Tensor
    rewards: torch.Tensor
    final_images: torch.Tensor
    control_images: torch.Tensor
    policy_version: int
    eta: float
    extras: dict[str, Any] = field(default_factory=dict)

    # -- derived views ---------------------------------------------------------------------
    @property
    def actions(self) -> torch.Tensor:
        """float32 [B, K, C, h, w] — the sampled x_{t'} of each step (a view of ``latents``)."""
        return self.latents[:, 1:]

    @property
    def states(self) -> torch.Tensor:
        """float32 [B, K, C, h, w] — the x_t each step started from (a view of ``latents``)."""
        return self.latents[:, :-1]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def deterministic(self) -> torch.Tensor:
        """bool [K] — steps with σ_t < 1e-8: sampled but excluded from the RL loss (§2.1)."""
        return self.sigmas < 1e-8

    def validate(self) -> "Trajectory":
        """Check every field against the documented shape and dtype; returns self."""
        B = self.input_ids.shape[0] if isinstance(self.input_ids, torch.Tensor) else None
        K = self.timesteps.shape[0] if isinstance(self.timesteps, torch.Tensor) else None
        R = self.reward_steps.shape[0] if isinstance(self.reward_steps, torch.Tensor) else None
        _check("input_ids", self.input_ids, torch.int64, (None,))
        _check("timesteps", self.timesteps, torch.int64, (None,))
        _check("reward_steps", self.reward_steps, torch.int64, (None,))
        _check("latents", self.latents, torch.float32, (B, None if K is None else K + 1, None, None, None))
        _check("log_probs", self.log_probs, torch.float32, (B, K))
        _check("sigmas", self.sigmas, torch.float32, (K,))
        _check("final_images", self.final_images, torch.uint8, (B, None, None, 3))
        H, W = self.final_images.shape[1:3]
        # Dim 1 may be 0: the images were left out (only the reconstruction reward reads them).
        _check("reward_images", self.reward_images, torch.uint8,
               (B, 0 if self.reward_images.dim() == 5 and self.reward_images.shape[1] == 0 else R, H, W, 3))
        _check("rewards", self.rewards, torch.float32, (B, R))
        _check("control_images", self.control_images, torch.uint8, (B, H, W, 3))
        if K is not None and R and (self.reward_steps.min() < 0 or self.reward_steps.max() >= K):
            raise ShapeError(f"Trajectory.reward_steps: indices must lie in [0, {K}), got {self.reward_steps.tolist()}")
        if not isinstance(self.policy_version, int) or self.policy_version < 0:
            raise ShapeError(f"Trajectory.policy_version: expected an int >= 0, got {self.policy_version!r}")
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the per-sample tensors (what moving the batch between processes costs)."""
        return sum(int(getattr(self, n).numel() * getattr(self, n).element_size()) for n in _PER_SAMPLE)

    def split_reward_images(self) -> tuple["Trajectory", torch.Tensor]:
        """(this batch without its reward images — reward_images [B, 0, H, W, 3] —, the images
        uint8 [B, R, H, W, 3]): the learner needs them only for the reconstruction reward."""
        B, _, H, W, C = self.reward_images.shape
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs.update(reward_images=self.reward_images.new_zeros((B, 0, H, W, C)), extras=dict(self.extras))
        return Trajectory(**kwargs), self.reward_images

    def select(self, rows: torch.Tensor) -> "Trajectory":
        """The trajectories at ``rows`` (bool [B] mask or int64 indices) along B; shared fields
        (timesteps, σ, reward steps) and ``extras`` are kept."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _PER_SAMPLE:
            kwargs[name] = getattr(self, name)[rows]
        kwargs["extras"] = dict(self.extras)
        return Trajectory(**kwargs)

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
        """Concatenate batches sampled with the same schedule and policy version along B."""
        if not parts:
            raise ValueError("Trajectory.concat: no trajectories")
        first = parts[0]
        for p in parts[1:]:
            if p.policy_version != first.policy_version:
                raise ValueError(
                    f"Trajectory.concat: policy versions differ ({first.policy_version} vs {p.policy_version})"
                )
            if not torch.equal(p.timesteps, first.timesteps) or not torch.equal(p.reward_steps, first.reward_steps):
                raise ValueError("Trajectory.concat: timesteps or reward steps differ")
        kwargs = {f.name: getattr(first, f.name) for f in fields(first)}
        for name in _PER_SAMPLE:
            kwargs[name] = torch.cat([getattr(p, name) for p in parts], dim=0)
        kwargs["extras"] = {}
        return Trajectory(**kwargs)


# ---------------------------------------------------------------------------------- reward API
@dataclass(frozen=True)
class RolloutSummary:
    """What the driver receives of one rollout chunk (DESIGN.md §1): ids, version, rewards and
    sizes — a few hundred bytes. The :class:`Trajectory` itself stays in the object store and
    goes from the worker straight to the learners.

    Attributes:
        policy_version: the weights version that sampled the chunk.
        input_ids: int64 [B]. rewards: float32 [B, R] (NaN: unscorable, masked by the driver).
        reward_versions: {reward-model version: scores} of the chunk (iterative RL).
        trajectory_bytes: bytes of the trajectory left in the object store (reward images included).
        reward_wait_s: seconds the worker waited for scores after its last denoising step (the
            part of the reward service's work that sampling did not hide).
    """

    policy_version: int
    input_ids: np.ndarray
    rewards: np.ndarray
    reward_versions: dict[str, int]
    trajectory_bytes: int
    reward_wait_s: float = 0.0

    @staticmethod
    def of(traj: Trajectory) -> "RolloutSummary":
        return RolloutSummary(int(traj.policy_version), traj.input_ids.numpy().copy(), traj.rewards.numpy().copy(),
                              dict(traj.extras.get("reward_versions", {})), traj.nbytes,
                              float(traj.extras.get("reward_wait_s", 0.0)))


@dataclass(frozen=True)
class ImageItem:
    """One image to score: ``pixels`` uint8 [H, W, 3] RGB, lossless; ``id`` echoes back."""

    id: str
    pixels: np.ndarray

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray):
            raise ShapeError(f"image {self.id!r}: expected a numpy array, got {type(p).__name__}")
        if p.dtype != np.uint8:
            raise ShapeError(f"image {self.id!r}: expected dtype uint8, got {p.dtype}")
        if p.ndim != 3 or p.shape[2] != 3:
            raise ShapeError(f"image {self.id!r}: expected shape [H, W, 3] (RGB), got {list(p.shape)}")
        if p.shape[0] < 1 or p.shape[1] < 1:
            raise ShapeError(f"image {self.id!r}: empty image {list(p.shape)}")


@dataclass(frozen=True)
class ScoreRequest:
    """``POST /score`` body (DESIGN.md §3): images to score, in order."""

    images: tuple[ImageItem, ...]


@dataclass(frozen=True)
class ScoreResponse:
    """Scores in [0, 1] in request order; ``levels`` [N, 5] level probabilities (best first) for
    level-token scorers, None for others; ``model`` and ``version`` name the scorer."""

    ids: tuple[str, ...]
    scores: tuple[float, ...]
    levels: tuple[tuple[float, ...], ...] | None
    model: str
    version: str

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.scores):
            raise ShapeError(f"ScoreResponse: {len(self.ids)} ids but {len(self.scores)} scores")
        if self.levels is not None and len(self.levels) != len(self.scores):
            raise ShapeError(f"ScoreResponse: {len(self.scores)} scores but {len(self.levels)} level rows")
