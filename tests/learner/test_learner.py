"""The Learner on the tiny policy (DESIGN.md §2.4–§2.6): update direction, exact gradient
accumulation, skipped non-finite steps, resume reproducibility, and data parallel = one learner."""

from __future__ import annotations

import pytest
import torch

from common.config import AlgorithmConfig, LearnerConfig, ModelConfig
from common.diffusion import policy_step
from common.policy import images_to_tensor
from learner.learner import Learner, LearnerGroup, create_learners

MODEL = ModelConfig(kind="tiny")
#: Volatile metrics (wall time) left out when comparing two runs.
_TIMING = {"learner/step_seconds"}


def _learner(data_cfg, *, algo: dict | None = None, lc: dict | None = None, **kwargs) -> Learner:
    algorithm = AlgorithmConfig(**{"mode": "adaptive", "policy_target": "standard", "kl_coef": 0.01, **(algo or {})})
    learner_cfg = LearnerConfig(**{"lr": 1e-3, "micro_batch_size": 2, **(lc or {})})
    return Learner(MODEL, data_cfg, algorithm, learner_cfg, **kwargs)


@torch.no_grad()
def _log_probs(learner: Learner, traj) -> torch.Tensor:
    """log π_θ(recorded action | state) [B, K] under the learner's current weights."""
    sched = learner._scheduler(traj)
    control = images_to_tensor(traj.control_images, learner.device)
    out = []
    for k in range(traj.num_steps):
        step = policy_step(sched, lambda x, t: learner.policy.predict(x, t, control), traj.latents[:, k],
                           int(traj.timesteps[k]), traj.eta, policy_target=learner.algorithm.policy_target,
                           prev_sample=traj.latents[:, k + 1])
        out.append(step.log_prob)
    return torch.stack(out, dim=1)


def _metrics(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k not in _TIMING}


def _weights(learner: Learner) -> dict[str, torch.Tensor]:
    return learner.get_weights()[1]


# ------------------------------------------------------------------------------ direction
def test_update_raises_logprob_of_positive_advantage_and_lowers_negative(tiny_data_config, tiny_trajectory):
    # One input, G = 2 samples; rewards 1 and 0 at the (only) rewarded last step. min_count 8 >
    # 2 tracked rewards → batch statistics: μ = 0.5, σ = 0.5 → A = (+1, −1) (÷√(0.25 + 1e-6)).
    traj = tiny_trajectory([0], num_steps=2, reward_steps="last", rewards=[[1.0], [0.0]])
    learner = _learner(tiny_data_config, algo={"mode": "rl_only", "kl_coef": 0.0, "min_count": 8})
    before = _log_probs(learner, traj)
    # Before any update the recomputed log-prob is the sampled one (ratio 1, §2.1).
    torch.testing.assert_close(before, traj.log_probs, atol=1e-5, rtol=0)
    m = learner.update(traj)
    assert m["learner/skipped"] == 0 and learner.version == 1
    assert m["losses/approx_kl"] == pytest.approx(0.0, abs=1e-6)  # first epoch: ρ = 1
    delta = (_log_probs(learner, traj) - before).sum(dim=1)  # summed over the K trained steps
    assert delta[0] > 0, f"log-prob of the positive-advantage action fell: {delta.tolist()}"
    assert delta[1] < 0, f"log-prob of the negative-advantage action rose: {delta.tolist()}"


def test_iqa_reward_nan_is_a_clear_error(tiny_data_config, tiny_trajectory):
    traj = tiny_trajectory([0, 1])  # no reward sink: NaN placeholders
    learner = _learner(tiny_data_config)
    with pytest.raises(ValueError, match=r"non-finite.*input id 0.*reward service"):
        learner.update(traj)
    assert learner.version == 0


def test_reconstruction_reward_is_computed_by_the_learner(tiny_data_config, tiny_trajectory):
    traj = tiny_trajectory([0, 1])  # rewards NaN: not read with algorithm.reward=reconstruction
    learner = _learner(tiny_data_config, algo={"reward": "reconstruction"})
    m = learner.update(traj)
    assert -1.0 <= m["reward/mean"] < 0.0 and learner.version == 1


# ------------------------------------------------------------------------------ normalisation
def _capture_grads(learner: Learner) -> list[list[torch.Tensor]]:
    """Record the (all-reduced, clipped) gradients each optimizer step applies."""
    captured: list[list[torch.Tensor]] = []
    step = learner.optimizer.step

    def recording_step(*args, **kwargs):
        captured.append([p.grad.detach().clone() for p in learner.params])
        return step(*args, **kwargs)

    learner.optimizer.step = recording_step
    return captured


