"""Tiny-VAE pre-training (the CPU demo's autoencoder): it learns to reconstruct held-out photos,
is cached by its arguments, loads into the tiny policy via ``model.tiny.vae_dir``; config checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import ConfigError, ModelConfig, TinyModelConfig, parse_config
from common.data import TEST_PHOTOS, TRAIN_PHOTOS, SyntheticRestorationDataset
from common.policy import PolicyLoadError, build_policy
from common.tiny.policy import build_tiny_policy, tiny_vae
from common.tiny.pretrain import (
    INFO_FILE,
    VAEPretrainSettings,
    ensure_tiny_vae,
    photo_crops,
    reconstruction_psnr,
    tiny_vae_dir,
    train_tiny_vae,
)

RES = 32
#: A few seconds on 2 CPU cores (the demo's recipe runs 250 steps of 16 crops of 32 px).
QUICK = VAEPretrainSettings(steps=40, batch_size=8, crop=16, lr=3e-3)


def _held_out(n: int = 6) -> np.ndarray:
    """uint8 [n, RES, RES, 3]: ground truths of the test split (photos never used for training)."""
    return np.stack([p.gt for p in SyntheticRestorationDataset(n, RES, split="test")])


def test_train_and_test_photos_are_disjoint():
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)


def test_photo_crops_shape_range_and_seed():
    photos = [np.full((80, 120, 3), 200, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    a = photo_crops(photos, 5, np.random.default_rng(0), resolution=RES, crop=16)
    b = photo_crops(photos, 5, np.random.default_rng(0), resolution=RES, crop=16)
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    with pytest.raises(ValueError, match="crop"):
        photo_crops(photos, 1, np.random.default_rng(0), resolution=16, crop=32)


def test_pretraining_improves_held_out_reconstruction():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = tiny_vae(RES)
    held_out = _held_out()
    before = reconstruction_psnr(vae, held_out)
    losses = train_tiny_vae(vae, QUICK, resolution=RES, seed=0, log_every=0)
    after = reconstruction_psnr(vae, held_out)
    assert len(losses) == QUICK.steps and np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    assert after > before + 3.0, (before, after)
    # Scaled latents (z − shift) · scaling_factor have about unit variance, as the schedule assumes.
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(held_out).permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean
    scaled = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert 0.5 < float(scaled.std()) < 2.0 and abs(float(scaled.mean())) < 0.5


def test_ensure_tiny_vae_caches_and_the_policy_loads_it(tmp_path, monkeypatch):
    quick = VAEPretrainSettings(steps=2, batch_size=2, crop=16)
    d = ensure_tiny_vae(tmp_path, seed=1, resolution=RES, settings=quick)
    assert d == tiny_vae_dir(tmp_path, seed=1, resolution=RES, settings=quick)
    info = json.loads((d / INFO_FILE).read_text())
    assert info["settings"]["steps"] == 2 and "psnr_held_out_after_db" in info
    assert not list(tmp_path.glob("*.tmp-*"))  # written to a temporary folder, then renamed

    import common.tiny.pretrain as tp

    monkeypatch.setattr(tp, "train_tiny_vae", lambda *a, **k: pytest.fail("retrained a cached VAE"))
    assert ensure_tiny_vae(tmp_path, seed=1, resolution=RES, settings=quick) == d
    # Another seed, shape or recipe is another folder.
    assert tiny_vae_dir(tmp_path, seed=2, resolution=RES, settings=quick) != d
    assert tiny_vae_dir(tmp_path, seed=1, resolution=RES, settings=QUICK) != d

    p = build_policy(ModelConfig(kind="tiny", tiny=TinyModelConfig(seed=1, vae_dir=d)), RES)
    from diffusers import AutoencoderKL

    saved = AutoencoderKL.from_pretrained(d)
    assert all(torch.equal(v, p.vae.state_dict()[k]) for k, v in saved.state_dict().items())
    assert p.vae.config.scaling_factor == info["scaling_factor"]
    # Only the VAE differs from the random build: UNet and ControlNet are the same seeded weights.
    r = build_tiny_policy(RES, seed=1)
    assert all(torch.equal(v, r.unet.state_dict()[k]) for k, v in p.unet.state_dict().items())
    assert not torch.equal(p.vae.decoder.conv_out.weight, r.vae.decoder.conv_out.weight)

    with pytest.raises(
        PolicyLoadError, match="vae_dir .*latent_channels 4.*expects latent_channels 8"
    ):
        build_tiny_policy(RES, latent_channels=8, vae_dir=d)
    with pytest.raises(PolicyLoadError, match="missing folder"):
        build_tiny_policy(RES, vae_dir=tmp_path / "nope")


def test_config_fields_for_full_finetune_and_the_tiny_vae(tmp_path):
    assert ModelConfig(finetune="full").finetune == "full"
    assert TinyModelConfig().vae_dir is None  # tests stay on the fast random VAE
    with pytest.raises(ConfigError, match="model.finetune"):
        parse_config({"model": {"finetune": "unet"}})
    with pytest.raises(ConfigError, match="tiny.vae_dir applies to kind=tiny"):
        parse_config(
            {
                "model": {
                    "kind": "pretrained",
                    "pretrained_dir": str(tmp_path),
                    "tiny": {"vae_dir": str(tmp_path)},
                }
            }
        )
    cfg = parse_config({"model": {"tiny": {"vae_dir": str(tmp_path)}}})
    assert cfg.model.tiny.vae_dir == tmp_path
