"""Training the IQA reward model: a LLaVA-family VLM taught to answer the level words (DESIGN.md §3.1).

The recipe is Q-Align's / DeQA-Score's: ask the scoring prompt of the preset ("... How would you
rate the quality of this image? ASSISTANT: The quality of the image is"), read the next-token
logits of the five level words at the answer position, and train them with cross-entropy against
a soft level target made from a quality label (:func:`reward_server.iqa_data.soft_level_target`).
The score the reward service serves is then exactly what was trained:
Σ softmax(level logits)·(5..1), mapped to [0, 1] (:func:`reward_server.scoring.expected_score`).

    folder = ensure_iqa_model(cache_dir, base_model=tiny_dir, train=examples_fn, ...)   # cached

It works on any folder that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load and whose
preset's level words are single tokens (LLaVA-1.5, LLaVA-OneVision, Qwen2-VL ...). On CPU it trains
the tiny LLaVA of :mod:`reward_server.tiny_vlm` (full fine-tune: 1.1 M parameters).

Output: an HF folder (safetensors in the hub layout vLLM's LLaVA loader expects, processor,
tokenizer, chat template) plus :data:`CARD_FILE`, a JSON card: recipe, data, label mapping,
held-out metrics. The card is written last; a folder without it is not a finished model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.types import LEVEL_NAMES
from reward_server.iqa_data import IQAExamples, level_of, soft_level_target
from reward_server.presets import ScorerPreset, get_preset

__all__ = [
    "CARD_FILE",
    "IQATrainSettings",
    "IQATrainingError",
    "best_step",
    "correlations",
    "ensure_iqa_model",
    "fine_tune_iqa_model",
    "held_out_report",
    "fidelity_loss",
    "level_loss",
    "load_examples",
    "read_card",
    "served_scores",
]

log = logging.getLogger(__name__)

#: Written last into a finished model folder.
CARD_FILE = "iqa_card.json"
#: Beside the weights: the held-out set and a replay sample of the training set, which a later
#: refresh (iterative RL) measures on and mixes into its data against forgetting.
HELD_OUT_FILE = "iqa_held_out.npz"
REPLAY_FILE = "iqa_replay.npz"
#: Training images kept in REPLAY_FILE.
REPLAY_SIZE = 1024
#: Bump when the recipe changes in a way the settings do not capture (invalidates caches).
RECIPE_VERSION = 1


class IQATrainingError(RuntimeError):
    """Training produced a model too poor to hand to RL, or could not run; the message says why."""


@dataclass(frozen=True)
class IQATrainSettings:
    """How the IQA model is fine-tuned (every field is part of the cache key)."""

    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (1/step), linear warm-up then cosine decay."""
    warmup_fraction: float = 0.05
    """Fraction of the steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    min_srcc: float = 0.6
    """Fail (IQATrainingError) when the held-out SRCC of the trained model is below this."""
    seed: int = 0
    """Seed of the batch order and augmentations."""
    rank_weight: float = 0.0
    """Weight of DeQA-Score's pairwise fidelity loss (:func:`fidelity_loss`) over the pairs of a
    batch, added to the level cross-entropy; 0: cross-entropy only (Q-Align)."""
    group_batches: bool = False
    """Fill each batch with whole groups (a clean crop and all the images made from it), so the
    pairs of :func:`fidelity_loss` compare qualities of the same content."""
    grey_fraction: float = 0.25
    """Share of training images shown in greyscale (R = G = B = luma). Exact for luma-based labels
    such as the default SSIM_Y (the label does not change); set 0 for a colour-aware label."""
    restored_repeat: int = 1
    """Each epoch shows every ``restored`` image (the base policy's outputs, which the step-wise
    reward ranks) this many times and every other image once: the data mix without the cost of
    restoring more crops."""
    select_every: int = 0
    """Model selection: every this many steps (and at the last) score the validation set (photos in
    neither the training nor the held-out set) and return the weights of the step with the best
    validation SRCC; 0, or no validation set: the last step's weights."""


# ----------------------------------------------------------------------------------- the math
def level_loss(level_logits: Any, target: Any) -> Any:
    """Soft cross-entropy over the five level tokens (Q-Align / DeQA-Score).

    ``level_logits``: float [n, 5] — logits of the level words at the answer position, best first.
    ``target``: float [n, 5] — a distribution over the levels (rows sum to 1).
    Returns the mean over the batch of −Σ_l target_l · log softmax(level_logits)_l (a scalar).
    The softmax is over the five levels only: the served score reads exactly that distribution
    (:func:`reward_server.scoring.expected_score` renormalises over them), so the rest of the
    vocabulary is moot.
    """
    import torch

    return -(target * torch.log_softmax(level_logits.float(), dim=-1)).sum(dim=-1).mean()


