"""Experiment configuration: one YAML file -> one validated ``ExperimentConfig``.

The config is validated once, at the edge (the driver, a benchmark, a CLI); components receive
plain arguments built from it. Every field carries a description and a unit (``unit`` in its JSON
schema extra; ``"-"`` for dimensionless values and enums).

    cfg = load_config("deploy/configs/demo_cpu.yaml", overrides=["rollout.eta=0.5"])

A bad config raises :class:`ConfigError` whose message names each offending field path, the value
given and what was expected — one readable block, not a traceback (see :func:`main`).

Check a file from the shell::

    python -m common.config --config deploy/configs/demo_cpu.yaml --set rollout.eta=0.5
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.placement import check_custom_resources

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "ModelConfig",
    "TinyModelConfig",
    "DataConfig",
    "RolloutConfig",
    "RewardConfig",
    "AlgorithmConfig",
    "LearnerConfig",
    "WeightSyncConfig",
    "DeployConfig",
    "EvaluationConfig",
    "LoggingConfig",
    "load_config",
    "parse_config",
    "apply_overrides",
    "parse_reward_steps",
]


class ConfigError(ValueError):
    """A config that cannot be used. ``str(err)`` is the message to show the user."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def F(default: Any = ..., *, description: str, unit: str = "-", **kwargs: Any) -> Any:
    """A pydantic ``Field`` that always has a description and a unit."""
    return Field(default, description=description, json_schema_extra={"unit": unit}, **kwargs)


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------- model
class TinyModelConfig(_Section):
    """A tiny seeded diffusion policy built from a config (tests, the CPU demo)."""

    seed: int = F(0, description="Seed of the random initial weights of the tiny policy.")
    block_out_channels: list[int] = F(
        [32, 64], description="UNet/ControlNet channels per resolution level.", unit="channels"
    )
    layers_per_block: int = F(1, description="ResNet layers per UNet block.", ge=1)
    cross_attention_dim: int = F(32, description="Width of the prompt embedding.", unit="channels", ge=8)
    attention_head_dim: int = F(8, description="Width of one attention head.", unit="channels", ge=1)
    latent_channels: int = F(4, description="Channels of the VAE latent.", unit="channels", ge=1)
    vae_block_out_channels: list[int] = F(
        [32, 64], description="VAE channels per level (latent downscale = 2**(levels-1)).", unit="channels"
    )
    text_seq_len: int = F(8, description="Length of the fixed prompt embedding.", unit="tokens", ge=1)
    num_train_timesteps: int = F(1000, description="Training timesteps of the DDIM schedule.", unit="steps", ge=2)
    vae_dir: Path | None = F(
        None,
        description="Trained tiny VAE (a diffusers AutoencoderKL folder, e.g. written by common.tiny.pretrain; "
        "same latent_channels and vae_block_out_channels) used instead of the random one. None: random VAE "
        "(fast tests; its decoder does not reconstruct images).",
        unit="path",
    )


class ModelConfig(_Section):
    """The diffusion restoration policy (DESIGN.md §2.7)."""

    kind: Literal["tiny", "pretrained"] = F(
        "tiny", description="`tiny`: seeded tiny models built from `tiny`; `pretrained`: load `pretrained_dir`."
    )
    pretrained_dir: Path | None = F(
        None,
        description="Local SD-2.1/PASD-style folder (unet/, vae/, scheduler/, text_encoder/, tokenizer/, "
        "optional controlnet/). Never a hub id: nothing downloads at run time.",
        unit="path",
    )
    controlnet_dir: Path | None = F(
        None, description="Local ControlNet folder; default: `<pretrained_dir>/controlnet`, else from the UNet.",
        unit="path",
    )
    init_checkpoint: Path | None = F(
        None,
        description="Trainable weights to start from (e.g. the SFT pre-training checkpoint): a peft LoRA adapter, "
        "a diffusers ControlNet folder, or unet/ + controlnet/ (finetune=full). Becomes the KL reference.",
        unit="path",
    )
    tiny: TinyModelConfig = F(default_factory=TinyModelConfig, description="Tiny model shape (kind=tiny).")
    prediction_type: Literal["epsilon", "v_prediction"] = F(
        "epsilon", description="What the UNet predicts (SD-2.1-768 uses v_prediction)."
    )
    finetune: Literal["lora", "controlnet_full", "full"] = F(
        "lora",
        description="Train LoRA adapters (peft) on the ControlNet, the whole ControlNet (UNet frozen), or `full`: "
        "UNet and ControlNet (SFT pre-training of a policy whose UNet is not a restorer yet).",
    )
    lora_rank: int = F(4, description="LoRA rank r.", unit="rank", ge=1)
    lora_alpha: float = F(4.0, description="LoRA scaling alpha (scale = alpha / r).", gt=0)
    lora_target_modules: list[str] = F(
        ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        description="Module name suffixes of the ControlNet that get LoRA adapters.",
    )
    prompt: str = F("a high quality, sharp, well exposed photo", description="Fixed prompt, embedded once.")
    dtype: Literal["float32", "bfloat16", "float16"] = F(
        "float32", description="Weights dtype of the frozen parts during rollout."
    )

    @model_validator(mode="after")
    def _check_source(self) -> "ModelConfig":
        if self.kind == "pretrained" and self.pretrained_dir is None:
            raise ValueError("kind=pretrained needs `pretrained_dir` (a local folder)")
        if self.kind == "pretrained" and self.tiny.vae_dir is not None:
            raise ValueError("tiny.vae_dir applies to kind=tiny only (kind=pretrained loads `<pretrained_dir>/vae`)")
        return self


