"""The GPU check (issue 14, item 3): rollout and learner at real shapes, in one process, no Ray.

    python -m benchmarks.gpu_check                       # SD-2.1-base shapes, 512 px, K = 20, bf16
    python -m benchmarks.gpu_check --shape tiny --resolution 32 --steps 4   # the CPU smoke run

What a first cluster run would otherwise find out the hard way, measured on one GPU with the
project's own code paths and random weights at the real shapes:

* the model folder: a random SD-2.1-base UNet (865 M parameters), VAE and a ControlNet copied from
  the UNet, saved in the layout ``model.kind: pretrained`` loads (bf16 safetensors, a saved prompt
  embedding instead of the 340 M-parameter text encoder, whose only job is one embedding);
* the rollout: :func:`rollout.sampler.sample_trajectories` with the GPU config's settings
  (``deploy/configs/pasd_lol_gpu.yaml``: bf16 frozen parts, LoRA r = 16, K = 20, η = 1, G = 4,
  the step-wise reward's x̂0 decoded at every step), timed after a warm-up, beside the same
  rollout that decodes only the last step (the decode share of the step-wise reward);
* the learner: :class:`learner.learner.Learner` (bf16 autocast, the adaptive PPO + SFT + KL update
  with the reconstruction reward, since the IQA model needs vLLM) on that batch; its first pass's
  max |log ρ| (issue 14 item 2: exactly 0 when the learner recomputes π_old) and clipfrac, and
  the rollout-vs-learner log-prob mismatch it would have had without the recompute;
* peak GPU memory of each role, trajectories/s per GPU of each, and the ratio that sizes a
  cluster: rollout GPUs per learner GPU = rollout seconds per batch / learner seconds per batch.

The GPU machine has torch, transformers, peft and accelerate but not Ray, vLLM, diffusers or
pydantic: this module imports neither Ray nor vLLM (tested), and diffusers + pydantic travel as
wheels (README "Running on a GPU cluster"). What it cannot check — NCCL weight sync and data
parallel across GPUs, vLLM on CUDA — is listed there as not measured. Headline figures are ratios
and per-GPU rates; the last line is the JSON object (DESIGN.md §8).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import emit, print_table


@dataclass(frozen=True)
class Shapes:
    """Model shapes of one check (diffusers config arguments)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    prompt_len: int


# SD-2.1-base (512 px, epsilon): the published unet/ and vae/ configs' shape arguments.
SD21 = Shapes(
    unet={
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    },
    vae={
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
        "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215,
    },
    prompt_len=77,
)

