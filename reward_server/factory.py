"""``RewardConfig`` -> a scorer, and the scoring step both reward services share.

The Serve deployment (:mod:`reward_server.serve_app`) and the standalone HTTP server
(:mod:`reward_server.http_server`) both build their scorer here and run their batches through
:func:`score_batch`, so the two services score with exactly the same model, preset and engine
settings, and fail in exactly the same way::

    spec = scorer_spec(cfg.reward)        # plain, picklable arguments (validated config -> spec)
    scorer = spec()                       # builds the backend (in the process that will use it)
    results = score_batch(scorer, ids, images)   # one ScoredImage or ScoreFailed per image

``model_kind: tiny`` builds the seeded tiny LLaVA of :mod:`reward_server.tiny_vlm` under
``cache_dir`` (reused across runs; file-locked, so concurrent replicas build it once).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from common.reward_sink import valid_scores

if TYPE_CHECKING:
    from common.config import RewardConfig
    from reward_server.scoring import Scorer

__all__ = [
    "ScoreFailed",
    "ScoredImage",
    "ScorerSpec",
    "build_scorer_from_config",
    "check_image",
    "score_batch",
    "scorer_spec",
    "tiny_vlm_dir",
]


def tiny_vlm_dir(cache_dir: str | os.PathLike, seed: int) -> Path:
    """Folder of the tiny VLM with ``seed`` inside ``cache_dir`` (one folder per seed)."""
    return Path(cache_dir) / f"tiny-llava-seed{seed}"


@dataclass(frozen=True)
class ScorerSpec:
    """Plain arguments of :func:`reward_server.scoring.build_scorer`, resolved from the config.

    Picklable and cheap: it travels to a Serve replica, which calls it to build its scorer there
    (a vLLM engine cannot be pickled, and must be created in the process that uses it).

    Attributes:
        backend: ``vllm`` | ``transformers`` | ``pyiqa``.
        model_path: local model folder (absolute); None for pyiqa, and for a tiny VLM not built yet.
        tiny_seed: build the tiny VLM with this seed into ``tiny_dir`` when ``model_path`` is None.
        tiny_dir: absolute folder of the tiny VLM (model_kind=tiny).
        preset: prompt/level-token preset name.
        dtype: VLM weights dtype.
        device: torch device of the transformers/pyiqa backends (vLLM picks its own).
        max_model_len, gpu_memory_utilization, tensor_parallel_size: vLLM engine settings.
        pyiqa_metric, pyiqa_weights: the pyiqa backend's metric and optional local weights file.
    """

    backend: str
    model_path: str | None = None
    tiny_seed: int | None = None
    tiny_dir: str | None = None
    preset: str = "llava"
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    pyiqa_metric: str = "piqe"
    pyiqa_weights: str | None = None

    def resolve_model_path(self) -> Path | None:
        """The model folder, building (or reusing) the tiny VLM first when the spec asks for it."""
        if self.backend == "pyiqa":
            return None
        if self.model_path is not None:
            return Path(self.model_path)
        from reward_server.tiny_vlm import build_tiny_llava

        assert self.tiny_dir is not None and self.tiny_seed is not None
        return build_tiny_llava(self.tiny_dir, seed=self.tiny_seed)

    def __call__(self) -> Scorer:
        """Build the scorer (loads the model / starts the vLLM engine: seconds to minutes)."""
        from reward_server.scoring import build_scorer

        return build_scorer(
            self.backend,  # type: ignore[arg-type]
            self.resolve_model_path(),
            self.preset,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            pyiqa_metric=self.pyiqa_metric,
            pyiqa_weights=self.pyiqa_weights,
        )


def scorer_spec(reward: RewardConfig, *, device: str | None = None) -> ScorerSpec:
    """Map a validated ``RewardConfig`` onto plain scorer arguments.

    Paths are made absolute here, at the edge: a Serve replica's working directory is not the
    driver's. ``device`` defaults to ``cuda`` when the replica is given GPUs, else ``cpu``.
    For the tiny VLM, ``max_model_len`` is capped at the tiny model's context (512 tokens): vLLM
    refuses a ``max_model_len`` beyond the model's ``max_position_embeddings``.
    """
    from reward_server.tiny_vlm import MAX_POSITIONS

    if device is None:
        device = "cuda" if reward.num_gpus_per_replica > 0 else "cpu"
    model_path = tiny_seed = tiny_dir = None
    max_model_len = reward.vllm_max_model_len
    if reward.backend != "pyiqa":
        if reward.model_kind == "local":
            model_path = str(Path(reward.model_path).expanduser().resolve())  # type: ignore[arg-type]
        else:
            tiny_seed = reward.tiny_seed
            tiny_dir = str(tiny_vlm_dir(Path(reward.cache_dir).expanduser().resolve(), tiny_seed))
            max_model_len = min(max_model_len, MAX_POSITIONS)
    weights = reward.pyiqa_weights
    return ScorerSpec(
        backend=reward.backend,
        model_path=model_path,
        tiny_seed=tiny_seed,
        tiny_dir=tiny_dir,
        preset=reward.preset,
        dtype=reward.dtype,
        device=device,
        max_model_len=max_model_len,
        gpu_memory_utilization=reward.vllm_gpu_memory_utilization,
        tensor_parallel_size=reward.tensor_parallel_size,
        pyiqa_metric=reward.pyiqa_metric,
        pyiqa_weights=None if weights is None else str(Path(weights).expanduser().resolve()),
    )


def build_scorer_from_config(reward: RewardConfig, *, device: str | None = None) -> Scorer:
    """``scorer_spec(reward, device=device)()`` — build the scorer the config describes."""
    return scorer_spec(reward, device=device)()


# ------------------------------------------------------------------------ the shared scoring step
class ScoredImage(NamedTuple):
    """The reward of one image: ``score`` in [0, 1] (finite), ``levels`` [5] level probabilities
    (best first) for level-token scorers, None for others, and ``version``: the reward model's
    version that scored it (set by the service; scores of different versions are not comparable)."""

    id: str
    score: float
    levels: tuple[float, ...] | None
    version: str | None = None


class ScoreFailed(RuntimeError):
    """One image's reward could not be computed. Never replaced by a made-up score.

    ``kind``: ``bad_input`` (the request's fault: wrong dtype/shape/size; retrying cannot help),
    ``unscorable`` (the model's answer for this image is not a score: non-finite, no number, out
    of range — deterministic for the image and the weights, so never retried: the caller gets NaN
    for it and the driver masks its trajectory), ``scoring`` (the backend itself failed: an engine
    error, retried by the client).
    """

    def __init__(self, message: str, kind: str = "scoring"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep ``kind`` across pickling (Ray returns it to the caller)
        return (type(self), (str(self), self.kind))


def check_image(image: object, image_id: object, max_pixels: int | None = None) -> np.ndarray:
    """One request image: uint8 [H, W, 3] with at most ``max_pixels`` pixels, a str id.
    Raises :class:`ScoreFailed` (kind ``bad_input``) naming the id and what was expected."""
    if not isinstance(image_id, str):
        raise ScoreFailed(f"image id: expected a str, got {type(image_id).__name__}", "bad_input")
    if not isinstance(image, np.ndarray):
        raise ScoreFailed(
            f"image {image_id!r}: expected a numpy array, got {type(image).__name__}", "bad_input"
        )
    if image.dtype != np.uint8:
        raise ScoreFailed(
            f"image {image_id!r}: expected dtype uint8, got {image.dtype}", "bad_input"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ScoreFailed(
            f"image {image_id!r}: expected shape [H, W, 3] (RGB), got {list(image.shape)}",
            "bad_input",
        )
    if max_pixels is not None and image.shape[0] * image.shape[1] > max_pixels:
        raise ScoreFailed(
            f"image {image_id!r}: {image.shape[0]}×{image.shape[1]} pixels exceed the cap of {max_pixels}",
            "bad_input",
        )
    return image


def _unpack(batch: object, ids: Sequence[str]) -> list[ScoredImage | ScoreFailed]:
    """A scorer's ScoreBatch -> one result per id; a non-finite or out-of-range score fails
    its image (the Scorer Protocol does not force every backend through ScoreBatch's checks)."""
    n = len(ids)
    scores = np.asarray(getattr(batch, "scores", None), dtype=np.float64).reshape(-1)
    if scores.shape[0] != n:
        raise ScoreFailed(f"the scorer returned {scores.shape[0]} scores for {n} images", "scoring")
    levels = getattr(batch, "levels", None)
    if levels is not None:
        levels = np.asarray(levels, dtype=np.float64)
        if levels.ndim != 2 or levels.shape[0] != n:
            raise ScoreFailed(
                f"the scorer returned levels of shape {list(levels.shape)} for {n} images",
                "scoring",
            )
    ok = valid_scores(scores, nan_ok=False)  # [n]
    out: list[ScoredImage | ScoreFailed] = []
    for i, image_id in enumerate(ids):
        s = float(scores[i])
        if not ok[i]:
            out.append(ScoreFailed(f"image {image_id!r}: the scorer returned {s!r}, not a score in [0, 1]",
                                   "unscorable"))
            continue
        row = None if levels is None else tuple(float(p) for p in levels[i])
        if row is not None and not all(math.isfinite(p) for p in row):
            out.append(
                ScoreFailed(f"image {image_id!r}: non-finite level probabilities {row}", "unscorable")
            )
            continue
        out.append(ScoredImage(image_id, s, row))
    return out


def score_batch(
    scorer: Scorer, ids: Sequence[str], images: Sequence[np.ndarray]
) -> list[ScoredImage | ScoreFailed]:
    """Score one batch (blocking); one result per image, in order.

    A failing batch is retried one image at a time, so that one bad image (a NaN from the
    backend, say) fails only its own request and not the others that happened to share its batch.
    Exceptions are returned, not raised: each caller fails exactly the requests they belong to.
    A :class:`~reward_server.scoring.ScoringError` of one image (the model's own answer is not a
    score) is ``unscorable``; any other exception (the engine failed) is ``scoring``.
    """
    from reward_server.scoring import ScoringError

    try:
        return _unpack(scorer.score(list(images)), ids)
    except Exception as err:  # noqa: BLE001 — every failure becomes a per-image ScoreFailed
        if len(ids) == 1:
            if isinstance(err, ScoreFailed):
                kind = err.kind
            else:
                kind = "unscorable" if isinstance(err, ScoringError) else "scoring"
            return [ScoreFailed(f"image {ids[0]!r}: {type(err).__name__}: {err}", kind)]
    return [score_batch(scorer, [i], [im])[0] for i, im in zip(ids, images)]
