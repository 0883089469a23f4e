"""The trained IQA reward (reward.model_kind=trained) and iterative RL ("with Iter. RL")."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "demo_cpu.yaml"


@pytest.mark.slow
def test_trained_reward_served_by_vllm_ranks_ground_truth_above_lq(tmp_path):
    """A shortened recipe from the random tiny policy: the model is trained, carded and cached;
    through vLLM it scores the held-out ground truths far above their low-light inputs, and
    vLLM agrees with transformers on every held-out image."""
    from deploy.reward_model import ensure_trained_reward
    from reward_server.iqa_train import CARD_FILE, HELD_OUT_FILE, load_examples, read_card, served_scores
    from reward_server.scoring import TransformersScorer

    cfg = load_config(DEMO, [f"reward.cache_dir={tmp_path}", "rollout.num_inference_steps=3",
                             "reward.iqa_train.steps=300", "reward.iqa_train.crops_per_photo=12",
                             "reward.iqa_train.restored_inputs=8", "reward.iqa_train.held_out_crops_per_photo=6",
                             "reward.iqa_train.min_srcc=0.5"])
    folder = ensure_trained_reward(cfg, progress=False)
    card = read_card(folder)
    assert card["version"] == 0 and card["headline"]["engine"] == "vllm"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja", CARD_FILE):
        assert (folder / name).is_file(), name
    held = load_examples(folder / HELD_OUT_FILE)
    assert set(held.photos).isdisjoint({"chelsea", "coins", "moon"})  # never the RL test photos
    vllm = served_scores(folder, held.images, "llava", engine="vllm")
    hf = TransformersScorer(folder, "llava", dtype="float32").score(list(held.images)).scores
    assert np.max(np.abs(vllm - hf)) <= 1e-4
    kinds = np.asarray(held.kinds)
    gt, lq = vllm[kinds == "gt"].mean(), vllm[kinds == "lq"].mean()
    assert gt > lq + 0.3, (gt, lq)
    assert card["held_out"]["vllm"]["srcc"] >= 0.5
    t0 = time.perf_counter()
    assert ensure_trained_reward(cfg, progress=False) == folder  # cached: no second training
    assert time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_a_model_below_min_srcc_fails_loudly_and_leaves_nothing(tmp_path):
    from deploy.reward_model import ensure_trained_reward
    from reward_server.iqa_train import IQATrainingError

    cfg = load_config(DEMO, [f"reward.cache_dir={tmp_path}", "reward.backend=transformers",
                             "reward.iqa_train.steps=1", "reward.iqa_train.crops_per_photo=1",
                             "reward.iqa_train.restored_inputs=0", "reward.iqa_train.held_out_crops_per_photo=2",
                             "reward.iqa_train.min_srcc=0.99"])
    with pytest.raises(IQATrainingError, match="min_srcc 0.99"):
        ensure_trained_reward(cfg, progress=False)
    assert not any(p.name.startswith("iqa-") for p in (tmp_path / "iqa").iterdir())


@pytest.mark.slow
def test_select_every_chooses_the_step_on_the_validation_photos_and_cards_it(tmp_path):
    from deploy.reward_model import ensure_trained_reward
    from reward_server.iqa_data import IQA_HELD_OUT_PHOTOS, IQA_VALIDATION_PHOTOS
    from reward_server.iqa_train import read_card

    cfg = load_config(DEMO, [f"reward.cache_dir={tmp_path}", "reward.backend=transformers",
                             "reward.iqa_train.steps=6", "reward.iqa_train.crops_per_photo=1",
                             "reward.iqa_train.restored_inputs=0", "reward.iqa_train.held_out_crops_per_photo=2",
                             "reward.iqa_train.validation_crops_per_photo=1", "reward.iqa_train.select_every=2",
                             "reward.iqa_train.min_srcc=-1"])
    card = read_card(ensure_trained_reward(cfg, progress=False))
    training, data = card["training"], card["data"]
    assert [e["step"] for e in training["validation_curve"]] == [2, 4, 6]
    best = max(e["validation_srcc"] for e in training["validation_curve"])
    assert training["selected_step"] in [e["step"] for e in training["validation_curve"] if e["validation_srcc"] == best]
    assert data["validation_photos"] == sorted(IQA_VALIDATION_PHOTOS)
    assert data["validation_counts"] == {"gt": 9, "degraded": 27, "lq": 9}
    assert set(data["validation_photos"]).isdisjoint(set(data["train_photos"]) | set(IQA_HELD_OUT_PHOTOS))
    assert card["recipe"]["settings"]["select_every"] == 2


def test_label_source_from_config_is_imported(tmp_path):
    from deploy.reward_model import label_source

    assert label_source("ssim_y").name == "ssim_y"
    fn = label_source("tests.deploy.test_reward_model:_brightness_label")
    assert fn(np.full((1, 4, 4, 3), 255, np.uint8), None)[0] == 1.0
    with pytest.raises(ValueError, match="cannot import"):
        label_source("no_such_module:fn")


def _brightness_label(images, references):
    return images.mean(axis=(1, 2, 3)) / 255.0


@pytest.mark.slow
def test_iterative_rl_rolls_the_reward_over_and_resume_keeps_the_version(ray_local, tmp_path):
    """4 iterations with a refresh after iteration 1: rewards of iterations 0-1 carry version A,
    2-3 version B; the checkpoint records B, and a resumed run scores with B."""
    from deploy.driver import Driver
    from deploy.outputs import read_metrics

    overrides = [
        f"deploy.output_dir={tmp_path / 'runs'}", "deploy.run_name=iter", f"reward.cache_dir={tmp_path / 'cache'}",
        "data.resolution=32", "data.num_synthetic=4", "data.num_test=1", "rollout.num_inference_steps=3",
        "rollout.batch_size=4", "rollout.samples_per_input=2", "logging.progress=false",
        "reward.backend=transformers",
        "reward.iqa_train.steps=40", "reward.iqa_train.crops_per_photo=3", "reward.iqa_train.degraded_per_crop=1",
        "reward.iqa_train.restored_inputs=2", "reward.iqa_train.held_out_crops_per_photo=2",
        "reward.iqa_train.min_srcc=-1", "reward.iqa_train.refresh_max_srcc_drop=1", "reward.iqa_train.refresh_every=2",
        "reward.iqa_train.refresh_steps=10",
        "reward.iqa_train.refresh_images=24",
    ]
    assert Driver(load_config(DEMO, [*overrides, "deploy.iterations=4"])).run_loop() == 0
    run = tmp_path / "runs" / "iter"
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]
    assert [r["reward_model_index"] for r in recs] == [0, 0, 1, 1]
    versions = [set(r["reward_model_versions"]) for r in recs]
    assert all(len(v) == 1 for v in versions)  # one model scored each batch
    assert versions[0] == versions[1] != versions[2] == versions[3]
    assert recs[1].get("reward_refreshed_to") == 1 and "seconds/reward_refresh" in recs[1]
    # Resumed, with a refresh after iteration 4 that its gate must reject (a drop of more than
    # -1 in SRCC: any model): the job scores on with the version it had, and says so.
    resumed = [*overrides, "deploy.iterations=6", "reward.iqa_train.refresh_every=1",
               "reward.iqa_train.refresh_max_srcc_drop=-1"]
    assert Driver(load_config(DEMO, resumed), resume="auto").run_loop() == 0
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3, 4, 5]
    assert [r["reward_model_index"] for r in recs[4:]] == [1, 1]
    assert set(recs[4]["reward_model_versions"]) == versions[3] == set(recs[5]["reward_model_versions"])
    assert "refresh_max_srcc_drop" in recs[4]["reward_refresh_rejected"] and "reward_refreshed_to" not in recs[4]
