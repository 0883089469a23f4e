"""Sampler: shapes and dtypes, determinism, log-prob recomputation, streaming to the reward sink."""

import threading

import numpy as np
import pytest
import torch

from common.diffusion import policy_step
from common.policy import images_to_tensor
from common.reward_sink import RewardError
from rollout.reward_sink import ThreadPoolSink
from rollout.sampler import SamplerSettings, sample_trajectories, trajectory_seed

RES = 32


@pytest.fixture
def control():
    return np.random.default_rng(0).integers(0, 256, (2, RES, RES, 3), dtype=np.uint8)


def test_trajectory_fields_have_documented_shapes(tiny_policy, control):
    s = SamplerSettings(num_inference_steps=4, eta=1.0, samples_per_input=3, reward_steps="every:2",
                        policy_target="standard")
    tr = sample_trajectories(tiny_policy, control, [7, 9], s, policy_version=5, seed=0)
    B, K, R = 6, 4, 2
    C, h, w = tiny_policy.latent_shape(RES)
    assert tr.input_ids.tolist() == [7, 7, 7, 9, 9, 9]
    assert tr.latents.shape == (B, K + 1, C, h, w) and tr.latents.dtype == torch.float32
    assert tr.log_probs.shape == (B, K) and tr.log_probs.dtype == torch.float32
    assert tr.timesteps.shape == (K,) and tr.timesteps.dtype == torch.int64
    assert torch.all(tr.timesteps[:-1] > tr.timesteps[1:])  # descending
    assert tr.sigmas.shape == (K,) and tr.reward_steps.tolist() == [1, 3]
    assert tr.reward_images.shape == (B, R, RES, RES, 3) and tr.reward_images.dtype == torch.uint8
    assert tr.final_images.shape == (B, RES, RES, 3) and tr.final_images.dtype == torch.uint8
    assert tr.control_images.shape == (B, RES, RES, 3)
    assert torch.equal(tr.control_images[0], torch.from_numpy(control[0]))
    assert tr.rewards.shape == (B, R) and torch.isnan(tr.rewards).all()  # no sink: NaN, not 0
    assert tr.policy_version == 5 and tr.eta == 1.0
    tr.validate()


@pytest.mark.parametrize("target", ["standard", "enhanced"])
def test_same_seed_same_trajectory_and_different_samples_differ(tiny_policy, control, target):
    s = SamplerSettings(num_inference_steps=3, samples_per_input=2, policy_target=target)
    a = sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=11)
    b = sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=11)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(a.final_images, b.final_images)
    assert not torch.equal(a.latents[0], a.latents[1])  # the G samples of one input explore
    c = sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=12)
    assert not torch.equal(a.latents, c.latents)


def test_trajectory_noise_does_not_depend_on_batch_layout(tiny_policy, control):
    s = SamplerSettings(num_inference_steps=2, samples_per_input=2, policy_target="standard")
    both = sample_trajectories(tiny_policy, control, [4, 6], s, policy_version=0, seed=3)
    alone = sample_trajectories(tiny_policy, control[1:], [6], s, policy_version=0, seed=3)
    torch.testing.assert_close(both.latents[2:], alone.latents, rtol=1e-5, atol=1e-5)
    assert trajectory_seed(3, 6, 0, 0) != trajectory_seed(3, 6, 1, 0) != trajectory_seed(3, 6, 0, 1)


@pytest.mark.parametrize("target", ["standard", "enhanced"])
def test_recomputed_log_prob_ratio_is_exactly_one(tiny_policy, control, target):
    """The learner's recomputation of a recorded action under unchanged weights (DESIGN §2.1)."""
    s = SamplerSettings(num_inference_steps=3, samples_per_input=2, policy_target=target)
    tr = sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=1)
    ctrl = images_to_tensor(tr.control_images)
    sched = tiny_policy.scheduler.__class__.from_config(tiny_policy.scheduler.config)
    sched.set_timesteps(3)
    with torch.no_grad():
        for k in range(3):
            out = policy_step(sched, lambda x, t: tiny_policy.predict(x, t, ctrl), tr.states[:, k],
                              int(tr.timesteps[k]), s.eta, policy_target=target, prev_sample=tr.actions[:, k])
            ratio = torch.exp(out.log_prob.float() - tr.log_probs[:, k])
            assert torch.equal(ratio, torch.ones_like(ratio)), (k, ratio)


