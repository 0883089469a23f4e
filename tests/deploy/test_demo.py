"""The demo's SFT pre-training cache key (deploy.demo.sft_config)."""

from __future__ import annotations

from common.config import load_config
from deploy.demo import DEMO_CONFIG, sft_config


def _run_name(vae_dir: str) -> str:
    cfg = load_config(DEMO_CONFIG, [f"model.tiny.vae_dir={vae_dir}"])
    return sft_config(cfg).deploy.run_name


def test_sft_cache_key_names_the_vae_not_the_checkout_path(tmp_path):
    a = _run_name(str(tmp_path / "checkout-a" / ".cache" / "tiny_vae" / "vae-581902539732"))
    b = _run_name(str(tmp_path / "elsewhere" / "tiny_vae" / "vae-581902539732"))
    assert a == b  # the same VAE wherever the checkout is: the SFT run is reused
    assert a != _run_name(str(tmp_path / "tiny_vae" / "vae-000000000000"))  # another VAE: another SFT run
    assert a.startswith("sft-")


def test_sft_cache_key_ignores_the_evaluation_split():
    """The test split's size changes what is evaluated, not what is pre-trained: the same SFT run;
    the training pairs do change it."""
    def run_name(*overrides):
        return sft_config(load_config(DEMO_CONFIG, ["model.tiny.vae_dir=/x/vae-581902539732", *overrides])).deploy.run_name

    base = run_name()
    assert run_name("data.num_test=32") == base
    assert run_name("data.num_synthetic=128") != base


def test_iqa_cache_key_reads_the_vae_by_content_not_by_path(tmp_path):
    from deploy.reward_model import iqa_data_key

    def key(folder):
        vae = tmp_path / folder / "vae-581902539732"
        if not vae.exists():
            vae.mkdir(parents=True)
            (vae / "config.json").write_text('{"latent_channels": 4}')
        return iqa_data_key(load_config(DEMO_CONFIG, [f"model.tiny.vae_dir={vae}"]))

    a = key("checkout-a")
    assert a == key("checkout-b")  # same VAE files elsewhere: the trained IQA model is reused
    (tmp_path / "checkout-b" / "vae-581902539732" / "config.json").write_text('{"latent_channels": 8}')
    assert a != key("checkout-b")  # other VAE bytes: another IQA model


def test_paired_gain_summary_by_hand():
    import math

    import pytest

    from deploy.demo import paired_gain_summary

    out = paired_gain_summary([0.0, 0.001, 0.003, 0.005, 0.007])
    assert out["mean_gain"] == pytest.approx(0.0032)
    # deviations from .0032: -3.2, -2.2, -0.2, 1.8, 3.8 (e-3); squares sum 32.8e-6; SD sqrt(32.8e-6 / 4)
    assert out["se"] == pytest.approx(math.sqrt(32.8e-6 / 4) / math.sqrt(5))
    assert out["second_half_n"] == 3 and out["second_half_gain"] == pytest.approx(0.005)
    assert out["second_half_se"] == pytest.approx(0.002 / math.sqrt(3))  # SD of (.003, .005, .007) = .002
    assert out["last_gain"] == pytest.approx(0.007)
    one = paired_gain_summary([0.002])
    assert one["mean_gain"] == 0.002 and math.isnan(one["se"]) and math.isnan(one["second_half_se"])
    with pytest.raises(ValueError, match="non-empty"):
        paired_gain_summary([])


def test_paired_gain_report_writes_base_rewards_json(tmp_path, monkeypatch):
    """The report pairs the run's per-iteration reward with the base's by iteration, writes
    base_rewards.json and draws the figure (the engines and the re-sampling are stubbed out)."""
    import json

    import pytest

    import deploy.compare
    import deploy.figures
    import reward_server.factory
    from deploy.demo import paired_gain_report

    cfg = load_config(DEMO_CONFIG, ["reward.backend=pyiqa", "deploy.iterations=3"])
    rows = [{"iteration": i, "reward/mean": r, "reward_model_index": 0} for i, r in enumerate((0.5, 0.62, 0.71))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(reward_server.factory, "build_scorer_from_config", lambda reward: None)
    monkeypatch.setattr(deploy.compare, "base_reward_curve", lambda rl, n, scorer: ([0, 1, 2], [0.5, 0.6, 0.68]))
    drawn = []
    monkeypatch.setattr(deploy.figures, "reward_curves_figure", lambda *a, **k: drawn.append(a[1]))
    out = paired_gain_report(cfg, tmp_path)
    saved = json.loads((tmp_path / "base_rewards.json").read_text())
    assert saved["gain"] == pytest.approx([0.0, 0.02, 0.03])
    assert out["mean_gain"] == pytest.approx(0.05 / 3) and saved["mean_gain"] == pytest.approx(out["mean_gain"])
    assert out["second_half_n"] == 2 and out["second_half_gain"] == pytest.approx(0.025)
    assert drawn == [tmp_path / "reward_curve_vs_base.png"]
