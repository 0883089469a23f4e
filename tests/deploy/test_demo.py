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