def fidelity_loss(level_logits: Any, native: Any, label_std: float = 0.25) -> Any:
    """Pairwise fidelity loss over every pair (i, j) of a batch (Tsai et al. 2007; DeQA-Score).

    From the level distribution p [n, 5] (weights w = 5..1): mean μ = Σ p·w, variance
    σ² = Σ p·(w − μ)². Predicted P(i better than j) = Φ((μ_i − μ_j) / √(σ_i² + σ_j² + ε)); target
    P = Φ((s_i − s_j) / (√2 · label_std)) from the native labels s [n]. Loss = mean over pairs of
    1 − √(P·P̂) − √((1 − P)(1 − P̂)) (0 when P̂ = P). It trains the ordering of images directly,
    which a pointwise cross-entropy on few photos learns mostly through their content.
    """
    import torch

    w = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], device=level_logits.device)
    p = torch.softmax(level_logits.float(), dim=-1)
    mu = p @ w  # [n]
    var = p @ (w * w) - mu * mu
    normal = torch.distributions.Normal(0.0, 1.0)
    p_hat = normal.cdf((mu[:, None] - mu[None, :]) / torch.sqrt(var[:, None] + var[None, :] + 1e-4))
    s = torch.as_tensor(native, dtype=torch.float32, device=level_logits.device)
    target = normal.cdf((s[:, None] - s[None, :]) / (2**0.5 * label_std))
    eps = 1e-8
    loss = 1 - torch.sqrt(target * p_hat + eps) - torch.sqrt((1 - target) * (1 - p_hat) + eps)
    off_diag = ~torch.eye(len(s), dtype=torch.bool, device=level_logits.device)
    return loss[off_diag].mean()


