"""Tests of the scoring core: the math by hand, presets, the tiny VLM, and the three backends.

The vLLM tests (``slow``) share one engine; the cross-engine test is the contract that the vLLM
path computes the same reward as the transformers reference on the same weights and images.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from common.types import LEVEL_NAMES, ShapeError
from reward_server.presets import PRESETS, PresetError, ScorerPreset, expand2square, get_preset
from reward_server.scoring import (
    PyIQAScorer,
    ScoreBatch,
    Scorer,
    ScoringError,
    build_scorer,
    check_images,
    expected_score,
    metric_to_unit,
    parse_number_answer,
)
from reward_server.tiny_vlm import TINY_VLM_STAMP, build_tiny_llava

Q_ALIGN_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)


# ------------------------------------------------------------------------------- expected_score
def test_expected_score_hand_worked():
    # probs p = [1/2, 1/4, 1/8, 1/16, 1/16] over (excellent, good, fair, poor, bad)
    # native = 5·1/2 + 4·1/4 + 3·1/8 + 2·1/16 + 1·1/16 = 2.5 + 1 + 0.375 + 0.125 + 0.0625 = 4.0625
    # score  = (4.0625 − 1) / (5 − 1) = 3.0625 / 4 = 0.765625
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    # Row 2: the same distribution as logits shifted by −7.3 (only the 5-way softmax counts).
    # Row 3: uniform -> native 3 -> score 0.5. Row 4: all mass on "bad" -> native 1 -> score 0.
    logprobs = np.stack(
        [np.log(probs), np.log(probs) - 7.3, np.zeros(5), [-1e4, -1e4, -1e4, -1e4, 0.0]]
    )
    scores, p = expected_score(logprobs, Q_ALIGN_WEIGHTS, (1.0, 5.0))
    np.testing.assert_allclose(scores, [0.765625, 0.765625, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(p[0], probs, atol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)


def test_expected_score_other_range():
    # Q-SiT reports Σ p·(1, .75, .5, .25, 0) directly: weights on the range (0, 1) map to themselves.
    scores, _ = expected_score(
        np.log([[0.5, 0.5, 1e-30, 1e-30, 1e-30]]), (1, 0.75, 0.5, 0.25, 0), (0.0, 1.0)
    )
    np.testing.assert_allclose(scores, [0.875], atol=1e-9)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_expected_score_non_finite_is_an_error(bad):
    logprobs = np.log(np.full((3, 5), 0.2))
    logprobs[1, 2] = bad
    with pytest.raises(ScoringError, match=r"image\(s\) \[1\]"):
        expected_score(logprobs, Q_ALIGN_WEIGHTS, (1.0, 5.0))


def test_expected_score_shape_and_weight_errors():
    with pytest.raises(ShapeError):
        expected_score(np.zeros((2, 4)), Q_ALIGN_WEIGHTS, (1.0, 5.0))
    with pytest.raises(ValueError, match="native_range"):
        expected_score(np.zeros((2, 5)), (6, 4, 3, 2, 1), (1.0, 5.0))


# ------------------------------------------------------------------------------- text_number
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>Sharp, well exposed, slight noise.</think> <answer>3.75</answer>", 3.75),
        ("<think>I see 2 faces and 3 trees</think><answer> 4 </answer>", 4.0),
        ("<answer>1</answer>", 1.0),
        ("<answer>5.00</answer>", 5.0),
        ("<answer>first 2.5</answer> then <answer>4.25</answer>", 4.25),  # last answer counts
        ("The score is 2.5.", 2.5),  # no tags: the plain answer
        ("<think>maybe 1 or 2?</think> 3.1", 3.1),  # reasoning numbers do not count
        (".5 is not it, 4", None),  # ".5" parses but lies outside [1, 5] -> error below
    ],
)
def test_parse_number_answer(text, expected):
    if expected is None:
        with pytest.raises(ScoringError, match="outside"):
            parse_number_answer(text, (1.0, 5.0))
    else:
        assert parse_number_answer(text, (1.0, 5.0)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "no number"),
        ("<answer>good</answer>", "no number"),
        ("<answer>7</answer>", "outside"),
        ("<answer>-1</answer>", "outside"),
        ("<think>long reasoning 3 ...", "never closed"),  # cut off while thinking
        ("<think>ok</think><answer>3.", "never closed"),  # cut off inside the answer
        ("<answer>nan</answer>", "no number"),
    ],
)
def test_parse_number_answer_failures(text, match):
    with pytest.raises(ScoringError, match=match):
        parse_number_answer(text, (1.0, 5.0))


# ------------------------------------------------------------------------------- metric_to_unit
def test_metric_to_unit_lower_and_higher_better():
    # piqe: 0..100, lower better -> 1 − v/100, clipped
    np.testing.assert_allclose(
        metric_to_unit([0.0, 20.0, 100.0, 150.0], (0, 100), True), [1.0, 0.8, 0.0, 0.0]
    )
    np.testing.assert_allclose(metric_to_unit([0.25, 1.2], (0, 1), False), [0.25, 1.0])
    with pytest.raises(ScoringError):
        metric_to_unit([math.nan], (0, 100), True)


# ------------------------------------------------------------------------------- inputs/outputs
def test_check_images_names_the_bad_image():
    good = np.zeros((4, 5, 3), np.uint8)
    assert len(check_images([good, good])) == 2
    with pytest.raises(ShapeError, match=r"images\[1\].*uint8"):
        check_images([good, good.astype(np.float32)])
    with pytest.raises(ShapeError, match=r"images\[0\].*\[H, W, 3\]"):
        check_images([np.zeros((4, 5), np.uint8)])


def test_score_batch_rejects_out_of_range():
    with pytest.raises(ScoringError):
        ScoreBatch(scores=np.array([0.2, 1.5]))
    with pytest.raises(ShapeError):
        ScoreBatch(scores=np.array([0.2]), levels=np.ones((1, 4)))


# ------------------------------------------------------------------------------- presets
def test_presets_are_well_formed():
    assert set(PRESETS) == {"llava", "llava_onevision", "qwen2_vl", "qwen3_5", "text_number"}
    for p in PRESETS.values():
        prompt = p.build_prompt()
        assert prompt.count(p.image_placeholder) == 1, p.name
        if p.mode == "levels":
            assert prompt.endswith(p.answer_prefix) and p.answer_prefix
    assert (
        PRESETS["qwen2_vl"]
        .build_prompt()
        .startswith("<|im_start|>system\nYou are a helpful assistant.")
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>" in PRESETS["text_number"].build_prompt()
    with pytest.raises(PresetError, match="unknown scorer preset 'deqa'"):
        get_preset("deqa")
    with pytest.raises(PresetError, match="native_range"):
        replace(PRESETS["llava"], level_weights=(9, 4, 3, 2, 1))


def test_llava_prompt_matches_the_chat_template(tiny_vlm_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    preset = PRESETS["llava"]
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": preset.question}]}
    ]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered + " " + preset.answer_prefix == preset.build_prompt()


def test_level_token_ids_single_tokens(tiny_vlm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    ids = PRESETS["llava"].level_token_ids(tok)
    assert len(set(ids)) == 5
    assert tok.convert_ids_to_tokens(ids) == ["▁" + w for w in LEVEL_NAMES]  # SentencePiece-style
    assert (
        tok.convert_ids_to_tokens(PRESETS["llava_onevision"].level_token_ids(tok))[0]
        == "▁Excellent"
    )


def test_level_token_lookup_errors(tiny_vlm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    superb = replace(PRESETS["llava"], level_words=("superb", "good", "fair", "poor", "bad"))
    with pytest.raises(
        PresetError, match=r"level word 'superb' must be exactly one known token.*got \d+ token"
    ):
        superb.level_token_ids(tok)
    doubled = replace(PRESETS["llava"], level_words=("good", "good", "fair", "poor", "bad"))
    with pytest.raises(PresetError, match="share token ids"):
        doubled.level_token_ids(tok)
    with pytest.raises(PresetError, match="no level tokens"):
        PRESETS["text_number"].level_token_ids(tok)


def test_expand2square_pads_with_the_mean_colour():
    from PIL import Image

    img = Image.fromarray(np.full((2, 6, 3), 255, np.uint8))  # H=2, W=6
    sq = np.asarray(expand2square(img, (10, 20, 30)))
    assert sq.shape == (6, 6, 3)
    assert (sq[2:4] == 255).all()  # centred: rows (6 − 2) // 2 = 2 .. 3
    assert (sq[:2] == [10, 20, 30]).all() and (sq[4:] == [10, 20, 30]).all()
    out = PRESETS["llava"].preprocess(np.zeros((2, 6, 3), np.uint8), background=(1, 2, 3))
    assert out.size == (6, 6)


# ------------------------------------------------------------------------------- tiny VLM
def test_tiny_vlm_folder_is_cached_and_loads(tiny_vlm_dir, tmp_path):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    stamp = json.loads((tiny_vlm_dir / TINY_VLM_STAMP).read_text())
    assert stamp["seed"] == 0
    weights = tiny_vlm_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny_llava(tiny_vlm_dir, seed=0) == tiny_vlm_dir
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt

    with safe_open(str(weights), "pt") as f:  # the hub layout vLLM expects
        vision = [k for k in f.keys() if k.startswith("vision_tower.")]  # noqa: SIM118
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    _, info = LlavaForConditionalGeneration.from_pretrained(tiny_vlm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    foreign = tmp_path / "not-a-model"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        build_tiny_llava(foreign)


def test_tiny_vlm_seed_changes_weights(tiny_vlm_dir, tmp_path):
    from safetensors.torch import load_file

    other = build_tiny_llava(tmp_path / "seed1", seed=1)
    a = load_file(str(tiny_vlm_dir / "model.safetensors"))
    b = load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not np.allclose(
        a["language_model.lm_head.weight"].numpy(), b["language_model.lm_head.weight"].numpy()
    )
    assert (other / "tokenizer.json").read_text() == (tiny_vlm_dir / "tokenizer.json").read_text()


# ------------------------------------------------------------------------------- transformers
def test_transformers_scorer(hf_scorer, photos):
    assert isinstance(hf_scorer, Scorer)
    batch = hf_scorer.score(photos)
    assert batch.scores.shape == (len(photos),) and batch.levels.shape == (len(photos), 5)
    assert ((batch.scores >= 0) & (batch.scores <= 1)).all()
    np.testing.assert_allclose(batch.levels.sum(axis=1), 1.0, atol=1e-9)
    # Non-degenerate: the images get different scores and no level takes all the mass, so the
    # cross-engine comparison below tests something.
    assert np.ptp(batch.scores) > 0.1, batch.scores
    assert batch.levels.max() < 0.99, batch.levels
    # Batching is exact: same-size images share a forward, others do not.
    single = np.concatenate([hf_scorer.score([p]).scores for p in photos])
    np.testing.assert_allclose(single, batch.scores, atol=1e-6)
    assert hf_scorer.score([]).scores.shape == (0,)


# ------------------------------------------------------------------------------- pyiqa
def test_pyiqa_piqe_prefers_the_clean_photo(photos):
    scorer = build_scorer("pyiqa", pyiqa_metric="piqe")
    assert isinstance(scorer, PyIQAScorer) and isinstance(scorer, Scorer)
    assert scorer.lower_better and scorer.score_range == (0.0, 100.0)
    rng = np.random.default_rng(0)
    clean = photos[4]  # rocket, 80 x 120
    noisy = np.clip(clean.astype(np.float64) + rng.normal(0, 60, clean.shape), 0, 255).astype(
        np.uint8
    )
    raw = scorer.raw_scores([clean, noisy])
    batch = scorer.score([clean, noisy])
    np.testing.assert_allclose(batch.scores, np.clip(1 - raw / 100, 0, 1), atol=1e-12)
    assert batch.levels is None
    assert batch.scores[0] > batch.scores[1], (raw, batch.scores)


def test_build_scorer_errors(tmp_path):
    with pytest.raises(ValueError, match="backend 'onnx'"):
        build_scorer("onnx", tmp_path)
    with pytest.raises(ValueError, match="needs model_path"):
        build_scorer("transformers")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_scorer("transformers", tmp_path)
    with pytest.raises(ValueError, match="no-reference"):
        build_scorer("pyiqa", pyiqa_metric="psnr")
    with pytest.raises(ValueError, match="not a pyiqa metric"):
        build_scorer("pyiqa", pyiqa_metric="nope")
    with pytest.raises(FileNotFoundError, match="pyiqa_weights"):
        build_scorer("pyiqa", pyiqa_metric="piqe", pyiqa_weights=tmp_path / "missing.pth")


# ------------------------------------------------------------------------------- vLLM (slow)
@pytest.mark.slow
def test_vllm_scores_and_vocabulary_logprobs(vllm_scorer, hf_scorer, photos):
    assert isinstance(vllm_scorer, Scorer)
    print(f"\nvLLM engine start: {vllm_scorer.startup_s:.1f} s")
    logprobs = vllm_scorer.level_logprobs(photos)
    # logprob_token_ids: log-softmax over the whole vocabulary, the reference's numbers (not
    # renormalised over the five levels: the random model puts only part of its mass on them).
    mass = np.exp(logprobs).sum(axis=1)
    assert ((mass > 0) & (mass < 1)).all(), mass
    np.testing.assert_allclose(logprobs, hf_scorer.level_logprobs(photos), atol=1e-4)
    batch = vllm_scorer.score(photos)
    assert ((batch.scores >= 0) & (batch.scores <= 1)).all()
    np.testing.assert_allclose(batch.levels.sum(axis=1), 1.0, atol=1e-9)
    assert vllm_scorer.score([]).scores.shape == (0,)


@pytest.mark.slow
def test_vllm_equals_transformers(vllm_scorer, hf_scorer, photos):
    """Cross-engine equivalence: same folder, same images, same reward within 1e-3."""
    v = vllm_scorer.score(photos)
    h = hf_scorer.score(photos)
    diff = np.abs(v.scores - h.scores).max()
    print(
        f"\nvLLM scores  {np.round(v.scores, 5).tolist()}\nHF scores    {np.round(h.scores, 5).tolist()}"
        f"\nmax |diff| = {diff:.2e}"
    )
    assert np.ptp(h.scores) > 0.1  # the images really score differently
    np.testing.assert_allclose(v.scores, h.scores, atol=1e-3)
    np.testing.assert_allclose(v.levels, h.levels, atol=1e-3)
    # One batched generate equals one request per image (continuous batching changes nothing).
    single = np.concatenate([vllm_scorer.score([p]).scores for p in photos[:2]])
    np.testing.assert_allclose(single, v.scores[:2], atol=1e-5)


@pytest.mark.slow
def test_vllm_text_number_mode_shares_the_engine(vllm_scorer, hf_scorer, tiny_vlm_dir, photos):
    """A text_number preset on the same engine: greedy text agrees across engines, and the tiny
    random model's answer either parses or raises ScoringError — never a made-up score."""
    from reward_server.scoring import TransformersScorer, VLLMScorer

    preset = ScorerPreset(
        name="tiny_text_number",
        family="tiny LLaVA, number answer",
        template="USER: {image}\n{question} ASSISTANT:{answer_prefix}",
        image_placeholder="<image>",
        question="Rate the quality of this image from 1 to 5.",
        mode="text_number",
        max_new_tokens=6,
        pad_to_square=True,
    )
    v = VLLMScorer(tiny_vlm_dir, preset, engine=vllm_scorer.llm)
    h = TransformersScorer(tiny_vlm_dir, preset)
    texts = v.generate_text(photos[:3])
    # Same greedy tokens; the detokenizers differ only in the leading "▁" -> " " of the answer.
    assert [t.strip() for t in texts] == [t.strip() for t in h.generate_text(photos[:3])]
    for text, image in zip(texts, photos[:3]):
        try:
            value = parse_number_answer(text, (1.0, 5.0))
        except ScoringError:
            with pytest.raises(ScoringError):
                v.score([image])
        else:
            assert v.score([image]).scores[0] == pytest.approx((value - 1) / 4)
