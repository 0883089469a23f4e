"""benchmarks/gpu_check.py: its shapes are SD-2.1's, and it runs end to end without Ray or vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_sd21_shapes_are_the_published_model_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from benchmarks.gpu_check import SD21

    with torch.device("meta"):  # shapes only: no memory
        unet = UNet2DConditionModel(**SD21.unet)
        vae = AutoencoderKL(**SD21.vae)
    # Parameter counts of stabilityai/stable-diffusion-2-1-base's unet/ and vae/.
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_cpu_smoke_run_without_ray_or_vllm_keeps_the_bf16_ratio_at_one(tmp_path):
    # The GPU machine has neither Ray nor vLLM: importing either must fail the run.
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['vllm'] = None\n"
        "from benchmarks.gpu_check import main\n"
        f"main(['--shape', 'tiny', '--resolution', '32', '--steps', '4', '--rounds', '2', "
        f"'--workdir', {str(tmp_path)!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    figures = json.loads(lines[-1])  # the JSON object is the last line
    assert figures["benchmark"] == "gpu_check"
    assert figures["batch_trajectories"] == 8
    # bf16 really ran: rollout and learner numerics differ by far more than fp32 rounding ...
    assert figures["bf16_rollout_vs_learner_log_ratio_max"] > 1e-5
    # ... yet the learner's first pass sees a ratio of exactly 1 (issue 14 item 2).
    assert figures["bf16_first_max_abs_log_ratio"] <= 1e-6
    assert figures["bf16_first_clipfrac"] == 0.0
    for key in ("rollout_s_per_batch", "learner_s_per_batch", "rollout_trajectories_per_s_per_gpu",
                "learner_trajectories_per_s_per_gpu", "rollout_gpus_per_learner_gpu"):
        assert figures[key] > 0, key
    assert figures["rollout_gpus_per_learner_gpu"] == figures["rollout_s_per_batch"] / figures["learner_s_per_batch"]
    assert list(tmp_path.iterdir()) == []  # the random model folder is removed
