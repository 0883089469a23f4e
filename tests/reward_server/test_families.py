"""Each IQA preset on a tiny random model of its real architecture, through vLLM and transformers.

The LLaVA preset is tested in test_scoring.py on the tiny LLaVA. Here each other family gets a
tiny seeded model of exactly its architecture (:func:`reward_server.tiny_families.
build_tiny_family`), saved in hub layout, and the same photos are scored by both engines:

* ``qwen2_vl`` on Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``; VisualQuality-R1 and
  Q-Insight's architecture), float32: levels and scores equal within 1e-4; and ``text_number``
  (VisualQuality-R1's prompt) on the same engine: equal greedy text, and an answer without a
  number raises ScoringError;
* ``llava_onevision`` on LLaVA-OneVision (Q-SiT's architecture), float32, within 1e-4;
* ``qwen3_5`` on Qwen3.5-VL (Q-ReAlign's architecture). vLLM's CPU Gated DeltaNet kernel runs only
  in bfloat16 ("CPU GDN attention requires BF16"), so both engines run bfloat16 and agree within
  bfloat16's rounding (tolerances below, measured), not 1e-4; vLLM's bf16 error against the
  float32 reference must be no larger than ~3x HF's own bf16 error.

One engine at a time: ``family`` is a module-scoped parametrised fixture, so pytest shuts one
family's engine down before starting the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from reward_server.presets import PRESETS
from reward_server.scoring import ScoringError, parse_number_answer


@dataclass(frozen=True)
class Family:
    name: str  # key of reward_server.tiny_families.FAMILIES
    preset: str
    dtype: str
    score_atol: float
    level_atol: float
    level_token: str  # how the tokenizer spells the first level word


FAMILY_CASES = [
    Family("qwen2_5_vl", "qwen2_vl", "float32", 1e-4, 1e-4, "Ġexcellent"),
    Family("llava_onevision", "llava_onevision", "float32", 1e-4, 1e-4, "Excellent"),
    # bfloat16 (8 mantissa bits): measured max |vLLM - HF| 1.3e-2 on scores, 2.7e-2 on level
    # probabilities over the five photos (spread of the scores: 0.17); tolerances ~2x that. The
    # sharper check: vLLM is about as close to the float32 reference as HF's own bf16 run is.
    Family("qwen3_5", "qwen3_5", "bfloat16", 2.5e-2, 6e-2, "Ġexcellent"),
]


def _shutdown(llm) -> None:
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


@pytest.fixture(scope="module", params=FAMILY_CASES, ids=lambda f: f.name)
def family(request, tmp_path_factory):
    """(case, model folder, vLLM scorer, transformers scorer) of one family; one engine alive."""
    from reward_server.scoring import TransformersScorer, VLLMScorer
    from reward_server.tiny_families import build_tiny_family

    case: Family = request.param
    path = build_tiny_family(tmp_path_factory.mktemp(case.name) / f"tiny-{case.name}", case.name)
    v = VLLMScorer(
        path, case.preset, dtype=case.dtype, max_model_len=512, gpu_memory_utilization=0.1
    )
    h = TransformersScorer(path, case.preset, dtype=case.dtype)
    yield case, path, v, h
    _shutdown(v.llm)


@pytest.mark.slow
def test_family_architecture_and_prompt(family):
    """The folder is the real architecture in hub layout, the level words are single tokens, and
    the preset's prompt is the family's chat format (rendered by the processor's template)."""
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from reward_server.tiny_families import FAMILIES

    case, path, v, h = family
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[case.name]]
    assert type(h.model).__name__ == FAMILIES[case.name]
    _, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    preset = PRESETS[case.preset]
    tok = h.processor.tokenizer
    assert tok.convert_ids_to_tokens(v.level_ids)[0] == case.level_token
    assert v.level_ids == h.level_ids and len(set(v.level_ids)) == 5
    processor = AutoProcessor.from_pretrained(path)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": preset.question}]}
    ]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    prompt = preset.build_prompt()
    if preset.system:  # Qwen2.5-VL's template adds its default system line; the tiny one does not
        prompt = prompt.replace(f"<|im_start|>system\n{preset.system}<|im_end|>\n", "", 1)
    if case.preset == "qwen3_5":  # thinking off: Qwen3.5's template writes an empty think block
        rendered += "<think>\n\n</think>\n\n"
    assert rendered + preset.answer_prefix == prompt