def test_micro_batching_equals_the_full_batch(tiny_data_config, tiny_trajectory):
    """4 micro-batches of 1 accumulate the full-batch gradient.

    Tolerance: every gradient element within 1e-4 × the largest one. Batch 1 and batch 4 run
    other fp32 conv kernels, and the RL gradient carries 1/σ_t² (σ ≈ 0.02–0.04 at K = 2), which
    amplifies that rounding to ~3e-5 of the largest element; a normalisation error would be O(1).
    Both runs take exactly one optimizer step. Adam's first step is lr·g/(|g| + eps): ≈ lr·sign(g),
    ill-conditioned only where |g| is near eps (1e-8), where a 1e-7 rounding difference in g moves
    the update by a large share of lr (seen in CI: 3 % of lr at one element). So the
    weights are compared (to 1e-5, lr 1e-3) where the step is well conditioned: |g| ≥ 1000·eps
    (update within 0.1 % of lr·sign(g)) or g exactly zero in both runs (LoRA A under a zero B).
    That is ~97 % of the tiny policy's weights; a step per micro-batch would move them by up to 4·lr.
    """
    traj = tiny_trajectory([0, 1], rewards=[[0.2, 0.9], [0.4, 0.1], [0.7, 0.3], [0.5, 0.5]])
    runs = {}
    for mb in (1, 4):
        learner = _learner(tiny_data_config, algo={"timestep_fraction": 0.5}, lc={"micro_batch_size": mb})
        grads = _capture_grads(learner)
        m = learner.update(traj)
        assert len(grads) == 1, f"micro_batch_size={mb} took {len(grads)} optimizer steps"
        runs[mb] = (m, grads[0], _weights(learner))
    (m1, g1, w1), (m4, g4, w4) = runs[1], runs[4]
    for key in ("losses/total", "losses/rl", "losses/sft", "losses/kl", "learner/grad_norm"):
        assert m1[key] == pytest.approx(m4[key], abs=1e-6), key
    assert m1["learner/grad_norm"] > 0
    scale = max(float(g.abs().max()) for g in g4)
    for a, b in zip(g1, g4):
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=0)
    # get_weights() and the learner's params list the same trainable tensors in the same order.
    assert [w.shape for w in w4.values()] == [g.shape for g in g4]
    grad4_of, grad1_of = dict(zip(w4, g4)), dict(zip(w1, g1))
    eps, checked = LearnerConfig().adam_eps, 0
    for name in w1:
        g, g_other = grad4_of[name], grad1_of[name]
        well_conditioned = (g.abs() >= 1000 * eps) | ((g == 0) & (g_other == 0))
        checked += int(well_conditioned.sum())
        torch.testing.assert_close(w1[name][well_conditioned], w4[name][well_conditioned], atol=1e-5, rtol=0)
    assert checked > 0.9 * sum(w.numel() for w in w1.values())


# ------------------------------------------------------------------------------ non-finite
def test_non_finite_loss_skips_the_step_and_counts_it(tiny_data_config, tiny_trajectory):
    traj = tiny_trajectory([0, 1], rewards=torch.rand(4, 2, generator=torch.Generator().manual_seed(1)))
    bad = tiny_trajectory([0, 1], rewards=traj.rewards)
    bad.log_probs[0, :] = float("nan")  # → NaN ratio → NaN loss in that micro-batch
    # The rollout's π_old is read (as for a stale batch): a recomputing learner would not see it.
    learner = _learner(tiny_data_config, lc={"recompute_old_log_prob": False})
    w0 = _weights(learner)
    m = learner.update(bad)
    assert m["learner/skipped"] == 1 and m["learner/skipped_total"] == 1
    assert learner.skipped_steps == 1 and learner.optimizer_steps == 0 and learner.version == 0
    assert all(torch.equal(w0[k], v) for k, v in _weights(learner).items()), "a skipped step changed weights"
    assert not learner.optimizer.state, "a skipped step touched the optimizer state"
    assert all(p.grad is None for p in learner.params), "gradients of the skipped step were left behind"
    m = learner.update(traj)  # the next good batch trains normally
    assert m["learner/skipped"] == 0 and learner.version == 1 and learner.skipped_steps == 1