# ---------------------------------------------------------------------------------------- data
class DataConfig(_Section):
    """Paired LQ/GT data."""

    kind: Literal["synthetic", "folder"] = F(
        "synthetic",
        description="`synthetic`: real photos shipped in packages with seeded degradations; `folder`: `root`.",
    )
    root: Path | None = F(None, description="Dataset folder (kind=folder).", unit="path")
    layout: Literal["lol", "lq_gt"] = F(
        "lol", description="`lol`: low/ + high/; `lq_gt`: lq/ + gt/; pairs matched by file stem."
    )
    test_root: Path | None = F(None, description="Held-out folder with the same layout (evaluation).", unit="path")
    resolution: int = F(64, description="Side length images are brought to.", unit="px", ge=8)
    resize: Literal["resize", "center_crop", "random_crop"] = F(
        "center_crop",
        description="`resize`: squash to resolution; `center_crop`/`random_crop`: shorter side to resolution, then crop.",
    )
    degradations: list[Literal["low_light", "blur", "rain"]] = F(
        ["low_light"], description="Synthetic degradations, applied in order (kind=synthetic)."
    )
    num_synthetic: int = F(16, description="Synthetic pairs to make (cycled over the photos).", unit="pairs", ge=1)
    num_test: int = F(4, description="Synthetic pairs held out for evaluation.", unit="pairs", ge=0)
    on_bad_file: Literal["skip", "error"] = F(
        "skip", description="Unreadable/truncated/unpaired files: skip with a warning and a counter, or raise."
    )
    seed: int = F(0, description="Seed of the synthetic degradations and of data order.")

    @model_validator(mode="after")
    def _check_root(self) -> "DataConfig":
        if self.kind == "folder" and self.root is None:
            raise ValueError("kind=folder needs `root` (a local folder)")
        return self


# ------------------------------------------------------------------------------------- rollout
class RolloutConfig(_Section):
    """Rollout workers: DDIM-η trajectories with log-probs (DESIGN.md §2.1)."""

    num_workers: int = F(2, description="RolloutWorker actors.", unit="actors", ge=1)
    num_gpus_per_worker: float = F(0.0, description="GPUs per rollout worker (0 on CPU).", unit="GPUs", ge=0)
    num_cpus_per_worker: float = F(1.0, description="CPUs reserved per rollout worker.", unit="CPUs", ge=0)
    custom_resources: dict[str, float] = F(
        {}, description="Extra Ray resources per worker, e.g. {rollout_gpu: 1} to land on a KubeRay worker group.",
        unit="resource units",
    )
    num_inference_steps: int = F(8, description="DDIM steps K per trajectory.", unit="steps", ge=1)
    eta: float = F(1.0, description="DDIM η (0 = deterministic DDIM; RL needs η > 0).", ge=0, le=1)
    samples_per_input: int = F(2, description="Samples G drawn per input image.", unit="samples", ge=1)
    batch_size: int = F(
        8, description="Trajectories per iteration over all workers (a multiple of samples_per_input).",
        unit="trajectories", ge=1,
    )
    seed: int = F(0, description="Base seed of the sampling noise.")
    max_restarts: int = F(
        3, description="Restarts of a dead rollout worker (Ray restarts it; the driver pushes the current weights "
        "and re-sends its chunk: the same trajectories). Also the re-sends allowed per iteration.",
        unit="restarts", ge=0,
    )

    @field_validator("custom_resources")
    @classmethod
    def _check_custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v, "custom_resources")


