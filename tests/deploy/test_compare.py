"""deploy.compare: the arms of Table 1 from one command."""

import json
from pathlib import Path

import pytest
from PIL import Image

from common.config import load_config
from deploy.compare import arm_config, iterations_per_pass, start_weights_digest
from deploy.driver import input_ids_for_iteration
from deploy.figures import pass_means

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "demo_cpu.yaml"
SMALL = ["data.resolution=32", "data.num_synthetic=8", "data.num_test=2", "rollout.num_inference_steps=3",
         "rollout.batch_size=4", "rollout.samples_per_input=2", "reward.backend=pyiqa", "reward.pyiqa_metric=piqe",
         "logging.progress=false"]


def test_arms_differ_only_in_their_row_and_run_name(tmp_path):
    cfg = load_config(DEMO, [*SMALL, f"deploy.output_dir={tmp_path}"])
    base = cfg.model_dump()
    for row, expect in [("Base +Diff.SFT", {"mode": "sft_only"}), ("with Rec.", {"reward": "reconstruction"}),
                        ("Norm. from track", {"advantage_norm": "track"}), ("Original", {"mode": "adaptive"})]:
        arm = arm_config(cfg, row, "cmp", iterations=2).model_dump()
        assert arm["deploy"]["run_name"].startswith("cmp-") and arm["deploy"]["iterations"] == 2
        for section in ("model", "data", "rollout", "reward", "learner", "evaluation"):
            assert arm[section] == base[section], section
        for key, value in expect.items():
            assert arm["algorithm"][key] == value
    with pytest.raises(ValueError, match="Table 6 row"):
        arm_config(cfg, "with magic", "cmp", 2)


def test_every_arm_is_evaluated_with_one_sampler(tmp_path):
    """'with x_{t-1}' trains with the plain DDIM step and Original with the refined one; both are
    measured with the config's one evaluation sampler, as Base is (issue 12, fair evaluation)."""
    from deploy.evaluate import eval_sampler

    cfg = load_config(DEMO, [*SMALL, f"deploy.output_dir={tmp_path}", "rollout.eta=0.5"])
    samplers = {row: eval_sampler(arm_config(cfg, row, "cmp", iterations=2), 3)
                for row in ("Base", "Original", "with x_{t-1}")}
    assert arm_config(cfg, "Original", "cmp", 2).algorithm.policy_target == "enhanced"
    assert arm_config(cfg, "with x_{t-1}", "cmp", 2).algorithm.policy_target == "standard"
    assert len(set(samplers.values())) == 1
    s = samplers["Base"]
    assert (s.num_inference_steps, s.eta, s.policy_target, s.samples_per_input) == (3, 0.5, "standard", 3)
    s = eval_sampler(load_config(DEMO, [*SMALL, "evaluation.eta=0.0", "evaluation.num_inference_steps=5",
                                        "evaluation.policy_target=enhanced"]))
    assert (s.num_inference_steps, s.eta, s.policy_target) == (5, 0.0, "enhanced")


def test_paired_difference_hand_worked():
    from deploy.compare import mean_se, paired_difference

    arm = {(0, 0): 0.5, (0, 1): 0.7, (1, 0): 0.2, (9, 9): 5.0}  # (9, 9) has no partner: left out
    ref = {(0, 0): 0.4, (0, 1): 0.4, (1, 0): 0.2, (2, 0): 1.0}
    mean, se, n = paired_difference(arm, ref)
    # d = [0.1, 0.3, 0.0]: mean 0.13333, sample std sqrt(((-.0333)^2 + .16667^2 + .13333^2) / 2) = 0.15275
    assert n == 3 and mean == pytest.approx(0.4 / 3) and se == pytest.approx(0.152753 / 3 ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="no \\(image, sample\\) pair"):
        paired_difference({(0, 0): 1.0}, {(1, 0): 1.0})
    m, e = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and e == pytest.approx(1.290994 / 2)


def test_a_pass_of_iterations_draws_every_input_once():
    # 8 inputs, batch 4 of G = 2 samples → 2 inputs per iteration → 4 iterations per pass
    cfg = load_config(DEMO, [*SMALL, "rollout.samples_per_input=2"])
    window = iterations_per_pass(cfg)
    assert window == 4
    for p in range(3):
        drawn = [i for it in range(p * window, (p + 1) * window) for i in input_ids_for_iteration(it, 2, 8, seed=0)]
        assert sorted(drawn) == list(range(8)), p