# ------------------------------------------------------------------------------ SFT
def test_sft_update_trains_and_bumps_the_version(tiny_data_config):
    learner = _learner(tiny_data_config, algo={"mode": "sft"})
    w0 = _weights(learner)
    m = learner.sft_update([0, 1, 2])
    assert learner.version == 1 and m["losses/sft"] == pytest.approx(m["losses/sft_raw"])  # uniform weight
    assert any(not torch.equal(w0[k], v) for k, v in _weights(learner).items())
    with pytest.raises(ValueError, match="sft_update"):
        learner.update(None)  # mode sft has no rollout batch


# ------------------------------------------------------------------------------ resume
def test_resume_reproduces_losses_and_weights_exactly(tiny_data_config, tiny_trajectory, tmp_path):
    """2 updates, checkpoint, 2 more == load the checkpoint in a fresh learner, 2 more (CPU, bit-exact)."""
    gen = torch.Generator().manual_seed(3)
    batches = [
        tiny_trajectory(ids, policy_target="enhanced", rewards=torch.rand(4, 2, generator=gen))
        for ids in ([0, 1], [2, 3], [0, 1], [2, 3])
    ]
    opts = {"algo": {"policy_target": "enhanced", "timestep_fraction": 0.5, "min_count": 2}, "lc": {"micro_batch_size": 2}}
    a = _learner(tiny_data_config, **opts)
    for traj in batches[:2]:
        a.update(traj)
    path = a.save_checkpoint(tmp_path, iteration=2, keep=3)
    tail_a = [_metrics(a.update(traj)) for traj in batches[2:]]

    b = _learner(tiny_data_config, **opts)
    info = b.load_checkpoint(path)
    assert info["iteration"] == 2 and info["policy_version"] == 2 == b.version
    tail_b = [_metrics(b.update(traj)) for traj in batches[2:]]

    assert tail_a == tail_b  # every loss, norm and tracker figure identical
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.tracker.state_dict() == b.tracker.state_dict()
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


# ------------------------------------------------------------------------------ data parallel
@pytest.mark.slow
def test_two_learners_equal_one_on_the_concatenated_batch(ray_local, tiny_data_config, tiny_trajectory):
    """K = 2 Ray learner actors (gloo all-reduce) vs one in-process learner on the same batches.

    Tolerance (fp32): atol 1e-6 on every metric (losses, grad norm, tracker figures) and weight.
    Only the gradient summation order differs ((g0+g2)+(g1+g3) vs g0+g1+g2+g3; the actors also
    run 1 thread, this process 2). ``adam_eps=1`` makes AdamW's step ≈ lr·g, linear in the
    gradient, so the weights compare the all-reduced gradients themselves: with the default eps
    Adam's first steps are ≈ lr·sign(g) and magnify rounding on near-zero elements to ~3e-5.
    The two ranks are bit-identical to each other (they apply the same all-reduced gradient).
    """
    gen = torch.Generator().manual_seed(5)
    batches = [tiny_trajectory([0, 1], policy_target="enhanced", rewards=torch.rand(4, 2, generator=gen)),
               tiny_trajectory([2, 3], policy_target="enhanced", rewards=torch.rand(4, 2, generator=gen))]
    algo = AlgorithmConfig(mode="adaptive", policy_target="enhanced", kl_coef=0.01, timestep_fraction=0.5, min_count=2)
    lc = LearnerConfig(lr=0.1, adam_eps=1.0, micro_batch_size=1, num_learners=2, num_cpus_per_learner=1)
    single = Learner(MODEL, tiny_data_config, algo, lc.model_copy(update={"num_learners": 1}))
    group = LearnerGroup(create_learners(MODEL, tiny_data_config, algo, lc, timeout_s=120), timeout_s=300)
    try:
        for traj in batches:
            m1 = single.update(traj)
            m2 = group.update(traj)
            for key, value in _metrics(m1).items():
                assert m2[key] == pytest.approx(value, abs=1e-6), key
        w1 = _weights(single)
        (v0, w_r0), (v1, w_r1) = ray_local.get([a.get_weights.remote() for a in group.actors])
        assert v0 == v1 == single.version == 2
        for name in w1:
            assert torch.equal(w_r0[name], w_r1[name]), f"ranks diverged on {name}"
            torch.testing.assert_close(w_r0[name], w1[name], atol=1e-6, rtol=0)
        w0 = _weights(Learner(MODEL, tiny_data_config, algo, lc.model_copy(update={"num_learners": 1})))
        moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1)
        assert moved > 1e-3, f"weights barely moved ({moved}): the comparison would be vacuous"
    finally:
        for a in group.actors:
            ray_local.kill(a)


