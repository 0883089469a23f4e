"""The denoising loop, written out: DDIM-η trajectories with log-probs (DESIGN.md §2.1–§2.3).

Notation: N inputs, G samples per input, B = N·G trajectories, K DDIM steps, R rewarded steps,
C×h×w the VAE latent of an H×W image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.config import parse_reward_steps
from common.diffusion import PolicyTarget, policy_step
from common.policy import Policy, images_to_tensor, images_to_uint8
from common.reward_sink import RewardSink
from common.types import Trajectory
from rollout.reward_sink import NullSink

__all__ = ["SamplerSettings", "sample_trajectories", "trajectory_seed"]


@dataclass(frozen=True)
class SamplerSettings:
    """Plain sampling arguments (built from ``RolloutConfig`` + ``AlgorithmConfig`` at the edge)."""

    num_inference_steps: int = 8
    eta: float = 1.0
    samples_per_input: int = 2
    reward_steps: str = "all"  # "all" | "every:k" | "last" (§2.3)
    policy_target: PolicyTarget = "enhanced"  # §2.2


def trajectory_seed(base_seed: int, input_id: int, sample_index: int, round_index: int) -> int:
    """The seed of one trajectory's noise: a pure function of who it is, not of batch layout.

    So the same (seed, input, sample, round) gives the same trajectory on any worker, in any batch.
    """
    # 64-bit mix (splitmix64 finaliser) of the four integers.
    x = (base_seed * 0x9E3779B97F4A7C15 + input_id * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB
         + round_index * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    return x & 0x7FFFFFFFFFFFFFFF


def _generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _per_sample_randn(gens: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    # One generator per trajectory: its noise does not depend on its neighbours in the batch.
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in gens])


@torch.no_grad()
def sample_trajectories(
    policy: Policy,
    control_images: np.ndarray | torch.Tensor,
    input_ids: Sequence[int],
    settings: SamplerSettings,
    *,
    policy_version: int,
    seed: int,
    round_index: int = 0,
    sink: RewardSink | None = None,
    on_step: Callable[[int], Any] | None = None,
) -> Trajectory:
    """Sample G trajectories per input with ``policy`` and record everything the learner needs.

    Args:
        control_images: uint8 [N, H, W, 3] LQ images (the condition c).
        input_ids: N dataset ids (the advantage tracker keys on them).
        settings: K, η, G, reward steps, policy target.
        policy_version: version of the weights being sampled (recorded on the trajectory).
        seed, round_index: with (input id, sample index) they fix each trajectory's noise.
        sink: receives the decoded x̂0 of each reward step as soon as it exists (non-blocking);
            its scores are gathered after the last step. None: rewards stay NaN.
        on_step: called with the step index after each denoising step (progress, tests).
    """
    sink = sink if sink is not None else NullSink()
    device = getattr(policy, "device", torch.device("cpu"))
    G, K = settings.samples_per_input, settings.num_inference_steps
    ctrl_u8 = torch.as_tensor(np.asarray(control_images)) if not isinstance(control_images, torch.Tensor) \
        else control_images
    N = len(input_ids)
    if ctrl_u8.dtype != torch.uint8 or ctrl_u8.dim() != 4 or ctrl_u8.shape[0] != N or ctrl_u8.shape[-1] != 3:
        raise ValueError(f"control_images: expected uint8 [{N}, H, W, 3], got {ctrl_u8.dtype} {list(ctrl_u8.shape)}")

    # 1. Repeat each input G times: trajectory b = n·G + g.               ids [B], control [B, 3, H, W]
    ids = torch.as_tensor(list(input_ids), dtype=torch.int64).repeat_interleave(G)
    ctrl_u8 = ctrl_u8.repeat_interleave(G, dim=0)
    control = images_to_tensor(ctrl_u8, device)
    B, H = control.shape[0], control.shape[2]

    # 2. The schedule: a private copy of the scheduler, so concurrent users never share state.
    scheduler = copy.deepcopy(policy.scheduler)
    scheduler.set_timesteps(K, device=device)
    timesteps = scheduler.timesteps.to(torch.int64)  # [K], descending
    reward_idx = parse_reward_steps(settings.reward_steps, K)

    # 3. x_T ~ N(0, I), one seeded generator per trajectory.                      x [B, C, h, w]
    seeds = [trajectory_seed(seed, int(i), b % G, round_index) for b, i in enumerate(ids.tolist())]
    gens = _generators(seeds, device)
    latent_shape = policy.latent_shape(H)
    x = _per_sample_randn(gens, latent_shape, device, torch.float32)

    latents = [x]
    log_probs, sigmas, handles = [], [], []
    reward_images = []
    rewarded = set(reward_idx)

    def model_fn(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return policy.predict(sample, t, control)

    def submit(k: int, img: torch.Tensor) -> None:
        # img uint8 [B, H, W, 3]: what the action of step k led to, handed to the scorer now.
        reward_images.append(img)
        handles.append(sink.submit(img.numpy(), [f"{i}:{b % G}:{k}" for b, i in enumerate(ids.tolist())]))

    # 4. K DDIM-η steps (§2.1); the enhanced target (§2.2) costs one more model call per step.
    #
    # 5. Step-wise reward (§2.3, paper §4.2.3: R(s_t, a_t) = r(x̂_{t−1}, c)). The reward of the
    #    action of step k scores the image it leads to: x̂0 predicted from the sampled x_{t'}, which
    #    step k+1 computes anyway (no extra model call); for the last step, the output D(x_0).
    #    Scoring the x̂0 that formed step k's own mean would be useless for RL: it is a function of
    #    x_t alone, independent of the sampled action, so its policy gradient is zero in expectation.
    for k, t in enumerate(timesteps):
        z = _per_sample_randn(gens, latent_shape, device, torch.float32)
        out = policy_step(scheduler, model_fn, x, int(t), settings.eta, policy_target=settings.policy_target,
                          variance_noise=z)
        if k - 1 in rewarded:  # x̂0(x_t): the result of step k−1's action
            submit(k - 1, images_to_uint8(policy.decode_latents(out.pred_original_sample.float())).cpu())
        x = out.prev_sample.float()
        latents.append(x)
        log_probs.append(out.log_prob.float())
        sigmas.append(float(out.std.reshape(-1)[0]))  # σ_t depends on t only: same for the batch
        if on_step is not None:
            on_step(k)

    # 6. The restored output y = D(x_0), also the reward image of the last step.  final [B, H, W, 3]
    final = images_to_uint8(policy.decode_latents(x)).cpu()
    if K - 1 in rewarded:
        submit(K - 1, final)

    # 7. Gather the scores of every reward step.                                 rewards [B, R]
    scores = sink.gather(handles)
    rewards = torch.stack([torch.as_tensor(np.asarray(s), dtype=torch.float32) for s in scores], dim=1)

    return Trajectory(
        input_ids=ids,
        latents=torch.stack(latents, dim=1).cpu(),  # [B, K+1, C, h, w]
        log_probs=torch.stack(log_probs, dim=1).cpu(),  # [B, K]
        timesteps=timesteps.cpu(),
        sigmas=torch.tensor(sigmas, dtype=torch.float32),
        reward_steps=torch.tensor(reward_idx, dtype=torch.int64),
        reward_images=torch.stack(reward_images, dim=1),  # [B, R, H, W, 3]
        rewards=rewards,
        final_images=final,
        control_images=ctrl_u8.cpu(),
        policy_version=int(policy_version),
        eta=float(settings.eta),
        extras={"seeds": seeds},
    ).validate()
