"""deploy.compare: the arms of Table 1 from one command."""

import json
from pathlib import Path

import pytest
from PIL import Image

from common.config import load_config
from deploy.compare import arm_config, start_weights_digest

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "demo_cpu.yaml"
SMALL = ["data.resolution=32", "data.num_synthetic=8", "data.num_test=2", "rollout.num_inference_steps=3",
         "rollout.batch_size=4", "reward.backend=pyiqa", "reward.pyiqa_metric=piqe", "logging.progress=false"]


def test_arms_differ_only_in_their_row_and_run_name(tmp_path):
    cfg = load_config(DEMO, [*SMALL, f"deploy.output_dir={tmp_path}"])
    base = cfg.model_dump()
    for row, expect in [("Base +Diff.SFT", {"mode": "sft_only"}), ("with Rec.", {"reward": "reconstruction"}),
                        ("Norm. from track", {"advantage_norm": "track"}), ("Original", {"mode": "adaptive"})]:
        arm = arm_config(cfg, row, "cmp", iterations=2).model_dump()
        assert arm["deploy"]["run_name"].startswith("cmp-") and arm["deploy"]["iterations"] == 2
        for section in ("model", "data", "rollout", "reward", "learner"):
            assert arm[section] == base[section], section
        for key, value in expect.items():
            assert arm["algorithm"][key] == value
    with pytest.raises(ValueError, match="Table 6 row"):
        arm_config(cfg, "with magic", "cmp", 2)


@pytest.mark.slow
def test_compare_on_cpu_demo_produces_table_and_figures(ray_local, tmp_path):
    from deploy.compare import run_compare

    cfg = load_config(DEMO, [*SMALL, f"deploy.output_dir={tmp_path}"])
    rows = ["Base", "Base +Diff.SFT", "Original", "with Rec."]
    out = run_compare(cfg, rows, "cmp", iterations=2)
    table = json.loads((Path(out["out"]) / "table.json").read_text())["rows"]
    assert [r["arm"] for r in table] == rows
    assert len({r["start_weights_sha256"] for r in table}) == 1  # bit-identical starting weights
    assert start_weights_digest(cfg) == table[0]["start_weights_sha256"]
    for r in table:
        assert 0 < r["psnr"] < 80 and 0 < r["ssim"] <= 1 and 0 <= r["iqa"] <= 1
        assert r["lpips"] is None and r["fid"] is None  # no local weights: a note, not a number
    md = (Path(out["out"]) / "table.md").read_text()
    assert "n/a (needs local weights)" in md and "Base +Diff.SFT" in md
    for fig in ("iqa_distribution", "reward_curves"):
        with Image.open(out["figures"][fig]) as im:
            assert im.size[0] > 100 and im.size[1] > 100
