"""IQA model training: the level loss by hand, and a short fine-tune that must learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reward_server.iqa_train import (
    IQATrainSettings,
    correlations,
    fidelity_loss,
    fine_tune_iqa_model,
    held_out_report,
    level_loss,
)


def test_level_loss_hand_worked():
    # Uniform logits: -sum t log(1/5) = log 5 for any target distribution.
    t = torch.tensor([[0.0, 0.25, 0.75, 0.0, 0.0], [1.0, 0, 0, 0, 0]])
    assert float(level_loss(torch.zeros(2, 5), t)) == pytest.approx(math.log(5))
    # logits = log p: loss = -sum t log p (the softmax over the five levels only).
    p = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]])
    expect = -(0.25 * math.log(0.2) + 0.75 * math.log(0.4))
    assert float(level_loss(torch.log(p) + 7.0, t[:1])) == pytest.approx(expect, rel=1e-6)  # offset cancels


def test_fidelity_loss_hand_worked():
    same = torch.zeros(2, 5)  # equal predictions: P̂ = 0.5 for both orders
    assert float(fidelity_loss(same, torch.tensor([3.0, 3.0]))) == pytest.approx(0.0, abs=1e-4)
    # labels 4 levels apart: target P ≈ 1 (and 0 for the reversed pair): loss 1 − √0.5 per pair
    # (abs 3e-4: the loss adds 1e-8 under each square root, √1e-8 = 1e-4)
    assert float(fidelity_loss(same, torch.tensor([5.0, 1.0]))) == pytest.approx(1 - math.sqrt(0.5), abs=3e-4)
    # confident and right: first image all "excellent", second all "bad" -> loss ~ 0
    right = torch.tensor([[20.0, 0, 0, 0, 0], [0, 0, 0, 0, 20.0]])
    assert float(fidelity_loss(right, torch.tensor([5.0, 1.0]))) < 1e-3
    assert float(fidelity_loss(right, torch.tensor([1.0, 5.0]))) > 0.9  # confident and wrong


def test_correlations_and_report():
    x = np.array([0.1, 0.4, 0.2, 0.9])
    srcc, plcc = correlations(x, x**2)  # monotone: SRCC 1, PLCC < 1
    assert srcc == pytest.approx(1.0) and 0.9 < plcc < 1.0
    assert all(math.isnan(v) for v in correlations(np.ones(4), x))  # a constant predictor has no correlation

    from reward_server.iqa_data import IQAExamples

    ex = IQAExamples(np.zeros((4, 8, 8, 3), np.uint8), x, ["gt", "lq", "restored", "restored"], ["a"] * 4)
    r = held_out_report(np.array([0.9, 0.1, 0.3, 0.8]), ex)
    assert r["mean_score"] == {"gt": 0.9, "lq": 0.1, "restored": 0.55} and r["n"] == 4


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from reward_server.tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny", seed=0, size="test")


def test_a_short_fine_tune_learns_to_rank_quality(tiny_vlm):
    """120 steps on 2 photos: the training images' scores go from unrelated to the label to
    ranked by it (the full recipe's held-out numbers are on the model card)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from reward_server.iqa_data import build_iqa_examples
    from reward_server.iqa_train import _LevelReader
    from reward_server.presets import get_preset
    from reward_server.scoring import _pad_background

    ex = build_iqa_examples(["coffee", "astronaut"], resolution=64, crops_per_photo=6, seed=0, degraded_per_crop=3)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    preset = get_preset("llava")
    reader = _LevelReader(model, processor, preset, _pad_background(tiny_vlm, preset))
    before = correlations(reader.scores(ex.images), ex.quality)[0]
    out = fine_tune_iqa_model(model, processor, preset, ex, IQATrainSettings(steps=120, batch_size=16),
                              background=reader.background, log_every=0)
    after = correlations(reader.scores(ex.images), ex.quality)[0]
    assert out["loss_last"] < 0.8 * out["loss_first"]
    assert after > 0.8 and after > before + 0.3, (before, after)


def test_best_step_is_the_earliest_maximum_and_skips_nan():
    from reward_server.iqa_train import best_step

    curve = [{"step": 50, "validation_srcc": 0.4}, {"step": 100, "validation_srcc": 0.7},
             {"step": 150, "validation_srcc": float("nan")}, {"step": 200, "validation_srcc": 0.7},
             {"step": 250, "validation_srcc": 0.6}]
    assert best_step(curve) == 100
    assert best_step(curve[:1]) == 50
    assert best_step([{"step": 10, "validation_srcc": float("nan")}]) is None
    assert best_step([]) is None


def test_validation_selection_returns_the_weights_of_the_best_validation_step(tiny_vlm):
    """With a validation set, the model handed back is the one of the step with the best
    validation SRCC (rescored here), not the last step's; the held-out set plays no part."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from reward_server.iqa_data import build_iqa_examples
    from reward_server.iqa_train import _LevelReader, best_step
    from reward_server.presets import get_preset
    from reward_server.scoring import _pad_background

    train = build_iqa_examples(["coffee"], resolution=32, crops_per_photo=4, seed=0, degraded_per_crop=3)
    val = build_iqa_examples(["astronaut"], resolution=32, crops_per_photo=3, seed=1, degraded_per_crop=3)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    preset = get_preset("llava")
    reader = _LevelReader(model, processor, preset, _pad_background(tiny_vlm, preset))
    settings = IQATrainSettings(steps=30, batch_size=8, select_every=6)
    last: list[float] = []

    def on_step(step, loss):  # the validation SRCC of the last step's weights
        if step + 1 == settings.steps:
            last.append(correlations(reader.scores(val.images), val.quality)[0])

    out = fine_tune_iqa_model(model, processor, preset, train, settings, validation=val,
                              background=reader.background, log_every=0, on_step=on_step)
    curve = out["validation_curve"]
    assert [e["step"] for e in curve] == [6, 12, 18, 24, 30]
    assert out["selected_step"] == best_step(curve)
    returned = correlations(reader.scores(val.images), val.quality)[0]
    best = max(e["validation_srcc"] for e in curve)
    assert returned == pytest.approx(best, abs=1e-3)
    assert returned >= last[0] - 1e-3
    if out["selected_step"] != settings.steps:  # (seen: step 18 of 30) the last weights were not kept
        assert abs(returned - last[0]) > 1e-3
    # without select_every there is no selection: the last step's weights, no validation curve
    plain = fine_tune_iqa_model(model, processor, preset, train, IQATrainSettings(steps=2, batch_size=8),
                                validation=val, background=reader.background, log_every=0)
    assert "selected_step" not in plain


def test_restored_repeat_shows_each_restored_image_k_times_per_epoch():
    from reward_server.iqa_data import IQAExamples
    from reward_server.iqa_train import _batch_order

    kinds = ["gt", "restored", "lq", "restored", "degraded"]
    ex = IQAExamples(np.zeros((5, 4, 4, 3), np.uint8), np.linspace(0, 1, 5), kinds, ["a"] * 5)
    order = _batch_order(ex, np.random.default_rng(0), grouped=False, restored_repeat=3)
    assert sorted(np.bincount(order, minlength=5).tolist()) == [1, 1, 1, 3, 3]
    assert np.bincount(order, minlength=5)[[1, 3]].tolist() == [3, 3]
    # repeat 1 is the plain permutation (the recipe before the option existed)
    np.testing.assert_array_equal(_batch_order(ex, np.random.default_rng(0), grouped=False),
                                  np.random.default_rng(0).permutation(5))