def test_increment_step_reward_feeds_the_tracker_what_each_step_added(tiny_data_config, tiny_trajectory):
    # r_{i,j} = c_i + d_{i,j}: a per-sample offset (as from the initial noise) that no action
    # controls. `increment` must train exactly as `absolute` on the increments would, and not as
    # `absolute` on r does.
    r = torch.tensor([[0.9, 0.8, 0.95], [0.1, 0.3, 0.2], [0.5, 0.45, 0.7], [0.4, 0.6, 0.5]])  # [B=4, R=3]
    traj = tiny_trajectory([0, 1], num_steps=3, reward_steps="all", rewards=r.tolist())
    inc = tiny_trajectory([0, 1], num_steps=3, reward_steps="all",
                          rewards=(r - torch.cat([torch.zeros(4, 1), r[:, :-1]], dim=1)).tolist())
    algo = {"mode": "rl_only", "kl_coef": 0.0}
    a = _learner(tiny_data_config, algo={**algo, "step_reward": "increment"})
    b = _learner(tiny_data_config, algo={**algo, "step_reward": "absolute"})
    c = _learner(tiny_data_config, algo={**algo, "step_reward": "absolute"})
    ma, mb, _ = a.update(traj), b.update(inc), c.update(traj)
    assert ma["reward/mean"] == pytest.approx(float(r.mean()))  # the raw reward is still reported
    for name, w in _weights(a).items():
        torch.testing.assert_close(w, _weights(b)[name], rtol=0, atol=0)
    assert any(not torch.equal(w, _weights(c)[name]) for name, w in _weights(a).items())


def test_advantage_settings_reach_the_tracker(tiny_data_config, tiny_trajectory):
    # algorithm.advantage_norm / adv_std / adv_std_floor configure the learner's tracker, and they
    # change the update: `batch` σ (one over every step) vs `group` σ (per input and step).
    r = torch.tensor([[0.9, 0.8, 0.95], [0.1, 0.3, 0.2], [0.5, 0.45, 0.7], [0.4, 0.6, 0.5]])  # [B=4, R=3]
    traj = tiny_trajectory([0, 1], num_steps=3, reward_steps="all", rewards=r.tolist())
    algo = {"mode": "rl_only", "kl_coef": 0.0, "advantage_norm": "track+whole_batch", "adv_std_floor": 0.01}
    a = _learner(tiny_data_config, algo={**algo, "adv_std": "batch"})
    b = _learner(tiny_data_config, algo={**algo, "adv_std": "group"})
    assert (a.tracker.advantage_norm, a.tracker.adv_std, a.tracker.std_floor) == ("track+whole_batch", "batch", 0.01)
    a.update(traj), b.update(traj)
    assert any(not torch.equal(w, _weights(b)[name]) for name, w in _weights(a).items())


# ------------------------------------------------------------------------------ numerics (bf16)
@pytest.mark.parametrize("recompute", [True, False], ids=["learner-pi-old", "rollout-pi-old"])
def test_bf16_learner_ratio_before_any_update_is_exactly_one_when_it_recomputes_pi_old(
        tiny_data_config, tiny_trajectory, recompute):
    """An fp32 rollout and a bf16-autocast learner disagree on log π by more than the paper's clip
    1e-4 (the issue measured 30 % of entries): PPO would drop those gradients before any update.
    With learner.recompute_old_log_prob the first pass's ratio is 1 to well within 1e-6 and
    nothing is clipped; the mismatch is still reported (learner/rollout_*)."""
    traj = tiny_trajectory([0, 1], num_steps=4, rewards=torch.rand(4, 4, generator=torch.Generator().manual_seed(1)))
    learner = _learner(tiny_data_config, algo={"mode": "rl_only", "kl_coef": 0.0, "clip_range": 1e-4},
                       lc={"precision": "bf16", "recompute_old_log_prob": recompute})
    m = learner.update(traj)
    if recompute:
        assert m["learner/recomputed_old_log_prob"] == 1.0
        assert m["losses/first_max_abs_log_ratio"] < 1e-6 and m["losses/clipfrac"] == 0.0
        assert m["losses/approx_kl"] == pytest.approx(0.0, abs=1e-12)
        # the rollout/learner mismatch exists and is measured, not hidden
        assert m["learner/rollout_log_ratio_max"] > 1e-4 and 0 < m["learner/rollout_clipfrac"] <= 1
    else:
        assert m["learner/recomputed_old_log_prob"] == 0.0
        assert m["losses/first_max_abs_log_ratio"] > 1e-4 and m["losses/clipfrac"] > 0.0
    print(f"recompute={recompute}: first-pass max |log ρ| {m['losses/first_max_abs_log_ratio']:.2e}, "
          f"clipfrac {m['losses/clipfrac']:.3f}")