# -------------------------------------------------------------------------------------- reward
class IQATrainConfig(_Section):
    """Training of the IQA reward model (reward.model_kind=trained; DESIGN.md §3.1) and its refresh
    between RL rounds (paper §6.2.7, Table 6 "with Iter. RL")."""

    base_model: Path | None = F(
        None,
        description="LLaVA-family folder to fine-tune (any folder AutoModelForImageTextToText loads whose preset "
        "level words are single tokens). None: the tiny seeded LLaVA of shape `iqa` (CPU).",
        unit="path",
    )
    steps: int = F(
        400, description="Optimizer steps of the first training (600 was not better on the CPU data).",
        unit="steps", ge=1,
    )
    batch_size: int = F(32, description="Images per optimizer step.", unit="images", ge=1)
    lr: float = F(1e-3, description="Peak AdamW learning rate (warm-up, cosine decay).", unit="1/step", gt=0)
    crops_per_photo: int = F(48, description="Clean crops per IQA training photo.", unit="crops", ge=1)
    degraded_per_crop: int = F(
        3, description="Degraded copies per crop, each a random degradation at a random severity.", unit="images", ge=0
    )
    restored_inputs: int = F(
        96, description="LQ crops restored by the base policy (final output + every step's x̂0 join the data).",
        unit="crops", ge=0,
    )
    held_out_crops_per_photo: int = F(12, description="Crops per held-out photo (metrics only).", unit="crops", ge=1)
    grey_fraction: float = F(
        0.25, description="Share of training images shown in greyscale (exact for luma labels like ssim_y).", ge=0, le=1
    )
    restored_repeat: int = F(
        8, description="Each training epoch shows every base-policy restoration this many times (every other "
        "image once): the restorations are what the step-wise reward ranks (held-out SRCC, seeds 0-2: "
        "0.80, 0.77, 0.77; with 1, seeds 0-1: 0.76, 0.75).", unit="times", ge=1,
    )
    select_every: int = F(
        0, description="Every this many steps score the validation photos (pyiqa's, in neither the training nor "
        "the held-out set) and keep the weights of the step with the best validation SRCC (0: the last step's).",
        unit="steps", ge=0,
    )
    validation_crops_per_photo: int = F(
        4, description="Crops per validation photo (used only with select_every).", unit="crops", ge=1,
    )
    label_source: str = F(
        "ssim_y",
        description="Who rates images: `ssim_y` (SSIM on luma against the clean photo) or `module:function`, "
        "an importable LabelSource (images, references) -> quality in [0, 1].",
    )
    ratings_dir: Path | None = F(
        None, description="Extra user-rated images: a folder with ratings.csv (file,score; score in [1, 5]).",
        unit="path",
    )
    min_srcc: float = F(
        0.6, description="Fail loudly when the served model's held-out SRCC is below this.", ge=-1, le=1
    )
    seed: int = F(0, description="Seed of the crops, degradations, batch order.")
    refresh_every: int = F(
        0, description="Iterative RL: fine-tune the IQA model on the current policy's outputs every N iterations "
        "and roll the reward app over to it (0: never).", unit="iterations", ge=0,
    )
    refresh_steps: int = F(200, description="Optimizer steps of each refresh.", unit="steps", ge=1)
    refresh_images: int = F(
        256, description="Policy images (every reward step's image of the rollouts since the last refresh, evenly "
        "subsampled) labelled against their ground truth for each refresh.", unit="images", ge=1,
    )
    refresh_replay: float = F(
        3.0, description="Replay examples (a seeded random sample of the model's earlier training data) per fresh "
        "policy image in a refresh: keeps the model's range while it learns the policy's outputs.", unit="ratio", ge=0,
    )
    refresh_max_srcc_drop: float = F(
        0.05, description="A refresh whose held-out SRCC falls more than this below its parent's, or below min_srcc, "
        "is rejected: the job keeps scoring with the parent (logged, `reward_refresh_rejected` in metrics.jsonl). "
        "Negative: a refresh must raise the SRCC by at least that much.",
    )
    refresh_tracker: Literal["reset", "keep"] = F(
        "reset",
        description="Reward-tracker history when the reward model changes: `reset` (old and new scores are not "
        "comparable) or `keep`.",
    )

    @field_validator("label_source")
    @classmethod
    def _check_label_source(cls, v: str) -> str:
        if v != "ssim_y" and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError("expected 'ssim_y' or 'module:function'")
        return v


