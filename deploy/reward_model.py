"""The trained IQA reward (``reward.model_kind: trained``): data from the base policy, training, caching.

Only ``deploy/`` composes roles, so this is where the base policy (common.policy + the rollout
sampler) restores the LQ crops that join the IQA training data, and where the config is pointed at
the trained folder. After :func:`with_trained_reward` the job's reward is ``model_kind: local`` on
that folder: vLLM serves it behind Ray Serve exactly as it would a real checkpoint.

    cfg = with_trained_reward(cfg)      # trains on first use (about 3 minutes on 2 cores), then cached

The cache key covers the training recipe, the photos, the label source and a digest of the base
policy's weight files, so a different SFT policy or recipe trains a new model.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.config import ExperimentConfig, parse_config

if TYPE_CHECKING:
    from common.config import IQATrainConfig
    from reward_server.iqa_data import IQAExamples, LabelSource

__all__ = [
    "RefreshRejected",
    "BasePolicyRestorer",
    "refresh_reward_model",
    "ensure_trained_reward",
    "iqa_base_model",
    "label_source",
    "train_settings",
    "with_trained_reward",
]

log = logging.getLogger("restore_rl.reward_model")


def _files_digest(*folders: Path | None) -> str:
    """sha256 over the names and bytes of every file under the folders (None skipped)."""
    h = hashlib.sha256()
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class BasePolicyRestorer:
    """The untouched starting policy as a :class:`reward_server.iqa_data.Restorer`.

    Samples one DDIM-η trajectory per LQ image with the run's sampler settings and returns, per
    input, the image each step's action led to (x̂0 of steps 1..K−1 and the output D(x_0)) — the
    images the step-wise reward scores. uint8 [N, K, H, W, 3].
    """

    def __init__(self, cfg: ExperimentConfig, *, seed: int = 0, batch_size: int = 16, trainable: Path | None = None):
        from common.policy import build_policy

        self.cfg = cfg
        self.policy = build_policy(cfg.model, cfg.data.resolution).eval()
        if trainable is not None:
            self.policy.load_trainable(trainable)
        self.seed = seed
        self.batch_size = batch_size

    def __call__(self, lq: np.ndarray) -> np.ndarray:
        from rollout.sampler import SamplerSettings, sample_trajectories

        settings = SamplerSettings(
            num_inference_steps=self.cfg.rollout.num_inference_steps,
            eta=self.cfg.rollout.eta,
            samples_per_input=1,
            reward_steps="all",
            policy_target=self.cfg.algorithm.policy_target,
        )
        out = []
        for start in range(0, len(lq), self.batch_size):
            chunk = np.ascontiguousarray(lq[start : start + self.batch_size])
            traj = sample_trajectories(self.policy, chunk, list(range(start, start + len(chunk))), settings,
                                       policy_version=0, seed=self.seed)
            out.append(traj.reward_images.numpy())  # [n, K, H, W, 3]
        return np.concatenate(out)


def label_source(spec: str) -> LabelSource:
    """``ssim_y`` -> :class:`reward_server.iqa_data.SSIMLabel`; ``module:function`` -> that object
    (a LabelSource: (images, references) -> quality in [0, 1]; a class is instantiated)."""
    from reward_server.iqa_data import SSIMLabel

    if spec == "ssim_y":
        return SSIMLabel()
    module, _, name = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward.iqa_train.label_source {spec!r}: cannot import it ({err})") from None
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"reward.iqa_train.label_source {spec!r}: not callable")
    if not hasattr(obj, "name"):
        try:
            obj.name = spec  # type: ignore[attr-defined]
        except AttributeError:
            pass
    return obj


def train_settings(t: IQATrainConfig, *, refresh: bool = False):
    """The first training's settings, or (``refresh``) a refresh's: ``refresh_steps``, and the
    plain mix (``restored_repeat`` 1: the fresh policy images are the point of a refresh, and the
    replay's restorations are not multiplied over them)."""
    from reward_server.iqa_train import IQATrainSettings

    return IQATrainSettings(steps=t.refresh_steps if refresh else t.steps, batch_size=t.batch_size, lr=t.lr,
                            min_srcc=t.min_srcc, seed=t.seed, grey_fraction=t.grey_fraction,
                            restored_repeat=1 if refresh else t.restored_repeat, select_every=t.select_every)


def iqa_base_model(cfg: ExperimentConfig) -> Path:
    """The VLM folder that IQA training starts from: ``iqa_train.base_model`` or the tiny LLaVA
    of shape ``iqa`` (built under ``reward.cache_dir``)."""
    from reward_server.tiny_vlm import build_tiny_llava

    t = cfg.reward.iqa_train
    if t.base_model is not None:
        return Path(t.base_model).expanduser().resolve()
    cache = Path(cfg.reward.cache_dir).expanduser().resolve()
    return build_tiny_llava(cache / f"tiny-llava-iqa-seed{cfg.reward.tiny_seed}", seed=cfg.reward.tiny_seed, size="iqa")


def _examples(cfg: ExperimentConfig, photos, crops: int, seed: int, restorer, restored_inputs: int) -> IQAExamples:
    """Clean/degraded/LQ crops of ``photos``, plus the base policy's restorations of
    ``restored_inputs`` LQ crops spread over the photos."""
    from reward_server.iqa_data import build_iqa_examples

    t = cfg.reward.iqa_train
    return build_iqa_examples(photos, resolution=cfg.data.resolution, crops_per_photo=crops, seed=seed,
                              label=label_source(t.label_source), degraded_per_crop=t.degraded_per_crop,
                              restorer=restorer if restored_inputs else None, restored_inputs=restored_inputs)


def iqa_data_key(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the IQA model's training data depends on (its cache key): photos, crops, label source,
    the base policy's files by content and its shape, the sampler. Never a path of this checkout."""
    from reward_server.iqa_data import IQA_HELD_OUT_PHOTOS, IQA_TRAIN_PHOTOS, IQA_VALIDATION_PHOTOS
    from reward_server.iqa_train import RECIPE_VERSION

    t = cfg.reward.iqa_train
    policy_digest = _files_digest(cfg.model.init_checkpoint, cfg.model.tiny.vae_dir, cfg.model.pretrained_dir)
    data_key: dict[str, Any] = {
        "train_photos": list(IQA_TRAIN_PHOTOS), "held_out_photos": list(IQA_HELD_OUT_PHOTOS),
        "resolution": cfg.data.resolution, "crops_per_photo": t.crops_per_photo,
        "degraded_per_crop": t.degraded_per_crop, "restored_inputs": t.restored_inputs,
        "held_out_crops_per_photo": t.held_out_crops_per_photo, "label_source": t.label_source,
        "ratings_dir": None if t.ratings_dir is None else _files_digest(Path(t.ratings_dir)),
        # The policy's files by content (policy_digest); its shape without the VAE's path, so the key
        # does not depend on where the checkout is.
        "policy": policy_digest, "model": {**cfg.model.model_dump(mode="json", include={"kind", "finetune"}),
                                           "tiny": cfg.model.tiny.model_dump(mode="json", exclude={"vae_dir"})},
        "sampler": [cfg.rollout.num_inference_steps, cfg.rollout.eta, cfg.algorithm.policy_target],
        "seed": t.seed, "data_recipe": RECIPE_VERSION,
    }
    if t.select_every:  # the validation set exists only when it chooses the step
        data_key |= {"validation_photos": list(IQA_VALIDATION_PHOTOS),
                     "validation_crops_per_photo": t.validation_crops_per_photo}
    return data_key


def ensure_trained_reward(cfg: ExperimentConfig, *, progress: bool = True) -> Path:
    """Train (or reuse) the IQA model that ``cfg.reward.iqa_train`` describes; returns its folder.

    The base policy is ``cfg.model`` as built (with ``model.init_checkpoint``): the policy RL
    starts from. Its restorations of training (and held-out) photos join the data.
    """
    from reward_server.iqa_data import (
        IQA_HELD_OUT_PHOTOS,
        IQA_TRAIN_PHOTOS,
        IQA_VALIDATION_PHOTOS,
        load_rated_folder,
    )
    from reward_server.iqa_train import ensure_iqa_model, read_card

    t = cfg.reward.iqa_train
    base = iqa_base_model(cfg)
    data_key = iqa_data_key(cfg)
    settings = train_settings(t)
    out_dir = Path(cfg.reward.cache_dir).expanduser().resolve() / "iqa"
    trained: list[bool] = []

    def make_data() -> tuple[IQAExamples, IQAExamples, IQAExamples | None]:  # only when no cached model fits
        trained.append(True)
        if progress:
            print(f"[iqa] training the IQA reward model ({settings.steps} steps from {base}) -> {out_dir}", flush=True)
        t0 = time.perf_counter()
        restorer = BasePolicyRestorer(cfg, seed=cfg.rollout.seed + 7919) if t.restored_inputs else None
        train = _examples(cfg, IQA_TRAIN_PHOTOS, t.crops_per_photo, t.seed, restorer, t.restored_inputs)
        if t.ratings_dir is not None:
            from reward_server.iqa_data import IQAExamples

            train = IQAExamples.concat([train, load_rated_folder(t.ratings_dir, cfg.data.resolution)])
        held_restored = max(1, t.restored_inputs // 4) if t.restored_inputs else 0
        held = _examples(cfg, IQA_HELD_OUT_PHOTOS, t.held_out_crops_per_photo, t.seed + 1, restorer, held_restored)
        val = (_examples(cfg, IQA_VALIDATION_PHOTOS, t.validation_crops_per_photo, t.seed + 2, restorer, held_restored)
               if t.select_every else None)
        if progress:
            print(f"[iqa] data: {len(train)} training images {train.counts()}, {len(held)} held-out"
                  + ("" if val is None else f", {len(val)} validation") + f" ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        return train, held, val

    t0 = time.perf_counter()
    folder = ensure_iqa_model(out_dir, base_model=base, preset=cfg.reward.preset, make_data=make_data,
                              data_key=data_key, settings=settings, version=0,
                              check_vllm=cfg.reward.backend == "vllm")
    if progress:
        h = (read_card(folder) or {}).get("headline", {})
        how = f"trained in {time.perf_counter() - t0:.0f} s" if trained else f"reusing cached {folder}"
        print(f"[iqa] {how}: held-out SRCC {h.get('srcc')} PLCC {h.get('plcc')} ({h.get('engine')}); "
              f"mean score {h.get('mean_score')}", flush=True)
    return folder


class RefreshRejected(RuntimeError):
    """A refreshed reward model failed its held-out gate; the job keeps the parent model."""


def refresh_reward_model(
    cfg: ExperimentConfig, images: np.ndarray, references: np.ndarray, *, iteration: int, run_name: str,
    progress: bool = True,
) -> Path:
    """Iterative RL (paper §6.2.7): fine-tune the reward model in use on the current policy's
    images, labelled against their ground truth by the configured label source (the stand-in for
    the paper's human annotators), mixed with a replay sample of its earlier training data; the
    held-out set of the first training measures it (and ``min_srcc`` guards it). Returns the new
    folder (version = the parent's + 1), cached by parent, images and recipe.

    Raises :class:`RefreshRejected` when the new model's held-out SRCC is below ``min_srcc`` or
    more than ``refresh_max_srcc_drop`` below the parent's: a reward that got worse at ranking
    images it never trained on is not handed to RL (measured 2026-12-01: a refresh with an equal
    share of replay fell from 0.760 to 0.587).

    ``images``, ``references``: uint8 [N, H, W, 3].
    """
    from reward_server.iqa_train import IQATrainingError
    from reward_server.iqa_data import IQAExamples
    from reward_server.iqa_train import HELD_OUT_FILE, REPLAY_FILE, ensure_iqa_model, load_examples, read_card

    t = cfg.reward.iqa_train
    parent = Path(cfg.reward.model_path)  # type: ignore[arg-type]
    card = read_card(parent)
    if card is None or not (parent / HELD_OUT_FILE).is_file():
        raise ValueError(
            f"iterative RL: {parent} is not a model trained by reward_server.iqa_train (no card or held-out set); "
            "it needs reward.model_kind=trained"
        )
    label = label_source(t.label_source)
    quality = np.asarray(label(images, references), dtype=np.float64)
    fresh = IQAExamples(images, quality, ["policy"] * len(images), [f"{run_name}@{iteration}"] * len(images),
                        getattr(label, "name", t.label_source))
    replay = load_examples(parent / REPLAY_FILE) if (parent / REPLAY_FILE).is_file() else None
    held = load_examples(parent / HELD_OUT_FILE)
    h = hashlib.sha256(images.tobytes())
    h.update(references.tobytes())
    data_key = {"parent": card.get("weights_sha256"), "images": h.hexdigest()[:16], "label_source": t.label_source,
                "iteration": iteration, "run": run_name, "replay": t.refresh_replay}

    def make_data():
        parts = [fresh]
        if replay is not None and t.refresh_replay > 0:
            n = min(len(replay), int(round(t.refresh_replay * len(fresh))))
            pick = np.random.default_rng([t.seed, iteration]).choice(len(replay), size=n, replace=False)
            parts.append(replay.select(np.isin(np.arange(len(replay)), pick)))
        return IQAExamples.concat(parts), held

    version = int(card.get("version", 0)) + 1
    t0 = time.perf_counter()
    try:
        folder = ensure_iqa_model(Path(cfg.reward.cache_dir).expanduser().resolve() / "iqa", base_model=parent,
                                  preset=cfg.reward.preset, make_data=make_data, data_key=data_key,
                                  settings=train_settings(t, refresh=True), version=version,
                                  parent=str(parent), check_vllm=cfg.reward.backend == "vllm")
    except IQATrainingError as err:
        raise RefreshRejected(f"v{version}: {str(err)[:200]}") from None
    new_srcc = (read_card(folder) or {}).get("headline", {}).get("srcc")
    old_srcc = card.get("headline", {}).get("srcc")
    if progress:
        print(f"[iqa] refreshed v{version - 1} -> v{version} on {len(images)} policy images "
              f"(mean label {quality.mean():.3f}) in {time.perf_counter() - t0:.0f} s: held-out SRCC "
              f"{old_srcc} -> {new_srcc}", flush=True)
    if new_srcc is not None and old_srcc is not None and new_srcc < old_srcc - t.refresh_max_srcc_drop:
        raise RefreshRejected(
            f"v{version}: held-out SRCC {new_srcc:.4f} is more than refresh_max_srcc_drop "
            f"{t.refresh_max_srcc_drop} below v{version - 1}'s {old_srcc:.4f}"
        )
    return folder


def with_trained_reward(cfg: ExperimentConfig, *, progress: bool = True) -> ExperimentConfig:
    """``cfg`` with a ``model_kind: trained`` reward pointed at its trained folder (``local``);
    any other config is returned unchanged."""
    r = cfg.reward
    if r.backend == "pyiqa" or r.model_kind != "trained":
        return cfg
    folder = ensure_trained_reward(cfg, progress=progress)
    data = cfg.model_dump(mode="json")
    data["reward"]["model_kind"] = "local"
    data["reward"]["model_path"] = str(folder)
    return parse_config(data, source="config with the trained IQA reward")