def test_fp32_recomputed_pi_old_equals_the_rollouts_and_a_stale_batch_keeps_the_rollouts(
        tiny_data_config, tiny_trajectory):
    traj = tiny_trajectory([0, 1], rewards=[[0.2, 0.9], [0.4, 0.1], [0.7, 0.3], [0.5, 0.5]])
    learner = _learner(tiny_data_config)
    m = learner.update(traj)
    assert m["learner/recomputed_old_log_prob"] == 1.0 and m["learner/rollout_log_ratio_max"] < 1e-5
    stale = learner.update(traj)  # sampled by version 0, the learner now holds version 1
    assert stale["learner/recomputed_old_log_prob"] == 0.0 and "learner/rollout_clipfrac" not in stale
    assert stale["losses/first_max_abs_log_ratio"] > 0  # the weights moved: ρ ≠ 1, as PPO expects


def test_later_ppo_epochs_use_the_sampling_weights_pi_old(tiny_data_config, tiny_trajectory):
    """ppo_epochs=3, a step fraction of 1/2: later epochs train steps epoch 0 did not; their π_old
    is evaluated under the weights that sampled the batch. In fp32 that equals the rollout's
    recorded log-probs, so the update equals one that reads the rollout's π_old throughout."""
    traj = tiny_trajectory([0, 1], num_steps=4, rewards=torch.rand(4, 4, generator=torch.Generator().manual_seed(2)))
    runs = {}
    for recompute in (True, False):
        learner = _learner(tiny_data_config, algo={"timestep_fraction": 0.5},
                           lc={"ppo_epochs": 3, "recompute_old_log_prob": recompute})
        runs[recompute] = (learner.update(traj), _weights(learner))
    (m1, w1), (m0, w0) = runs[True], runs[False]
    for key in ("losses/total", "losses/rl", "losses/clipfrac", "losses/old_approx_kl"):
        assert m1[key] == pytest.approx(m0[key], abs=1e-6), key
    for name in w1:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ data path
def test_update_from_store_equals_update_on_the_concatenated_kept_batch(tiny_data_config, tiny_trajectory):
    """The chunks the workers leave in the object store (here passed in-process), reward images
    split off, the driver's keep mask applied: the same update as on the whole batch, selected."""
    from common.types import RolloutSummary, Trajectory

    a = tiny_trajectory([0, 1], rewards=[[0.2, 0.9], [0.4, 0.1], [0.7, 0.3], [0.5, 0.5]])
    b = tiny_trajectory([2], rewards=[[0.6, 0.2], [0.1, 0.8]])
    keep = [True, False, True, True, True, False]
    want = _learner(tiny_data_config).update(Trajectory.concat([a, b]).select(torch.tensor(keep)))
    parts = [a.split_reward_images()[0], b.split_reward_images()[0]]
    assert parts[0].reward_images.shape[1] == 0 and parts[0].validate() is parts[0]
    assert parts[0].nbytes < a.nbytes and RolloutSummary.of(a).trajectory_bytes == a.nbytes
    got = _learner(tiny_data_config).update_from_store(parts, keep)
    assert _metrics(got) == pytest.approx(_metrics(want), abs=1e-6)
    assert got["learner/batch_size"] == 4


def test_reconstruction_reward_needs_the_split_off_images(tiny_data_config, tiny_trajectory):
    traj = tiny_trajectory([0, 1])
    light, images = traj.split_reward_images()
    learner = _learner(tiny_data_config, algo={"reward": "reconstruction"})
    with pytest.raises(ValueError, match="needs the trajectory's reward images"):
        learner.update_from_store([light])
    want = _learner(tiny_data_config, algo={"reward": "reconstruction"}).update(traj)
    got = learner.update_from_store([light], None, [images])
    assert _metrics(got) == pytest.approx(_metrics(want), abs=1e-6)