class RewardConfig(_Section):
    """The IQA reward service (DESIGN.md §3). Scaled independently of rollout."""

    backend: Literal["vllm", "transformers", "pyiqa"] = F(
        "vllm", description="Scoring engine: a VLM through vLLM, the same math in transformers, or a pyiqa metric."
    )
    model_kind: Literal["tiny", "local", "trained"] = F(
        "tiny",
        description="`tiny`: a seeded random tiny VLM (scorer tests only: its scores mean nothing); `local`: load "
        "`model_path`; `trained`: the IQA model trained by reward_server.iqa_train (`iqa_train`) on first use, "
        "cached under cache_dir/iqa (the demo's reward).",
    )
    model_path: Path | None = F(None, description="Local folder of the IQA VLM (model_kind=local).", unit="path")
    tiny_seed: int = F(0, description="Seed of the tiny VLM's random weights (model_kind=tiny).")
    cache_dir: Path = F(
        Path(".cache/restore-rl"), description="Where built tiny models are cached (reused across runs).", unit="path"
    )
    preset: Literal["llava", "llava_onevision", "qwen2_vl", "qwen3_5", "text_number"] = F(
        "llava", description="Prompt/level-token preset of the VLM family."
    )
    pyiqa_metric: str = F("piqe", description="pyiqa no-reference metric name (backend=pyiqa).")
    pyiqa_weights: Path | None = F(None, description="Local weights file for learned pyiqa metrics.", unit="path")
    endpoint: str | None = F(
        None, description="URL of an external reward server (http://host:port); None: a Serve app in the job."
    )
    auth_token: str | None = F(None, description="Bearer token for the HTTP API (None: no auth).")
    host: str = F("127.0.0.1", description="Address the standalone HTTP server binds.")
    port: int = F(8710, description="Port of the standalone HTTP server.", unit="port", ge=0, le=65535)
    num_replicas: int = F(1, description="Serve replicas of IQAScorer (ignored with autoscaling).", unit="replicas", ge=1)
    autoscaling: bool = F(False, description="Autoscale replicas between min_replicas and max_replicas.")
    min_replicas: int = F(1, description="Autoscaling lower bound.", unit="replicas", ge=1)
    max_replicas: int = F(4, description="Autoscaling upper bound.", unit="replicas", ge=1)
    target_ongoing_requests: float = F(16.0, description="Autoscaling target per replica.", unit="requests", gt=0)
    num_gpus_per_replica: float = F(0.0, description="GPUs per reward replica.", unit="GPUs", ge=0)
    num_cpus_per_replica: float = F(1.0, description="CPUs per reward replica.", unit="CPUs", ge=0)
    custom_resources: dict[str, float] = F(
        {}, description="Extra Ray resources per replica, e.g. {reward_gpu: 1} (KubeRay worker group).",
        unit="resource units",
    )
    tensor_parallel_size: int = F(1, description="vLLM tensor-parallel size per replica.", unit="GPUs", ge=1)
    max_batch_size: int = F(16, description="Most images per scorer call (both services' batcher).", unit="images", ge=1)
    batch_wait_timeout_s: float = F(
        0.01, description="Longest a batch waits to fill after its first image.", unit="s", ge=0
    )
    adaptive_batch_wait: bool = F(
        True, description="Cut a batch once it holds as many images as were recently outstanding at once "
        "(concurrency 1 never waits); false: wait for a full batch or the timeout (@serve.batch's rule).",
    )
    max_ongoing_requests: int = F(
        64, description="Per-replica request cap (must be >= max_batch_size for full batches).", unit="requests", ge=1
    )
    max_queue: int = F(256, description="HTTP server queue cap before 503 + Retry-After.", unit="requests", ge=1)
    max_images_per_request: int = F(64, description="Images per request cap.", unit="images", ge=1)
    max_image_pixels: int = F(2048 * 2048, description="Pixels per image cap.", unit="px", ge=1)
    max_request_bytes: int = F(256 * 2**20, description="Request body size cap.", unit="bytes", ge=1)
    timeout_s: float = F(60.0, description="Client deadline for one score request, retries included.", unit="s", gt=0)
    max_retries: int = F(3, description="Client retries per request.", unit="retries", ge=0)
    recovery_timeout_s: float = F(
        900.0, description="How much longer than timeout_s a request keeps retrying while the service is unavailable "
        "(a replica died and restarts: a real VLM loads for minutes; nothing listens; 503). Those attempts do not use "
        "up max_retries.", unit="s", ge=0,
    )
    max_invalid_fraction: float = F(
        0.25, description="Share of an iteration's trajectories that may carry an unscorable reward (the model's "
        "answer was NaN or not a number) before the run fails; below it they are masked: dropped from the update, "
        "counted (`reward/masked` in metrics.jsonl, dropped_trajectories_total{reason=unscorable_reward}).",
        ge=0, le=1,
    )
    header_timeout_s: float = F(
        15.0, description="HTTP server: a connection that has not sent a whole request head this long after it "
        "opened (or after its last answer) is closed (slow-header clients).", unit="s", gt=0,
    )
    body_timeout_s: float = F(
        60.0, description="HTTP server: deadline for reading a request body (408 after it). A request holds a "
        "max_queue slot only once its body has arrived.", unit="s", gt=0,
    )
    scorer_stall_s: float = F(
        300.0, description="Watchdog: a scorer call running longer than this turns /healthz to `degraded` (503) on "
        "the HTTP server and fails the Serve replica's health check (Serve replaces it).", unit="s", gt=0,
    )
    vllm_max_model_len: int = F(2048, description="vLLM max_model_len.", unit="tokens", ge=16)
    vllm_gpu_memory_utilization: float = F(
        0.9, description="vLLM memory fraction (on CPU: of host RAM; keep small).", gt=0, le=1
    )
    dtype: Literal["float32", "bfloat16", "float16"] = F("bfloat16", description="VLM weights dtype.")
    iqa_train: IQATrainConfig = F(default_factory=IQATrainConfig, description="IQA model training and refresh.")

    @field_validator("custom_resources")
    @classmethod
    def _check_custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v, "custom_resources")

    @model_validator(mode="after")
    def _check(self) -> "RewardConfig":
        if self.backend in ("vllm", "transformers") and self.model_kind == "local" and self.model_path is None:
            raise ValueError("model_kind=local needs `model_path`")
        if self.backend in ("vllm", "transformers") and self.model_kind == "trained" and self.iqa_train.base_model is None \
                and self.preset != "llava":
            raise ValueError(f"model_kind=trained without iqa_train.base_model trains the tiny LLaVA: preset must be "
                             f"'llava', got {self.preset!r}")
        if self.backend == "pyiqa" and self.iqa_train.refresh_every:
            raise ValueError("iqa_train.refresh_every needs a VLM reward (backend vllm/transformers, model_kind=trained)")
        if self.backend in ("vllm", "transformers") and self.model_kind == "tiny" and self.preset != "llava":
            raise ValueError(f"model_kind=tiny builds a LLaVA-style VLM: preset must be 'llava', got {self.preset!r}")
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): "
                "batches could never fill"
            )
        return self