# The same architecture classes at a size a CPU runs in seconds (the smoke test's shape).
TINY = Shapes(
    unet={
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 8,
        "norm_num_groups": 8, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    },
    vae={
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "sample_size": 32,
        "block_out_channels": (16, 32), "norm_num_groups": 8,
        "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    },
    prompt_len=8,
)

SHAPES = {"sd21": SD21, "tiny": TINY}


def write_random_model(root: Path, shapes: Shapes, *, seed: int = 0) -> dict[str, int]:
    """Save random UNet / VAE / ControlNet / DDIM / prompt embedding in the pretrained layout.

    The ControlNet is copied from the UNet (as PASD/DiffBIR start) and its zero-initialised
    convolutions get small random weights, so that LoRA alone trains it, as with a trained
    ControlNet. Weights are saved in bf16 (the rollout's dtype; the learner loads them as fp32).
    Returns parameter counts.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    from common.controlnet_policy import cond_embedding_channels
    from common.policy import PROMPT_EMBEDS_FILE

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**shapes.unet)
    vae = AutoencoderKL(**shapes.vae)
    vae_scale = 2 ** (len(shapes.vae["block_out_channels"]) - 1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_embedding_channels(vae_scale))
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if ("zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name
                    or "conv_out" in name) and not p.any():
                p.normal_(0.0, 1e-3)
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  prediction_type="epsilon").save_pretrained(root / "scheduler")
    counts = {}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the bf16 cast's "keep in float32" notice: none are
    try:
        for name, module in (("unet", unet), ("vae", vae), ("controlnet", controlnet)):
            counts[name] = sum(p.numel() for p in module.parameters())
            module.to(torch.bfloat16).save_pretrained(root / name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    embeds = torch.randn(1, shapes.prompt_len, shapes.unet["cross_attention_dim"]) * 0.5
    save_file({"prompt_embeds": embeds.contiguous()}, str(root / PROMPT_EMBEDS_FILE))
    return counts


def write_pairs(root: Path, n: int, resolution: int, *, seed: int = 0) -> None:
    """``n`` smooth random GT images and low-light noisy LQ copies in the ``lq_gt`` layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "lq").mkdir(parents=True)
    (root / "gt").mkdir(parents=True)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        gt = np.asarray(Image.fromarray(coarse).resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
        lq = np.clip(gt * 0.25 + rng.normal(0, 6, size=gt.shape), 0, 255)
        Image.fromarray(gt.astype(np.uint8)).save(root / "gt" / f"{i:03d}.png")
        Image.fromarray(lq.astype(np.uint8)).save(root / "lq" / f"{i:03d}.png")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sd21")
    ap.add_argument("--resolution", type=int, default=None, help="default: 512 (sd21), 32 (tiny)")
    ap.add_argument("--steps", type=int, default=20, help="K denoising steps")
    ap.add_argument("--inputs", type=int, default=2, help="inputs per rollout batch")
    ap.add_argument("--samples", type=int, default=4, help="G samples per input")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--timestep-fraction", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2, help="timed rollouts per variant (after one warm-up)")
    ap.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="where the random model is written (default: a temp dir)")
    args = ap.parse_args(argv)

    from common.config import AlgorithmConfig, DataConfig, LearnerConfig, ModelConfig
    from learner.learner import Learner
    from rollout.sampler import SamplerSettings, sample_trajectories

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    resolution = args.resolution or (512 if args.shape == "sd21" else 32)
    shapes = SHAPES[args.shape]
    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    root = Path(tmp.name)
    figures: dict[str, Any] = {"shape": args.shape, "resolution": resolution, "num_inference_steps": args.steps,
                               "batch_trajectories": args.inputs * args.samples, "device": str(device),
                               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    t0 = time.perf_counter()
    counts = write_random_model(root / "model", shapes)
    write_pairs(root / "data", args.inputs, resolution)
    figures["setup_s"] = time.perf_counter() - t0
    figures.update({f"{k}_params_m": v / 1e6 for k, v in counts.items()})

    model_cfg = ModelConfig(kind="pretrained", pretrained_dir=root / "model", prediction_type="epsilon",
                            finetune="lora", lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank),
                            dtype="bfloat16")
    data_cfg = DataConfig(kind="folder", root=root / "data", layout="lq_gt", resolution=resolution, resize="resize")
    from common.data import build_dataset

    dataset = build_dataset(data_cfg, "train")
    control = np.stack([dataset[i].lq for i in range(args.inputs)])
    ids = list(range(args.inputs))

    # -- rollout -------------------------------------------------------------------------------
    from common.policy import build_policy

    _reset_peak(device)
    policy = build_policy(model_cfg, resolution).to(device).eval()
    variants = {
        "all": SamplerSettings(num_inference_steps=args.steps, eta=1.0, samples_per_input=args.samples,
                               reward_steps="all", policy_target="enhanced"),
        "last": SamplerSettings(num_inference_steps=args.steps, eta=1.0, samples_per_input=args.samples,
                                reward_steps="last", policy_target="enhanced"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    traj = None
    with torch.no_grad():
        sample_trajectories(policy, control, ids, variants["all"], policy_version=0, seed=1)  # warm-up
        for r in range(args.rounds):
            for name, settings in variants.items():  # interleaved: drift hits both alike
                _sync(device)
                t = time.perf_counter()
                out = sample_trajectories(policy, control, ids, settings, policy_version=0, seed=0, round_index=r)
                _sync(device)
                times[name].append(time.perf_counter() - t)
                if name == "all" and r == 0:
                    traj = out
    assert traj is not None
    figures["rollout_peak_gib"] = _peak_gib(device)
    rollout_s = statistics.median(times["all"])
    last_s = statistics.median(times["last"])
    B = traj.batch_size
    figures.update(
        rollout_s_per_batch=rollout_s,
        rollout_step_s=rollout_s / args.steps,
        rollout_trajectories_per_s_per_gpu=B / rollout_s,
        rollout_last_step_reward_s_per_batch=last_s,
        reward_decode_share=1.0 - last_s / rollout_s,
        trajectory_mib=traj.nbytes / 2**20,
    )
    del policy
    gc.collect()

    # -- learner -------------------------------------------------------------------------------
    _reset_peak(device)
    algorithm = AlgorithmConfig(mode="adaptive", reward="reconstruction", reward_steps="all", policy_target="enhanced",
                                clip_range=1e-4, kl_coef=0.01, timestep_fraction=args.timestep_fraction)
    learner_cfg = LearnerConfig(precision="bf16", micro_batch_size=args.micro_batch, lr=3e-5,
                                num_gpus_per_learner=1.0 if device.type == "cuda" else 0.0)
    learner = Learner(model_cfg, data_cfg, algorithm, learner_cfg, device=device)
    _sync(device)
    t = time.perf_counter()
    first = learner.update(traj)  # the learner holds version 0: π_old recomputed in its numerics
    _sync(device)
    first_s = time.perf_counter() - t
    steady = []
    for _ in range(max(1, args.rounds - 1)):
        _sync(device)
        t = time.perf_counter()
        later = learner.update(traj)  # a stale batch now (version 0 < learner's): rollout π_old
        _sync(device)
        steady.append(time.perf_counter() - t)
    learner_s = statistics.median(steady)
    figures["learner_peak_gib"] = _peak_gib(device)
    bad = {k: v for k, v in later.items() if k.startswith("losses/") and not math.isfinite(float(v))}
    if bad:
        raise RuntimeError(f"gpu check: non-finite losses after the second update: {bad}")
    figures.update(
        learner_first_update_s=first_s,
        learner_s_per_batch=learner_s,
        learner_trajectories_per_s_per_gpu=B / learner_s,
        rollout_gpus_per_learner_gpu=rollout_s / learner_s,
        bf16_first_max_abs_log_ratio=float(first["losses/first_max_abs_log_ratio"]),
        bf16_first_clipfrac=float(first["losses/clipfrac"]),
        bf16_rollout_vs_learner_log_ratio_max=float(first.get("learner/rollout_log_ratio_max", float("nan"))),
        bf16_rollout_vs_learner_clipfrac=float(first.get("learner/rollout_clipfrac", float("nan"))),
        trained_timesteps_per_trajectory=round(args.steps * args.timestep_fraction),
    )
    tmp.cleanup()

    print_table(
        f"GPU check: {args.shape} at {resolution} px, K={args.steps}, {B} trajectories, {figures['device_name']}",
        [
            ("rollout (step-wise reward: x̂0 decoded every step)", _fmt(rollout_s, ".2f"),
             _fmt(B / rollout_s, ".2f"), _fmt(figures["rollout_peak_gib"], ".1f")),
            ("rollout (last step decoded only)", _fmt(last_s, ".2f"), _fmt(B / last_s, ".2f"), ""),
            ("learner update (bf16 autocast, adaptive)", _fmt(learner_s, ".2f"), _fmt(B / learner_s, ".2f"),
             _fmt(figures["learner_peak_gib"], ".1f")),
        ],
        ("role", "s / batch", "trajectories / s", "peak GiB"),
    )
    print(f"\nrollout GPUs per learner GPU: {rollout_s / learner_s:.2f}   "
          f"decode share of the step-wise reward: {figures['reward_decode_share']:.2f}")
    print(f"first pass max |log ρ|: {figures['bf16_first_max_abs_log_ratio']:.2e} (clipfrac "
          f"{figures['bf16_first_clipfrac']:.3f}); rollout vs learner without the recompute: max "
          f"{figures['bf16_rollout_vs_learner_log_ratio_max']:.2e}, clipfrac "
          f"{figures['bf16_rollout_vs_learner_clipfrac']:.3f}")
    emit("gpu_check", figures)
    return figures


if __name__ == "__main__":
    main()