def test_reward_images_reach_the_sink_while_sampling_runs(tiny_policy, control):
    steps_done = []
    submitted_at = []
    release = threading.Event()

    def score(images):
        # Scoring of the first reward step blocks until the sampler has moved on: if the sampler
        # waited for scores before denoising further, this would deadlock (bounded by the timeout).
        submitted_at.append(len(steps_done))
        if len(submitted_at) == 1:
            assert release.wait(timeout=60), "sampler did not continue while the reward was pending"
        return images.reshape(len(images), -1).mean(axis=1) / 255.0

    def on_step(k):
        steps_done.append(k)
        if k == 2:
            release.set()

    sink = ThreadPoolSink(score, max_workers=2)
    s = SamplerSettings(num_inference_steps=4, samples_per_input=1, reward_steps="all", policy_target="standard")
    tr = sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=0, sink=sink, on_step=on_step)
    sink.close()
    # step 0's reward image (x̂0 of the state its action led to) is computed by step 1 and handed
    # over before step 1 finished
    assert submitted_at[0] == 1
    assert len(submitted_at) == 4
    # the gathered scores belong to the right images, in step order
    expect = tr.reward_images.float().mean(dim=(2, 3, 4)) / 255.0
    torch.testing.assert_close(tr.rewards, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy_target", ["standard", "enhanced"])
def test_each_reward_image_is_what_its_action_led_to(tiny_policy, control, policy_target):
    """Paper §4.2.3: R(s_t, a_t) = r(x̂_{t−1}, c). The reward image of step k is x̂0 predicted from the
    sampled x_{t'} = latents[:, k+1] (the last step's: the output), so it depends on the action's
    noise; x̂0 predicted from x_t (what formed the action's own mean) would not."""
    K = 4
    s = SamplerSettings(num_inference_steps=K, samples_per_input=2, reward_steps="all", policy_target=policy_target)
    tr = sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=3)
    ctrl = images_to_tensor(tr.control_images, torch.device("cpu"))
    sched = tiny_policy.scheduler
    sched.set_timesteps(K)
    with torch.no_grad():
        for k in range(K - 1):
            nxt = policy_step(sched, lambda x, t: tiny_policy.predict(x, t, ctrl), tr.latents[:, k + 1],
                              int(tr.timesteps[k + 1]), s.eta, policy_target=policy_target,
                              variance_noise=torch.zeros_like(tr.latents[:, 0]))
            expect = tiny_policy.decode_latents(nxt.pred_original_sample)  # [B, 3, H, W] in [0, 1]
            got = tr.reward_images[:, k].permute(0, 3, 1, 2).float() / 255.0
            # uint8 rounding of the decoded image: at most half a level (+ float noise)
            assert (got - expect).abs().max() <= 0.5 / 255 + 1e-4, k
    assert torch.equal(tr.reward_images[:, K - 1], tr.final_images)


def test_infinite_scores_are_errors_and_nan_marks_an_unscorable_image(tiny_policy, control):
    """±inf is garbage from a broken scorer (an error); NaN is the reward model's "not a score"
    for that image: it reaches the trajectory, where the driver masks it (mask_unscorable)."""
    s = SamplerSettings(num_inference_steps=2, samples_per_input=1, reward_steps="last", policy_target="standard")
    sink = ThreadPoolSink(lambda images: np.full(len(images), np.inf))
    with pytest.raises(RewardError, match="infinite"):
        sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=0, sink=sink)
    sink = ThreadPoolSink(lambda images: np.array([0.5, np.nan][: len(images)]))
    traj = sample_trajectories(tiny_policy, control, [0, 1], s, policy_version=0, seed=0, sink=sink)
    assert traj.rewards[0, 0] == 0.5 and torch.isnan(traj.rewards[1, 0])


def test_bad_control_images_are_rejected(tiny_policy):
    s = SamplerSettings(num_inference_steps=2)
    with pytest.raises(ValueError, match=r"uint8 \[2, H, W, 3\]"):
        sample_trajectories(tiny_policy, np.zeros((2, RES, RES, 3), np.float32), [0, 1], s, policy_version=0, seed=0)