# ----------------------------------------------------------------------------------- algorithm
_REWARD_STEPS = re.compile(r"^(all|last|every:([1-9][0-9]*))$")


def parse_reward_steps(spec: str, num_steps: int) -> list[int]:
    """Indices (0-based, in sampling order) of the denoising steps whose x̂0 is rewarded (§2.3).

    ``all`` -> every step; ``every:k`` -> steps k-1, 2k-1, ... and always the last; ``last`` -> [K-1].
    """
    m = _REWARD_STEPS.match(spec)
    if m is None:
        raise ValueError(f"reward_steps {spec!r}: expected 'all', 'last' or 'every:k' with k >= 1")
    if spec == "all":
        return list(range(num_steps))
    if spec == "last":
        return [num_steps - 1]
    k = int(m.group(2))
    steps = list(range(k - 1, num_steps, k))
    if not steps or steps[-1] != num_steps - 1:
        steps.append(num_steps - 1)
    return steps


class AlgorithmConfig(_Section):
    """Difficulty-adaptive PPO/SFT (DESIGN.md §2.2-§2.6; paper §4.2)."""

    mode: Literal["adaptive", "no_weights", "sft_only", "rl_only", "sft"] = F(
        "adaptive",
        description="`adaptive` (paper: Original), `no_weights` (w/o w_i), `sft_only` (+Diff.SFT), `rl_only`, "
        "`sft` (uniform SFT pre-training, no rollout).",
    )
    reward: Literal["iqa", "reconstruction"] = F(
        "iqa", description="`iqa`: the reward service; `reconstruction`: -||x̂0 - g|| (ablation 'with Rec.')."
    )
    reward_steps: str = F("all", description="Rewarded steps: `all`, `every:k`, `last` (ablation 'Reward x0').")
    policy_target: Literal["enhanced", "standard"] = F(
        "enhanced", description="Action mean from a refined x̂0 (paper 'Original') or the plain DDIM step ('with x_{t-1}')."
    )
    step_reward: Literal["absolute", "increment"] = F(
        "increment",
        description="`absolute`: each rewarded step's own score r_k (the paper); `increment` (default): r_k minus the "
        "previous rewarded step's score (the first keeps r_k) - not in the paper, a variance reduction: the noise "
        "x_T and earlier actions drop out of each step's advantage (measured, issue 12: gradient signal fraction "
        "~0 -> 0.07-0.10 at 16 trajectories; paired gain 4.6x).",
    )
    advantage_norm: Literal["track+batch", "track", "track+whole_batch"] = F(
        "track+batch",
        description="Where μ, σ of A = (r - μ)/σ come from, per (input, step): `track+batch` the input's history plus "
        "its samples of this batch (DDPO's per-prompt tracker), `track` the history only ('Norm. from track'), "
        "`track+whole_batch` the input's history pooled with the whole batch at that step (the paper's other reading).",
    )
    adv_std: Literal["group", "step", "batch"] = F(
        "batch",
        description="Which σ divides: `group` the σ of the same pool as μ (the paper, DDPO); `step` one σ per step for the whole batch "
        "(RMS of r - μ_input over all samples at that step): a normalisation across inputs, so near-equal rewards of "
        "one input are not blown up to full-size advantages; `batch` (default) one σ for the whole batch over every "
        "step too, so a step whose action barely moves the reward keeps small advantages (measured, issue 12: 1.7x "
        "the paired gain of `group` with step_reward=increment).",
    )
    adv_std_floor: float = F(
        0.0, description="Floor under σ of the advantage normalisation (0: none).", unit="reward units", ge=0
    )
    buffer_size: int = F(32, description="Rewards kept per (input, step) in the tracker.", unit="rewards", ge=1)
    min_count: int = F(4, description="Below this many rewards, use the batch's statistics.", unit="rewards", ge=1)
    adv_clip: float = F(5.0, description="Advantages clipped to ±adv_clip.", unit="std", gt=0)
    clip_range: float = F(1e-4, description="PPO ratio clip ε (log-probs are per-element means).", gt=0)
    kl_coef: float = F(0.01, description="β_KL, weight of the KL to the reference policy.", ge=0)
    timestep_fraction: float = F(1.0, description="Fraction of the K steps trained per trajectory.", gt=0, le=1)

    @field_validator("reward_steps")
    @classmethod
    def _check_reward_steps(cls, v: str) -> str:
        if _REWARD_STEPS.match(v) is None:
            raise ValueError("expected 'all', 'last' or 'every:k' with k >= 1")
        return v

    @property
    def uses_rl(self) -> bool:
        return self.mode in ("adaptive", "no_weights", "rl_only")

    @property
    def uses_rollout(self) -> bool:
        return self.mode != "sft"