@pytest.mark.slow
def test_family_vllm_equals_transformers(family, photos):
    """Same folder, same photos: equal level distributions and scores across the engines."""
    case, _, v, h = family
    vb, hb = v.score(photos), h.score(photos)
    diff_s = np.abs(vb.scores - hb.scores).max()
    diff_l = np.abs(vb.levels - hb.levels).max()
    print(
        f"\n{case.name}/{case.preset} ({case.dtype}): vLLM {np.round(vb.scores, 5).tolist()}"
        f"\n  HF {np.round(hb.scores, 5).tolist()}\n  max |diff| scores {diff_s:.2e}, levels {diff_l:.2e}"
    )
    assert np.ptp(hb.scores) > 0.1, hb.scores  # the photos really score differently
    assert hb.levels.max() < 0.99, hb.levels  # no level takes all the mass
    np.testing.assert_allclose(vb.scores, hb.scores, atol=case.score_atol)
    np.testing.assert_allclose(vb.levels, hb.levels, atol=case.level_atol)
    if case.dtype != "float32":
        # Rounding, not a different function: vLLM's bf16 scores are about as far from the float32
        # reference (HF, same weights) as HF's own bf16 scores are.
        from reward_server.scoring import TransformersScorer

        ref = TransformersScorer(h.model_path, case.preset, dtype="float32").score(photos).scores
        err_v, err_h = np.abs(vb.scores - ref).max(), np.abs(hb.scores - ref).max()
        print(f"  vs float32 reference: vLLM bf16 {err_v:.2e}, HF bf16 {err_h:.2e}")
        assert err_v <= 3 * err_h + 2e-3, (err_v, err_h)
    # One batched generate equals one request per image.
    single = np.concatenate([v.score([p]).scores for p in photos[:2]])
    np.testing.assert_allclose(single, vb.scores[:2], atol=case.score_atol)


@pytest.mark.slow
def test_family_text_number_on_qwen2_5_vl(family, photos):
    """VisualQuality-R1's prompt on the Qwen2.5-VL engine: equal greedy answers across engines;
    an answer that parses gives that score, one without a number raises ScoringError."""
    from reward_server.scoring import TransformersScorer, VLLMScorer

    case, path, v_levels, _ = family
    if case.name != "qwen2_5_vl":
        pytest.skip("the generated-rating presets (VisualQuality-R1, Q-Insight) are Qwen2.5-VL")
    preset = replace(PRESETS["text_number"], max_new_tokens=16)  # the real prompt; short answers
    v = VLLMScorer(path, preset, engine=v_levels.llm)
    h = TransformersScorer(path, preset)
    texts = v.generate_text(photos)
    assert texts == h.generate_text(photos)
    failed = 0
    for text, image in zip(texts, photos):
        try:
            value = parse_number_answer(text, preset.native_range)
        except ScoringError:
            failed += 1
            with pytest.raises(ScoringError, match=r"image 0: "):
                v.score([image])
            with pytest.raises(ScoringError):
                h.score([image])
        else:
            assert v.score([image]).scores[0] == pytest.approx((value - 1) / 4)
    # The random model writes no number for at least one photo (seeded, so this is fixed): the
    # error path is exercised, not only the parse.
    no_number = [t for t in texts if not re.search(r"\d", t)]
    assert no_number and failed >= len(no_number), texts
    with pytest.raises(ScoringError, match="no number"):
        v.score([photos[texts.index(no_number[0])]])


def test_tiny_family_folder_is_cached_and_guarded(tmp_path):
    """A second build reuses the folder; another family or seed rebuilds; a foreign folder and an
    unknown family are errors."""
    from reward_server.tiny_families import build_tiny_family

    path = build_tiny_family(tmp_path / "m", "qwen2_5_vl", seed=0)
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny_family(path, "qwen2_5_vl", seed=0) == path
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt
    other = build_tiny_family(tmp_path / "s1", "qwen2_5_vl", seed=1)
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        build_tiny_family(foreign, "qwen2_5_vl")
    with pytest.raises(ValueError, match="family: got 'mplug_owl2'"):
        build_tiny_family(tmp_path / "x", "mplug_owl2")
