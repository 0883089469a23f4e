"""Learner checkpoints: atomic saves, discovery, pruning, corruption, and LoRA weights that
load with plain peft + diffusers (no code of this project)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from common.config import AlgorithmConfig, LearnerConfig, ModelConfig
from learner import checkpoint as ckpt
from learner.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    resolve_resume,
)
from learner.learner import Learner

MODEL = ModelConfig(kind="tiny")


@pytest.fixture(scope="module")
def trained(tiny_data_config, tiny_trajectory):
    """A learner after one update (LoRA B ≠ 0, optimizer state and tracker history non-empty)."""
    learner = Learner(MODEL, tiny_data_config, AlgorithmConfig(policy_target="standard"), LearnerConfig(lr=1e-3))
    learner.update(tiny_trajectory([0, 1], rewards=[[0.1, 0.9], [0.3, 0.2], [0.8, 0.4], [0.6, 0.6]]))
    return learner


def test_save_load_latest_and_keep_last_n(trained, tmp_path):
    paths = [trained.save_checkpoint(tmp_path, it, keep=2) for it in (1, 2, 3)]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000003"]
    assert str(latest_checkpoint(tmp_path)) == paths[-1]
    c = load_checkpoint(paths[-1])
    assert c.iteration == 3 and c.policy_version == trained.version == 1
    assert c.tracker_state == trained.tracker.state_dict()
    assert c.config_yaml is not None and "algorithm:" in c.config_yaml
    assert set(c.rng_state) == {"torch", "cuda", "numpy", "python", "generators"}
    assert resolve_resume(tmp_path, "latest") == latest_checkpoint(tmp_path)
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path / "elsewhere", "latest") is None  # nothing to resume: start fresh
    # Re-saving an iteration replaces it, still atomically.
    again = trained.save_checkpoint(tmp_path, 3, keep=2)
    assert again == paths[-1] and load_checkpoint(again).iteration == 3


def test_interrupted_save_leaves_no_loadable_checkpoint(trained, tmp_path, monkeypatch):
    good = trained.save_checkpoint(tmp_path, 1)

    written = []

    def crash(folder):  # the weights, optimizer, RNG and state files exist; the marker never does
        written.extend(p.name for p in folder.rglob("*") if p.is_file())
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_manifest", crash)
    with pytest.raises(OSError, match="simulated"):
        trained.save_checkpoint(tmp_path, 2)
    assert "adapter_model.safetensors" in written and "optimizer.pt" in written
    root = tmp_path / ckpt.CHECKPOINTS_DIR
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-000001"]  # no ckpt-000002, no temp left
    assert str(latest_checkpoint(tmp_path)) == good

    # A hard crash (no cleanup) leaves a temp folder and, say, a hand-made folder without a
    # manifest: neither is ever picked, and loading the latter says why.
    monkeypatch.undo()
    shutil.copytree(good, root / ".tmp-ckpt-000007-crashed")
    partial = root / "ckpt-000009"
    shutil.copytree(good, partial)
    (partial / ckpt.MANIFEST).unlink()
    assert str(latest_checkpoint(tmp_path)) == good
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint \(no MANIFEST.json"):
        load_checkpoint(partial)
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(tmp_path, partial)
    with pytest.raises(CheckpointError, match="incomplete"):
        trained.load_checkpoint(partial)
    # The next save prunes the leftover temp folder.
    trained.save_checkpoint(tmp_path, 10, keep=5)
    assert not (root / ".tmp-ckpt-000007-crashed").exists()


def test_corrupted_file_is_detected(trained, tmp_path):
    path = ckpt.save_checkpoint(
        tmp_path, 1, policy=trained.policy, optimizer=trained.optimizer, tracker_state=trained.tracker.state_dict(),
        rng_state=ckpt.capture_rng_state(), policy_version=trained.version,
    )
    target = path / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer.pt does not match its sha256"):
        load_checkpoint(path)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(trained, tmp_path, caplog):
    paths = [trained.save_checkpoint(tmp_path, it, keep=3) for it in (1, 2, 3)]
    _flip_a_byte(Path(paths[2]) / "optimizer.pt")  # bit rot in the newest
    (Path(paths[1]) / "optimizer.pt").write_bytes(b"")  # a truncated file in the one before
    with caplog.at_level("WARNING", logger="restore_rl.checkpoint"):
        assert resolve_resume(tmp_path, "latest") == Path(paths[0])
    assert "ckpt-000003" in caplog.text and "sha256" in caplog.text
    assert "ckpt-000002" in caplog.text and "bytes" in caplog.text
    path, bad = newest_valid_checkpoint(tmp_path)
    assert path == Path(paths[0]) and [b.name for b, _ in bad] == ["ckpt-000003", "ckpt-000002"]
    # Checkpoints, but none that verifies: an error naming each (a fresh start would discard the run).
    _flip_a_byte(Path(paths[0]) / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint .* verifies: .*ckpt-000003.*ckpt-000002.*ckpt-000001"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="sha256"):  # an explicit path is verified with checksums too
        resolve_resume(tmp_path, paths[2])


def test_lora_loads_with_plain_peft_onto_the_base_controlnet(trained, tiny_resolution, tmp_path):
    from diffusers import ControlNetModel
    from peft import PeftModel

    from common.policy import build_policy

    # The base ControlNet as a plain diffusers folder (a fresh policy: LoRA B = 0 merges to the base).
    build_policy(MODEL, tiny_resolution).save_pretrained(tmp_path / "base")
    path = trained.save_checkpoint(tmp_path / "run", 1)
    base = ControlNetModel.from_pretrained(tmp_path / "base" / "controlnet")
    peft_model = PeftModel.from_pretrained(base, f"{path}/trainable")
    loaded = dict(peft_model.named_parameters())
    ours = trained.policy.trainable_state_dict()
    lora = {k: v for k, v in ours.items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    for name, value in lora.items():
        assert torch.equal(loaded[name], value), name


def test_loading_into_another_model_shape_is_refused(trained, tiny_data_config, tmp_path):
    path = trained.save_checkpoint(tmp_path, 1)
    other = Learner(MODEL.model_copy(update={"lora_rank": 2}), tiny_data_config, AlgorithmConfig(), LearnerConfig())
    with pytest.raises(Exception, match=r"lora_rank|adapter r|trainable tensors"):
        other.load_checkpoint(path)