# ------------------------------------------------------------------------------------- learner
class LearnerConfig(_Section):
    """Learner actors (DESIGN.md §2.6)."""

    num_learners: int = F(1, description="Data-parallel learner actors.", unit="actors", ge=1)
    num_gpus_per_learner: float = F(0.0, description="GPUs per learner.", unit="GPUs", ge=0)
    num_cpus_per_learner: float = F(1.0, description="CPUs per learner.", unit="CPUs", ge=0)
    custom_resources: dict[str, float] = F(
        {}, description="Extra Ray resources per learner, e.g. {learner_gpu: 1} (KubeRay worker group).",
        unit="resource units",
    )
    lr: float = F(1e-4, description="AdamW learning rate.", unit="1/step", gt=0)
    weight_decay: float = F(1e-4, description="AdamW weight decay.", ge=0)
    adam_betas: tuple[float, float] = F((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = F(1e-8, description="AdamW epsilon.", gt=0)
    max_grad_norm: float = F(1.0, description="Gradient-norm clip.", gt=0)
    micro_batch_size: int = F(4, description="Samples per forward/backward (gradient accumulation).", unit="samples", ge=1)
    ppo_epochs: int = F(1, description="Passes over each rollout batch.", unit="epochs", ge=1)
    recompute_old_log_prob: bool = F(
        True, description="When the learner holds the weights that sampled the batch (synchronous schedule), log "
        "pi_old is the learner's own log-prob before its first optimizer step, so the PPO ratio before any update is "
        "exactly 1 in bf16 as in fp32 (with clip 1e-4, a rollout/learner mismatch of 1e-4 would silently drop the "
        "gradient). The rollout's log-probs are then only compared: learner/rollout_log_ratio_max, "
        "learner/rollout_clipfrac (warned above 5%). A stale batch always uses the rollout's.",
    )
    precision: Literal["fp32", "bf16"] = F("fp32", description="Autocast precision of the update.")
    sft_steps: int = F(
        600, description="Optimizer steps of plain SFT pre-training (mode=sft; the demo's starting policy).",
        unit="steps", ge=1,
    )
    seed: int = F(0, description="Seed of SFT noise/timesteps and data order.")

    @field_validator("custom_resources")
    @classmethod
    def _check_custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_custom_resources(v, "custom_resources")


# -------------------------------------------------------------------------------------- deploy
class WeightSyncConfig(_Section):
    """Learner -> rollout weight broadcast (DESIGN.md §4)."""

    method: Literal["collective", "object_store", "auto"] = F(
        "auto", description="ray.util.collective broadcast, ray.put of the state dict, or chosen by size."
    )
    bucket_mb: float = F(64.0, description="Flattened bucket size for collective broadcast.", unit="MiB", gt=0)
    timeout_s: float = F(60.0, description="Hard timeout of one sync.", unit="s", gt=0)


class DeployConfig(_Section):
    """The Ray job: cluster, schedule, checkpoints (DESIGN.md §1, §6)."""

    ray_address: str = F("local", description="`local` (start one), `auto` (existing cluster) or an address.")
    node_ip_address: str = F("127.0.0.2", description="Node IP of a local Ray (loopback keeps traffic local).")
    namespace: str = F("restore-rl", description="Ray namespace of the job's actors.")
    run_name: str = F("demo", description="Run name; outputs go to <output_dir>/<run_name>/.")
    output_dir: Path = F(Path("runs"), description="Folder of run outputs.", unit="path")
    iterations: int = F(4, description="Training iterations (rollout -> update -> sync).", unit="iterations", ge=1)
    max_staleness: int = F(
        0, description="Async: max learner_version - trajectory version (0 = synchronous).", unit="versions", ge=0
    )
    checkpoint_every: int = F(1, description="Checkpoint period.", unit="iterations", ge=1)
    keep_checkpoints: int = F(3, description="Checkpoints kept (older ones deleted).", unit="checkpoints", ge=1)
    stop_timeout_s: float = F(
        300.0, description="After a stop request (SIGTERM, `ray job stop`): how long the driver waits for the "
        "iteration in flight and its checkpoint before it exits without them. `ray job stop` itself kills the "
        "driver after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s) - raise that to let the checkpoint finish.",
        unit="s", gt=0,
    )
    max_restarts: int = F(
        2, description="Self-healing: when a learner dies (or any actor outside the rollout re-send path), the "
        "driver rebuilds the job's actors and resumes from the newest valid checkpoint, at most this many times per "
        "run (iterations since that checkpoint are redone, never repeated in metrics.jsonl).",
        unit="restarts", ge=0,
    )
    weight_sync: WeightSyncConfig = F(default_factory=WeightSyncConfig, description="Weight sync settings.")

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("expected letters, digits, '_', '.', '-' (a folder name)")
        return v


class EvaluationConfig(_Section):
    """The inference sampler of every evaluation (``deploy.evaluate``, the compare tool): one
    sampler for every arm, Base included, so an ablation that changes the *training* action
    target (e.g. 'with x_{t-1}') is not also a change of the sampler it is measured with."""

    num_inference_steps: int | None = F(
        None, description="DDIM steps K at evaluation (None: rollout.num_inference_steps).", unit="steps", ge=1
    )
    eta: float | None = F(None, description="DDIM η at evaluation (None: rollout.eta).", ge=0, le=1)
    policy_target: Literal["enhanced", "standard"] = F(
        "standard",
        description="Step of the evaluation sampler: `standard` the plain DDIM step (the base model's own "
        "sampler), `enhanced` the refined-x̂0 step that algorithm.policy_target=enhanced trains.",
    )


class LoggingConfig(_Section):
    """Logs, metrics files, progress bars."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = F("INFO", description="Log level.")
    progress: bool = F(True, description="Show progress bars.")
    metrics_jsonl: bool = F(True, description="Write metrics.jsonl in the run folder.")
    sample_grid_every: int = F(0, description="Save a sample grid every N iterations (0: first and last only).", unit="iterations", ge=0)


# ---------------------------------------------------------------------------------- experiment
class ExperimentConfig(_Section):
    """The whole experiment. Sections mirror the roles of DESIGN.md §1."""

    model: ModelConfig = F(default_factory=ModelConfig, description="Diffusion policy.")
    data: DataConfig = F(default_factory=DataConfig, description="Paired LQ/GT data.")
    rollout: RolloutConfig = F(default_factory=RolloutConfig, description="Rollout workers.")
    reward: RewardConfig = F(default_factory=RewardConfig, description="IQA reward service.")
    algorithm: AlgorithmConfig = F(default_factory=AlgorithmConfig, description="The training algorithm.")
    learner: LearnerConfig = F(default_factory=LearnerConfig, description="Learner actors.")
    deploy: DeployConfig = F(default_factory=DeployConfig, description="Ray job and schedule.")
    evaluation: EvaluationConfig = F(
        default_factory=EvaluationConfig, description="The evaluation sampler (the same for every arm)."
    )
    logging: LoggingConfig = F(default_factory=LoggingConfig, description="Logging and outputs.")

    @model_validator(mode="after")
    def _cross_field(self) -> "ExperimentConfig":
        problems: list[str] = []
        algo, ro = self.algorithm, self.rollout
        if algo.uses_rl and ro.eta == 0:
            problems.append(
                f"rollout.eta: got 0.0; expected > 0 when algorithm.mode={algo.mode!r} trains with RL "
                "(η = 0 makes every step deterministic: no log-probs to train on)"
            )
        if ro.batch_size % ro.samples_per_input != 0:
            problems.append(
                f"rollout.batch_size: got {ro.batch_size}; expected a multiple of "
                f"rollout.samples_per_input ({ro.samples_per_input})"
            )
        latent_scale = 2 ** (len(self.model.tiny.vae_block_out_channels) - 1) * 2 ** (
            len(self.model.tiny.block_out_channels) - 1
        )
        if self.model.kind == "tiny" and self.data.resolution % latent_scale != 0:
            problems.append(
                f"data.resolution: got {self.data.resolution}; expected a multiple of {latent_scale} "
                "(the tiny VAE and UNet downsampling factors)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------- load/parse
def _format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key (got {e['input']!r}); check the spelling against the config reference")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        elif loc == "" and ";" in msg:
            lines.extend(m.strip() for m in msg.split(";"))
        else:
            where = loc or "config"
            got = e.get("input")
            shown = got if not isinstance(got, dict) else "{...}"
            lines.append(f"{where}: {msg} (got {shown!r})")
    return lines


def parse_config(data: dict[str, Any] | None, *, source: str = "config") -> ExperimentConfig:
    """Validate a plain dict. Raises :class:`ConfigError` naming every bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        problems = _format_validation_error(err)
        raise ConfigError(f"invalid {source}:\n" + "\n".join(f"  - {p}" for p in problems), problems) from None


def _parse_value(text: str) -> Any:
    # YAML scalars: `0.3` -> float, `true` -> bool, `[a, b]` -> list, `null` -> None, else str.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (returns a new dict; types checked on validation).

    The path must name an existing field of :class:`ExperimentConfig`; the value is parsed as YAML.
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. rollout.eta=0.5")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        model: type[BaseModel] = ExperimentConfig
        for i, part in enumerate(parts):
            fields = model.model_fields
            if part not in fields:
                prefix = ".".join(parts[:i]) or "the top level"
                raise ConfigError(
                    f"--set {key}: {'.'.join(parts[: i + 1])} is not a field of {prefix} "
                    f"(expected one of: {', '.join(fields)})"
                )
            ann = fields[part].annotation
            if i < len(parts) - 1:
                if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
                model = ann
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {part} is not a section in the loaded config")
            node = nxt
        node[parts[-1]] = _parse_value(raw)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load YAML (or the defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    data: dict[str, Any] = {}
    source = "default config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with --set " + " ".join(overrides)
    return parse_config(data, source=source)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="experiment YAML (default: built-in defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set rollout.eta=0.5 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """``load_config`` for a CLI: on a bad config print the message and exit 2 (no traceback)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _type_name(ann: Any) -> str:
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if args:
        inner = ", ".join(_type_name(a) for a in args)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            return " or ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def config_reference() -> str:
    """The config reference as a markdown table per section (docs/config.md is generated from it)."""
    lines = ["# Config reference", "", "Generated by `python -m common.config --reference`; do not edit by hand.", ""]

    def section(model: type[BaseModel], prefix: str) -> None:
        rows, subsections = [], []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subsections.append((ann, f"{prefix}{name}."))
                continue
            default = f.default_factory() if f.default_factory is not None else f.default
            default = "required" if default is ... else f"`{default}`"
            typ = _type_name(ann)
            unit = (f.json_schema_extra or {}).get("unit", "-")
            desc = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {typ} | {default} | {unit} | {desc} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", (model.__doc__ or "").strip(), "",
                          "| field | type | default | unit | description |", "| --- | --- | --- | --- | --- |",
                          *rows, ""])
        for sub, p in subsections:
            section(sub, p)

    section(ExperimentConfig, "")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.config", description="Validate and print a config.")
    add_config_args(parser)
    parser.add_argument("--reference", action="store_true", help="print the config reference (markdown) and exit")
    args = parser.parse_args(argv)
    if args.reference:
        print(config_reference())
        return 0
    cfg = config_from_args(args)
    print(cfg.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