def correlations(pred: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(SRCC, PLCC) between predicted scores and labels; PLCC is the plain Pearson r (no
    logistic fit: the score is trained on the label's own scale)."""
    from scipy.stats import pearsonr, spearmanr

    pred, label = np.asarray(pred, dtype=np.float64), np.asarray(label, dtype=np.float64)
    if len(pred) < 3 or np.std(pred) == 0 or np.std(label) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(pred, label).statistic), float(pearsonr(pred, label).statistic)


def held_out_report(scores: np.ndarray, ex: IQAExamples) -> dict[str, Any]:
    """Metrics of scores (in [0, 1]) on a labelled held-out set: SRCC/PLCC against the label
    (all images, and restored outputs alone), and the mean score of each kind."""
    scores = np.asarray(scores, dtype=np.float64)
    srcc, plcc = correlations(scores, ex.quality)
    kinds = np.asarray(ex.kinds)
    restored = kinds == "restored"
    r_srcc, r_plcc = correlations(scores[restored], ex.quality[restored]) if restored.sum() >= 3 else (None, None)
    mean = {k: round(float(scores[kinds == k].mean()), 4) for k in sorted(set(ex.kinds))}
    label_mean = {k: round(float(ex.quality[kinds == k].mean()), 4) for k in sorted(set(ex.kinds))}
    return {
        "n": len(ex),
        "srcc": round(srcc, 4),
        "plcc": round(plcc, 4),
        "srcc_restored": None if r_srcc is None else round(r_srcc, 4),
        "plcc_restored": None if r_plcc is None else round(r_plcc, 4),
        "mean_score": mean,
        "mean_label": label_mean,
    }


# ------------------------------------------------------------------------------- the model
class _LevelReader:
    """Processor + level ids of a model folder: builds inputs and reads level logits [n, 5]."""

    def __init__(self, model: Any, processor: Any, preset: ScorerPreset, background) -> None:
        import torch

        self.model, self.processor, self.preset, self.background = model, processor, preset, background
        self.prompt = preset.build_prompt()
        self.level_ids = torch.tensor(preset.level_token_ids(processor.tokenizer))

    def logits(self, images: list[np.ndarray]) -> Any:
        pils = [self.preset.preprocess(im, self.background) for im in images]
        inputs = self.processor(images=pils, text=[self.prompt] * len(pils), return_tensors="pt")
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # [n, V]
        return logits[:, self.level_ids]  # [n, 5]

    def scores(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        import torch

        from reward_server.scoring import expected_score

        was = self.model.training
        self.model.eval()
        rows = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                rows.append(torch.log_softmax(self.logits(list(images[i : i + batch_size])).float(), -1))
        self.model.train(was)
        lp = torch.cat(rows).double().numpy()
        return expected_score(lp, self.preset.level_weights, self.preset.native_range)[0]


def best_step(curve: list[dict[str, Any]], key: str = "validation_srcc") -> int | None:
    """The step of the highest ``key`` in a training curve (the earliest on a tie; NaN never
    wins); None when no entry has a finite ``key``."""
    scored = [(float(e[key]), -int(e["step"])) for e in curve if e.get(key) is not None and np.isfinite(e[key])]
    return -max(scored)[1] if scored else None


def _batch_order(train: IQAExamples, rng: np.random.Generator, grouped: bool, restored_repeat: int = 1) -> np.ndarray:
    """One epoch of example indices: a permutation (in which each ``restored`` image appears
    ``restored_repeat`` times), or whole groups in random order (members shuffled) so that
    consecutive batches hold the same content at several qualities."""
    if not grouped:
        extra = np.flatnonzero(np.asarray(train.kinds) == "restored")  # [R]
        pool = np.concatenate([np.arange(len(train))] + [extra] * (max(1, restored_repeat) - 1))
        return rng.permutation(pool)
    groups = train.groups
    uniq = rng.permutation(np.unique(groups))
    members = {int(g): np.flatnonzero(groups == g) for g in uniq}
    return np.concatenate([rng.permutation(members[int(g)]) for g in uniq])


def _augment(image: np.ndarray, rng: np.random.Generator, grey_fraction: float = 0.0) -> np.ndarray:
    """Quality-preserving augmentation: a mirror, a k·90° rotation, and (with probability
    ``grey_fraction``) greyscale R = G = B = Y, which leaves a luma-based label unchanged."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = np.rot90(image, int(rng.integers(4)))
    if grey_fraction and rng.random() < grey_fraction:
        y = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = np.repeat((y + 0.5).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.ascontiguousarray(image)


def fine_tune_iqa_model(
    model: Any,
    processor: Any,
    preset: str | ScorerPreset,
    train: IQAExamples,
    settings: IQATrainSettings,
    *,
    held_out: IQAExamples | None = None,
    validation: IQAExamples | None = None,
    background: tuple[int, int, int] | None = None,
    log_every: int = 100,
    on_step: Callable[[int, float], Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``train`` (module docstring); returns a summary with the
    loss per step and, every ``log_every`` steps, the held-out SRCC (transformers scores).

    With ``validation`` and ``settings.select_every``, the validation SRCC is measured every
    ``select_every`` steps and the model is left with the weights of the best one
    (:func:`best_step`; summary ``selected_step`` and ``validation_curve``). The held-out set is
    only reported, never used to choose."""
    import torch

    from common.tiny.pretrain import warmup_cosine

    preset = get_preset(preset)
    if preset.mode != "levels":
        raise IQATrainingError(f"preset {preset.name!r}: training needs a levels preset, got mode {preset.mode!r}")
    reader = _LevelReader(model, processor, preset, background)
    native = torch.from_numpy(level_of(train.quality)).float()  # [N] in [1, 5]
    targets = torch.from_numpy(soft_level_target(native.numpy()))  # [N, 5]
    rng = np.random.default_rng([settings.seed, RECIPE_VERSION])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = warmup_cosine(opt, settings.steps, settings.warmup_fraction)
    order = _batch_order(train, rng, settings.group_batches, settings.restored_repeat)
    pos, losses, curve = 0, [], []
    selecting = bool(settings.select_every) and validation is not None
    val_curve: list[dict[str, Any]] = []
    best_state: dict[str, Any] | None = None
    model.train()
    t0 = time.perf_counter()
    for step in range(settings.steps):
        if pos + settings.batch_size > len(order):
            order, pos = _batch_order(train, rng, settings.group_batches, settings.restored_repeat), 0
        idx = order[pos : pos + settings.batch_size]
        pos += settings.batch_size
        images = [_augment(train.images[i], rng, settings.grey_fraction) for i in idx]
        logits = reader.logits(images)
        loss = level_loss(logits, targets[idx])
        if settings.rank_weight:
            loss = loss + settings.rank_weight * fidelity_loss(logits, native[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if selecting and ((step + 1) % settings.select_every == 0 or step + 1 == settings.steps):
            v_srcc = correlations(reader.scores(validation.images), validation.quality)[0]
            val_curve.append({"step": step + 1, "validation_srcc": round(v_srcc, 4)})
            if best_step(val_curve) == step + 1:  # a new best: keep a copy of these weights
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if log_every and ((step + 1) % log_every == 0 or step + 1 == settings.steps):
            entry = {"step": step + 1, "loss": round(float(np.mean(losses[-log_every:])), 4),
                     "seconds": round(time.perf_counter() - t0, 1)}
            if held_out is not None:
                entry["held_out_srcc"] = round(correlations(reader.scores(held_out.images), held_out.quality)[0], 4)
            curve.append(entry)
            log.info("IQA training %s", entry)
    selected = best_step(val_curve) if selecting else None
    if best_state is not None and selected != settings.steps:
        model.load_state_dict(best_state)
    model.eval()
    out = {"loss_first": losses[0], "loss_last": float(np.mean(losses[-20:])), "curve": curve,
           "seconds": round(time.perf_counter() - t0, 1)}
    if selecting:
        out |= {"selected_step": selected, "validation_curve": val_curve}
    return out


def _save_model(model: Any, processor: Any, out: Path) -> None:
    """save_pretrained + processor, in the layout vLLM loads (LLaVA: ``vision_tower.vision_model.*``)."""
    from reward_server.tiny_vlm import _rewrite_hub_layout

    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if getattr(model.config, "model_type", "") == "llava":
        for f in sorted(out.glob("*.safetensors")):
            _rewrite_hub_layout(f)
    # safetensors writes owner-only files; a shared cache (Serve replicas, other users) must read them.
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_examples(ex: IQAExamples, path: Path) -> None:
    np.savez_compressed(path, images=ex.images, quality=ex.quality, kinds=np.asarray(ex.kinds),
                        photos=np.asarray(ex.photos), label_source=np.asarray(ex.label_source), groups=ex.groups)


def load_examples(path: str | os.PathLike) -> IQAExamples:
    with np.load(path) as z:
        return IQAExamples(z["images"], z["quality"], [str(k) for k in z["kinds"]], [str(p) for p in z["photos"]],
                           str(z["label_source"]), z["groups"] if "groups" in z else None)


def read_card(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The card of a trained IQA model folder, or None when it has none (not finished)."""
    path = Path(folder) / CARD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------- the served score
def served_scores(
    model_dir: str | os.PathLike, images: np.ndarray, preset: str, *, engine: str = "vllm", timeout_s: float = 600
) -> np.ndarray:
    """Scores of ``images`` by the model as the reward service serves it: a fresh scorer in a
    child process (a vLLM engine is not shut down cleanly inside a long-lived process, and the
    script that creates one must be ``__main__``). ``engine``: ``vllm`` or ``transformers``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="iqa-eval-") as tmp:
        src, dst = Path(tmp) / "images.npy", Path(tmp) / "scores.npy"
        np.save(src, np.asarray(images, dtype=np.uint8))
        cmd = [sys.executable, "-m", "reward_server.iqa_train", "--score", str(model_dir),
               "--preset", preset, "--engine", engine, "--images", str(src), "--out", str(dst)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              cwd=str(Path(__file__).resolve().parent.parent))
        if proc.returncode != 0 or not dst.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise IQATrainingError(f"scoring {model_dir} with {engine} failed (exit {proc.returncode}):\n{tail}")
        return np.load(dst)


def _score_main(model_dir: str, preset: str, engine: str, images_file: str, out_file: str) -> None:
    from reward_server.scoring import build_scorer

    images = np.load(images_file)
    kwargs = {"max_model_len": 512, "gpu_memory_utilization": 0.1} if engine == "vllm" else {}
    scorer = build_scorer(engine, Path(model_dir), preset, dtype="float32", **kwargs)  # type: ignore[arg-type]
    scores = np.concatenate([scorer.score(list(images[i : i + 160])).scores for i in range(0, len(images), 160)])
    np.save(out_file, scores)


# ----------------------------------------------------------------------------------- caching
def iqa_model_key(settings: IQATrainSettings, base_model: Path, data_key: dict[str, Any]) -> str:
    """12 hex digits naming a trained model: recipe, base model and what made its data."""
    from reward_server.scoring import weights_digest

    blob = json.dumps(
        {"settings": asdict(settings), "recipe": RECIPE_VERSION, "data": data_key,
         "base": weights_digest(base_model)},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_iqa_model(
    out_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike,
    preset: str,
    make_data: Callable[[], tuple[IQAExamples, IQAExamples] | tuple[IQAExamples, IQAExamples, IQAExamples | None]],
    data_key: dict[str, Any],
    settings: IQATrainSettings | None = None,
    version: int = 0,
    parent: str | None = None,
    check_vllm: bool = True,
) -> Path:
    """The trained model for these arguments: ``<out_dir>/iqa-<key>/``, reused when it has a card.

    ``make_data()`` -> (train, held_out) or (train, held_out, validation) examples; called only
    when the model must be trained. ``validation`` (photos in neither other set) chooses the
    step whose weights are kept when ``settings.select_every`` is set.
    ``data_key``: what determines that data (photos, label source, base-policy digest ...).
    ``version``/``parent``: the reward-model version this training makes and the folder it
    fine-tunes (iterative RL), recorded on the card. The served (vLLM) score of the held-out set
    is measured in a child process when ``check_vllm``; below ``settings.min_srcc`` this raises
    :class:`IQATrainingError` and leaves no model behind.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from reward_server.scoring import _pad_background

    settings = settings or IQATrainSettings()
    base_model = Path(base_model)
    key = iqa_model_key(settings, base_model, {**data_key, "version": version})
    final = Path(out_dir) / f"iqa-{key}"
    if read_card(final) is not None:
        return final
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    train, held_out, *rest = make_data()
    validation = rest[0] if rest else None
    data_seconds = time.perf_counter() - t0
    preset_obj = get_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        processor = AutoProcessor.from_pretrained(base_model)
        model = AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32)
        background = _pad_background(base_model, preset_obj)
        reader = _LevelReader(model, processor, preset_obj, background)
        before = held_out_report(reader.scores(held_out.images), held_out)
        summary = fine_tune_iqa_model(model, processor, preset_obj, train, settings,
                                      held_out=held_out, validation=validation, background=background)
        after = held_out_report(reader.scores(held_out.images), held_out)
    train_seconds = summary.pop("seconds")

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_model(model, processor, tmp)
        hf_scores = served_scores(tmp, held_out.images, preset, engine="transformers")
        served = {"transformers": held_out_report(hf_scores, held_out)}
        if check_vllm:
            vllm_scores = served_scores(tmp, held_out.images, preset, engine="vllm")
            served["vllm"] = held_out_report(vllm_scores, held_out)
            served["vllm_vs_transformers_max_abs_diff"] = float(np.max(np.abs(vllm_scores - hf_scores)))
        headline = served.get("vllm", served["transformers"])
        card = {
            "format": "restore-rl IQA card v1",
            "version": version,
            "parent": parent,
            "base_model": str(base_model),
            "preset": preset,
            "recipe": {
                "method": "Q-Align/DeQA-Score level-token soft cross-entropy at the answer position",
                "prompt": preset_obj.build_prompt(),
                "level_words": list(preset_obj.level_words),
                "settings": asdict(settings),
                "recipe_version": RECIPE_VERSION,
            },
            "label_mapping": {
                "source": train.label_source,
                "native_score": "s = 1 + 4·q for quality q in [0, 1]",
                "levels": dict(zip(LEVEL_NAMES, (5, 4, 3, 2, 1))),
                "target": "two-point soft label on the levels around s, with expectation exactly s",
            },
            "data": {"key": data_key, "train_counts": train.counts(), "held_out_counts": held_out.counts(),
                     "train_photos": sorted(set(train.photos)), "held_out_photos": sorted(set(held_out.photos)),
                     "validation_counts": None if validation is None else validation.counts(),
                     "validation_photos": None if validation is None else sorted(set(validation.photos))},
            "held_out": {"before_training": before, "after_training": after, **served},
            "headline": {"srcc": headline["srcc"], "plcc": headline["plcc"], "engine": "vllm" if check_vllm else "transformers",
                         "mean_score": headline["mean_score"]},
            "training": {**summary, "train_seconds": round(train_seconds, 1), "data_seconds": round(data_seconds, 1),
                         "total_seconds": round(time.perf_counter() - t_start, 1)},
            "weights_sha256": _weights_sha256(tmp),
        }
        if not (headline["srcc"] >= settings.min_srcc):
            raise IQATrainingError(
                f"the trained IQA model reaches held-out SRCC {headline['srcc']} < min_srcc {settings.min_srcc} "
                f"({card['headline']['engine']} score, {len(held_out)} images): refusing to hand RL a useless "
                f"reward; see the training curve {summary['curve'][-3:]}"
            )
        save_examples(held_out, tmp / HELD_OUT_FILE)
        rng = np.random.default_rng([settings.seed, version])
        keep = np.sort(rng.permutation(len(train))[:REPLAY_SIZE])
        save_examples(train.select(np.isin(np.arange(len(train)), keep)), tmp / REPLAY_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        if final.exists():  # another process finished the same model first: keep its folder
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m reward_server.iqa_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--score", metavar="MODEL_DIR", help="score --images with a model folder (internal)")
    ap.add_argument("--preset", default="llava")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--images", help=".npy of uint8 [N, H, W, 3]")
    ap.add_argument("--out", help=".npy of the scores")
    args = ap.parse_args(argv)
    if args.score:
        _score_main(args.score, args.preset, args.engine, args.images, args.out)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
