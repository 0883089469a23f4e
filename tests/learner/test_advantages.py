"""Reward statistics and advantages (DESIGN.md §2.4): hand-worked values, a plain reference loop
on random streams (both normalisations, min_count fallback, buffer eviction, clipping), checkpoint
round trips, bad input."""

import json
import math
import random
import statistics

import msgpack
import numpy as np
import pytest
import torch

from learner.advantages import RewardStatTracker, advantages_per_step, reward_increments

SQRT_EPS = 1e-6  # the ε under the square root of A = (r − μ)/√(σ² + ε)


def tracker(norm="track+batch", buffer_size=10, min_count=2, adv_clip=5.0):
    return RewardStatTracker(buffer_size, min_count, adv_clip, advantage_norm=norm)


# ------------------------------------------------------------------------------ hand-worked
def test_track_plus_batch_hand_worked():
    t = tracker("track+batch", min_count=2)
    ids = torch.tensor([0, 0, 1])
    # batch 1 (one reward column):
    #   input 0: history [1, 3] (2 ≥ min_count) → μ = 2, σ = 1 → A = ∓1/√(1 + 1e-6)
    #   input 1: history [5] (1 < min_count) → whole batch [1, 3, 5]: μ = 3, σ² = (4+0+4)/3 = 8/3
    #            → A = (5 − 3)/√(8/3 + 1e-6) ≈ 1.2247
    adv = t.update(ids, torch.tensor([[1.0], [3.0], [5.0]]))
    assert adv.dtype == torch.float32 and adv.shape == (3, 1)
    expected = [
        -1 / math.sqrt(1 + SQRT_EPS),
        1 / math.sqrt(1 + SQRT_EPS),
        2 / math.sqrt(8 / 3 + SQRT_EPS),
    ]
    assert adv[:, 0].tolist() == pytest.approx(expected, abs=1e-6)
    # batch 2: input 0 history [1, 3, 2] → μ = 2 → A = 0
    #          input 1 history [5, 5] → μ = 5, σ = 0 → A = 0/√1e-6 = 0 (finite)
    adv = t.update(torch.tensor([0, 1]), torch.tensor([[2.0], [5.0]]))
    assert adv[:, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_track_only_hand_worked():
    t = tracker("track", min_count=2)
    # batch 1: every history is empty before the batch → whole-batch stats μ = 3, σ² = 8/3
    #   → A = (r − 3)/√(8/3 + 1e-6) = [−1.2247, 0, 1.2247]
    adv = t.update(torch.tensor([0, 0, 1]), torch.tensor([[1.0], [3.0], [5.0]]))
    s = math.sqrt(8 / 3 + SQRT_EPS)
    assert adv[:, 0].tolist() == pytest.approx([-2 / s, 0.0, 2 / s], abs=1e-6)
    # batch 2: input 0 history before the batch [1, 3] → μ = 2, σ = 1 → A = (2 − 2)/1 = 0
    #          input 1 history [5] (1 < 2) → batch [2, 5]: μ = 3.5, σ = 1.5 → A = 1.5/√(2.25 + 1e-6)
    adv = t.update(torch.tensor([0, 1]), torch.tensor([[2.0], [5.0]]))
    assert adv[:, 0].tolist() == pytest.approx([0.0, 1.5 / math.sqrt(2.25 + SQRT_EPS)], abs=1e-6)


def test_statistics_are_per_step_index_and_clipped():
    t = tracker("track+batch", min_count=1, adv_clip=0.5)
    # step 0 rewards of input 7: [0, 1] → μ = 0.5, σ = 0.5 → A = ∓0.5/√(0.25 + 1e-6) ≈ ∓0.999998
    # step 4 rewards of input 7: [10, 30] → μ = 20, σ = 10 → A ≈ ∓1; both clipped to ±0.5
    adv = t.update(
        np.array([7, 7]), np.array([[0.0, 10.0], [1.0, 30.0]], np.float32), steps=np.array([0, 4])
    )
    assert adv.tolist() == [[-0.5, -0.5], [0.5, 0.5]]
    keys = [(uid, step) for uid, step, _ in t.state_dict()["history"]]
    assert keys == [(7, 0), (7, 4)]
    assert t.stats()["advantages/clip_frac"] == 1.0


def test_track_plus_whole_batch_hand_worked():
    t = tracker("track+whole_batch", min_count=2)
    # batch 1: histories empty → each input's pool is the whole batch [1, 3, 5]: μ = 3, σ² = 8/3
    #   → A = [−2, 0, 2]/√(8/3 + 1e-6); then history 0 ← [1, 3], history 1 ← [5]
    adv = t.update(torch.tensor([0, 0, 1]), torch.tensor([[1.0], [3.0], [5.0]]))
    s = math.sqrt(8 / 3 + SQRT_EPS)
    assert adv[:, 0].tolist() == pytest.approx([-2 / s, 0.0, 2 / s], abs=1e-6)
    # batch 2, rewards [2, 5] of inputs [0, 1]:
    #   input 0: pool [1, 3] ∪ [2, 5] → μ = 11/4 = 2.75, σ² = (1.75² + .25² + .75² + 2.25²)/4 = 2.1875
    #            → A = −0.75/√(2.1875 + 1e-6) ≈ −0.50709
    #   input 1: pool [5] ∪ [2, 5] → μ = 4, σ² = (1 + 4 + 1)/3 = 2 → A = 1/√(2 + 1e-6) ≈ 0.70711
    adv = t.update(torch.tensor([0, 1]), torch.tensor([[2.0], [5.0]]))
    assert adv[:, 0].tolist() == pytest.approx(
        [-0.75 / math.sqrt(2.1875 + SQRT_EPS), 1 / math.sqrt(2 + SQRT_EPS)], abs=1e-6
    )
    assert t.stats()["advantages/batch_stats_frac"] == 0.0  # the pool is never below min_count


def test_step_std_is_shared_across_inputs_hand_worked():
    # track+batch, min_count 2: μ_0 = mean[1, 3] = 2, μ_1 = mean[5, 9] = 7
    ids, rewards = torch.tensor([0, 0, 1, 1]), torch.tensor([[1.0], [3.0], [5.0], [9.0]])
    # group σ (today): σ_0 = 1, σ_1 = 2 → A = [−1, 1, −1, 1] (each input's spread scaled to 1)
    group = tracker("track+batch", min_count=2).update(ids, rewards)
    assert group[:, 0].tolist() == pytest.approx([-1, 1, -1, 1], abs=1e-5)
    # step σ: centred rewards [−1, 1, −2, 2] → one σ = √((1 + 1 + 4 + 4)/4) = √2.5 for both inputs
    #   → A = [−1, 1, −2, 2]/√(2.5 + 1e-6) ≈ [−0.63246, 0.63246, −1.26491, 1.26491]
    t = RewardStatTracker(10, 2, 5.0, advantage_norm="track+batch", adv_std="step")
    adv = t.update(ids, rewards)
    s = math.sqrt(2.5 + SQRT_EPS)
    assert adv[:, 0].tolist() == pytest.approx([-1 / s, 1 / s, -2 / s, 2 / s], abs=1e-6)


def test_batch_std_keeps_the_steps_relative_size_hand_worked():
    # track+batch, min_count 2, two steps. Step 0: rewards [1, 3, 5, 9] → centred [−1, 1, −2, 2];
    # step 1: rewards [0, 0.2, 1, 1.2] → μ = 0.1, 1.1 → centred [−0.1, 0.1, −0.1, 0.1].
    ids = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([[1.0, 0.0], [3.0, 0.2], [5.0, 1.0], [9.0, 1.2]])
    # batch σ: √((1 + 1 + 4 + 4 + 4·0.01)/8) = √1.255 for every entry
    #   → step 0: [−1, 1, −2, 2]/√1.255, step 1: ±0.1/√1.255 ≈ ±0.089265
    t = RewardStatTracker(10, 2, 5.0, adv_std="batch")
    adv = t.update(ids, rewards)
    s = math.sqrt(1.255 + SQRT_EPS)
    assert adv[:, 0].tolist() == pytest.approx([-1 / s, 1 / s, -2 / s, 2 / s], abs=1e-6)
    assert adv[:, 1].tolist() == pytest.approx([-0.1 / s, 0.1 / s, -0.1 / s, 0.1 / s], abs=1e-6)
    # step σ would scale step 1 up to unit size: ±0.1/√(0.01 + 1e-6) ≈ ±0.99995
    step = RewardStatTracker(10, 2, 5.0, adv_std="step").update(ids, rewards)
    assert step[:, 1].tolist() == pytest.approx([-0.99995, 0.99995, -0.99995, 0.99995], abs=1e-4)


def test_std_floor_keeps_near_equal_rewards_small_hand_worked():
    ids, rewards = torch.tensor([0, 0]), torch.tensor([[0.50], [0.51]], dtype=torch.float64)
    # μ = 0.505, σ = 0.005: without a floor A = ∓0.005/√(0.005² + 1e-6) ≈ ∓0.98058
    plain = tracker("track+batch", min_count=2).update(ids, rewards.float())
    assert plain[:, 0].tolist() == pytest.approx([-0.98058, 0.98058], abs=1e-4)
    # floor 0.1: σ → 0.1, A = ∓0.005/√(0.01 + 1e-6) ≈ ∓0.049998
    t = RewardStatTracker(10, 2, 5.0, std_floor=0.1)
    adv = t.update(ids, rewards.float())
    assert adv[:, 0].tolist() == pytest.approx([-0.049998, 0.049998], abs=1e-4)


def test_new_settings_are_validated():
    with pytest.raises(ValueError, match="adv_std"):
        RewardStatTracker(4, 2, 5.0, adv_std="input")
    with pytest.raises(ValueError, match="std_floor"):
        RewardStatTracker(4, 2, 5.0, std_floor=-0.1)


# ------------------------------------------------------------------------------ reference loop
def reference_update(history, ids, rewards, steps, norm, buffer_size, min_count, adv_clip,
                     adv_std="group", std_floor=0.0):
    """A plain, independent re-statement of §2.4 on Python lists (``history`` is mutated)."""
    B, R = len(ids), len(rewards[0])
    out = [[None] * R for _ in range(B)]
    for c in range(R):
        column = [rewards[i][c] for i in range(B)]
        batch_mean, batch_std = statistics.fmean(column), statistics.pstdev(column)
        mean, std = [None] * B, [None] * B
        for uid in sorted(set(ids)):
            rows = [i for i in range(B) if ids[i] == uid]
            before = history.get((uid, steps[c]), [])
            after = (before + [rewards[i][c] for i in rows])[-buffer_size:]
            source = {"track+batch": after, "track": before, "track+whole_batch": before + column}[norm]
            if len(source) >= min_count:
                m, s = statistics.fmean(source), statistics.pstdev(source)
            else:
                m, s = batch_mean, batch_std
            for i in rows:
                mean[i], std[i] = m, s
            history[(uid, steps[c])] = after
        if adv_std == "step":
            rms = math.sqrt(statistics.fmean((column[i] - mean[i]) ** 2 for i in range(B)))
            std = [rms] * B
        for i in range(B):
            out[i][c] = (column[i] - mean[i], std[i])  # (centred, σ) until every step is seen
    if adv_std == "batch":
        rms = math.sqrt(statistics.fmean(out[i][c][0] ** 2 for i in range(B) for c in range(R)))
        out = [[(d, rms) for d, _ in row] for row in out]
    return [[min(adv_clip, max(-adv_clip, d / math.sqrt(max(s, std_floor) ** 2 + 1e-6))) for d, s in row]
            for row in out]


def random_stream(seed, num_batches=12, inputs_per_batch=4, group=2, steps=(0, 2, 5)):
    """Batches of (ids [B], rewards float32 [B, R]) drawing 4 of 6 inputs, G = 2 samples each."""
    rng = random.Random(seed)
    for _ in range(num_batches):
        chosen = rng.sample(range(100, 106), inputs_per_batch)
        ids = [uid for uid in chosen for _ in range(group)]
        scale = [rng.uniform(0.2, 2.0) for _ in ids]  # spread rewards so clipping happens
        rewards = np.array(
            [[rng.gauss(0.5 * k, s) for k in range(len(steps))] for s in scale], dtype=np.float32
        )
        yield np.array(ids, dtype=np.int64), rewards


@pytest.mark.parametrize(
    "norm,adv_std,std_floor",
    [("track+batch", "group", 0.0), ("track", "group", 0.0), ("track+whole_batch", "group", 0.0),
     ("track+batch", "step", 0.0), ("track+whole_batch", "step", 0.0), ("track+batch", "batch", 0.0),
     ("track+batch", "group", 0.7)],
)
def test_matches_reference_loop_on_random_stream(norm, adv_std, std_floor):
    buffer_size, min_count, adv_clip, steps = 5, 3, 1.5, [0, 2, 5]
    t = RewardStatTracker(buffer_size, min_count, adv_clip, advantage_norm=norm, adv_std=adv_std,
                          std_floor=std_floor)
    history: dict = {}
    fallback = clipped = 0
    for ids, rewards in random_stream(seed=1 if norm == "track" else 2, steps=steps):
        adv = t.update(torch.from_numpy(ids), torch.from_numpy(rewards), steps=torch.tensor(steps))
        want = reference_update(
            history,
            ids.tolist(),
            rewards.astype(np.float64).tolist(),
            steps,
            norm,
            buffer_size,
            min_count,
            adv_clip,
            adv_std,
            std_floor,
        )
        np.testing.assert_allclose(adv.numpy(), np.array(want), rtol=1e-5, atol=1e-5)
        fallback += t.stats()["advantages/batch_stats_frac"] > 0
        clipped += t.stats()["advantages/clip_frac"] > 0
        state = {(uid, step): values for uid, step, values in t.state_dict()["history"]}
        assert state == history
    # The stream exercised what it is meant to: fallback (not reachable when the whole batch is
    # pooled in), clipping and eviction.
    assert (fallback > 0) == (norm != "track+whole_batch") and clipped > 0
    assert max(len(v) for v in history.values()) == buffer_size


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("codec", ["json", "msgpack"])
@pytest.mark.parametrize("norm", ["track+batch", "track", "track+whole_batch"])
def test_state_dict_round_trip_continues_identically(codec, norm):
    stream = list(random_stream(seed=3, num_batches=8))
    a = RewardStatTracker(4, 2, 5.0, advantage_norm=norm)
    for ids, rewards in stream[:4]:
        a.update(ids, rewards)
    state = a.state_dict()
    blob = json.dumps(state) if codec == "json" else msgpack.packb(state)
    b = RewardStatTracker(4, 2, 5.0, advantage_norm=norm)
    b.load_state_dict(json.loads(blob) if codec == "json" else msgpack.unpackb(blob))
    assert b.state_dict() == state
    for ids, rewards in stream[4:]:
        assert torch.equal(a.update(ids, rewards), b.update(ids, rewards))


def test_load_state_dict_keeps_own_buffer_size_and_rejects_garbage():
    a = tracker(buffer_size=6)
    a.update(np.zeros(6, np.int64), np.arange(6, dtype=np.float32)[:, None])
    small = tracker(buffer_size=2)
    small.load_state_dict(a.state_dict())
    assert small.state_dict()["history"] == [[0, 0, [4.0, 5.0]]]  # the newest two
    with pytest.raises(ValueError, match="format"):
        small.load_state_dict({"history": []})
    bad = a.state_dict() | {"history": [[0, 0, "x"]]}
    with pytest.raises(ValueError, match=r"history\[0\]"):
        small.load_state_dict(bad)


# ------------------------------------------------------------------------------ bad input
def test_nan_reward_is_an_error_and_leaves_the_history_untouched():
    t = tracker()
    t.update(np.array([0, 1]), np.array([[0.1, 0.2], [0.3, 0.4]], np.float32))
    before = t.state_dict()
    with pytest.raises(ValueError, match=r"non-finite.*rewards\[1, 0\].*input id 1"):
        t.update(np.array([0, 1]), np.array([[0.1, 0.2], [np.nan, 0.4]], np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        t.update(np.array([0]), np.array([[np.inf, 0.2]], np.float32))
    assert t.state_dict() == before


def test_shape_and_dtype_errors_name_the_argument():
    t = tracker()
    with pytest.raises(ValueError, match="rewards"):
        t.update(np.array([0, 1]), np.zeros(2, np.float32))  # not [B, R]
    with pytest.raises(ValueError, match="rewards"):
        t.update(np.array([0, 1]), np.zeros((3, 1), np.float32))  # B mismatch
    with pytest.raises(ValueError, match="input_ids"):
        t.update(np.array([0.0, 1.0]), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="steps"):
        t.update(np.array([0, 1]), np.zeros((2, 2), np.float32), steps=np.array([3, 3]))
    with pytest.raises(ValueError, match="advantage_norm"):
        RewardStatTracker(4, 2, 5.0, advantage_norm="batch")


# ------------------------------------------------------------------------------ per step
def test_advantages_per_step_take_the_next_rewarded_step():
    adv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # [B=2, R=2]
    # reward steps 1 and 3 of K = 4: steps 0, 1 → column 0; steps 2, 3 → column 1
    out = advantages_per_step(adv, torch.tensor([1, 3]), 4)
    assert out.tolist() == [[1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0]]
    # "last" (Reward x0): every step gets the final output's advantage
    assert advantages_per_step(adv[:, 1:], torch.tensor([3]), 4).tolist() == [[2.0] * 4, [4.0] * 4]
    # "all": identity
    assert torch.equal(advantages_per_step(adv, torch.tensor([0, 1]), 2), adv)
    with pytest.raises(ValueError, match="last step"):
        advantages_per_step(adv, torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="increasing"):
        advantages_per_step(adv, torch.tensor([1, 1]), 2)


def test_reward_increments_hand_worked():
    r = torch.tensor([[0.5, 0.75, 0.5], [0.25, 0.25, 1.0]])  # [B=2, R=3], rewarded steps in order
    out = reward_increments(r)
    assert out.tolist() == [[0.5, 0.25, -0.25], [0.25, 0.0, 0.75]]
    torch.testing.assert_close(out.sum(dim=1), r[:, -1])  # they telescope to the last reward
    assert torch.equal(reward_increments(r[:, 2:]), r[:, 2:])  # "last": identity
    assert r.tolist()[0] == [0.5, 0.75, 0.5]  # the input is not modified
    with pytest.raises(ValueError, match=r"\[B, R\]"):
        reward_increments(r[0])