def test_pass_means_hand_worked():
    centres, means = pass_means([0, 1, 2, 3, 4, 6, 7], [1.0, 2.0, 3.0, 6.0, 10.0, 20.0, 30.0], window=4)
    assert centres.tolist() == [1.5, 5.5] and means.tolist() == [3.0, 20.0]  # iteration 5 missing (dropped)
    with pytest.raises(ValueError, match="window"):
        pass_means([0], [1.0], window=0)
    with pytest.raises(ValueError, match="2 iterations, 1 values"):
        pass_means([0, 1], [1.0], window=2)


@pytest.mark.slow
def test_compare_on_cpu_demo_produces_table_and_figures(ray_local, tmp_path):
    from deploy.compare import run_compare

    cfg = load_config(DEMO, [*SMALL, f"deploy.output_dir={tmp_path}"])
    rows = ["Base", "Base +Diff.SFT", "Original", "with Rec."]
    out = run_compare(cfg, rows, "cmp", iterations=2, eval_samples=2)
    table = json.loads((Path(out["out"]) / "table.json").read_text())["rows"]
    assert [r["arm"] for r in table] == rows
    assert len({r["start_weights_sha256"] for r in table}) == 1  # bit-identical starting weights
    assert start_weights_digest(cfg) == table[0]["start_weights_sha256"]
    for r in table:
        assert 0 < r["psnr"] < 80 and 0 < r["ssim"] <= 1 and 0 <= r["iqa"] <= 1
        assert r["lpips"] is None and r["fid"] is None  # no local weights: a note, not a number
    md = (Path(out["out"]) / "table.md").read_text()
    assert "n/a (needs local weights)" in md and "Base +Diff.SFT" in md
    assert all(r["samples"] == 2 * 2 and r["iqa_se"] > 0 for r in table)  # 2 test images × 2 seeds
    # Paired against Base and against +Diff.SFT (each arm but the reference itself), over all 4 pairs.
    pairs = [(p["arm"], p["reference"]) for p in out["paired"]]
    assert pairs == [(r, "Base") for r in rows[1:]] + [(r, "Base +Diff.SFT") for r in rows if r != "Base +Diff.SFT"]
    by = {r["arm"]: r for r in table}
    for p in out["paired"]:
        assert p["pairs"] == 4
        assert p["iqa"] == pytest.approx(by[p["arm"]]["iqa"] - by[p["reference"]]["iqa"], abs=1e-9)
    assert "± " in md and "step `standard`" in md and "Original − Base" in md
    for fig in ("iqa_distribution", "reward_curves"):
        with Image.open(out["figures"][fig]) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    # The paired control: the base policy on the same inputs and noise. At iteration 0 the arm
    # still holds the base weights, so its reward equals the control's (up to batch-size-dependent
    # float rounding of the convolutions, which can move a uint8 pixel and so the PIQE score).
    base = json.loads((Path(out["out"]) / "base_rewards.json").read_text())
    assert base["iterations"] == base["arm_iterations"] == [0, 1] and base["arm"] == "Original"
    assert base["gain"][0] == pytest.approx(0.0, abs=5e-3)
    assert base["base_reward_mean"][0] == pytest.approx(base["arm_reward_mean"][0], abs=5e-3)


def test_a_set_that_a_row_would_override_is_an_error(capsys):
    from deploy.compare import check_overrides_keep_rows, main

    check_overrides_keep_rows(["learner.lr=0.01", "algorithm.step_reward=increment"], ["Base", "Original"])
    with pytest.raises(ValueError, match=r"algorithm.mode=rl_only conflicts with row 'Original'.*adaptive"):
        check_overrides_keep_rows(["algorithm.mode=rl_only"], ["Base", "Original"])
    # the CLI refuses before it starts anything
    assert main(["--config", str(DEMO), "--set", "algorithm.reward=reconstruction", "--rows", "Base,Original"]) == 2
    assert "conflicts with row 'Original'" in capsys.readouterr().err
