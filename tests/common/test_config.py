"""Config: YAML round trip, --set overrides, and one readable message per kind of bad config."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_config,
    parse_config,
    parse_reward_steps,
)

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = load_config(None)
    again = load_config(_write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg


def test_yaml_round_trip_keeps_every_value(tmp_path):
    data = {
        "rollout": {"eta": 0.3, "num_inference_steps": 12, "samples_per_input": 4, "batch_size": 16},
        "reward": {"backend": "pyiqa", "pyiqa_metric": "piqe", "num_replicas": 3},
        "algorithm": {"mode": "no_weights", "reward_steps": "every:3", "policy_target": "standard"},
        "deploy": {"run_name": "exp-1", "max_staleness": 2},
    }
    cfg = load_config(_write(tmp_path, data))
    assert cfg.rollout.eta == 0.3 and cfg.rollout.num_inference_steps == 12
    assert cfg.reward.num_replicas == 3 and cfg.algorithm.mode == "no_weights"
    assert load_config(_write(tmp_path, yaml.safe_load(cfg.to_yaml()))) == cfg


def test_every_field_has_description_and_unit():
    missing = []

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            path = f"{prefix}{name}"
            extra = f.json_schema_extra or {}
            if not f.description or "unit" not in extra:
                missing.append(path)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, ExperimentConfig.__mro__[1]):
                walk(ann, path + ".")

    walk(ExperimentConfig, "")
    assert missing == []
    # sanity: the walk really descended into sections
    assert ExperimentConfig.model_fields["rollout"].annotation.model_fields["eta"].description


def test_overrides_are_typed():
    cfg = load_config(None, ["rollout.eta=0.5", "reward.num_replicas=4", "algorithm.reward_steps=last",
                             "model.tiny.block_out_channels=[16, 32]", "logging.progress=false"])
    assert cfg.rollout.eta == 0.5 and isinstance(cfg.rollout.eta, float)
    assert cfg.reward.num_replicas == 4
    assert cfg.algorithm.reward_steps == "last"
    assert cfg.model.tiny.block_out_channels == [16, 32]
    assert cfg.logging.progress is False


def test_override_does_not_mutate_input():
    data = {"rollout": {"eta": 0.2}}
    out = apply_overrides(data, ["rollout.eta=0.9"])
    assert data["rollout"]["eta"] == 0.2 and out["rollout"]["eta"] == 0.9


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("rollout.etaa=0.5", ["rollout.etaa", "not a field", "eta"]),
        ("nosuch.x=1", ["nosuch", "not a field"]),
        ("rollout.eta.x=1", ["rollout.eta", "a value, not a section"]),
        ("rollout.eta", ["KEY=VALUE"]),
    ],
)
def test_bad_override_paths(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for f in fragments:
        assert f in str(err.value)


@pytest.mark.parametrize(
    "data, fragments",
    [
        # unknown key
        ({"rollout": {"etta": 1.0}}, ["rollout.etta", "unknown key"]),
        ({"rollouts": {}}, ["rollouts", "unknown key"]),
        # wrong type
        ({"rollout": {"num_workers": "two"}}, ["rollout.num_workers", "'two'", "integer"]),
        # out of range
        ({"rollout": {"eta": 1.5}}, ["rollout.eta", "1.5", "less than or equal to 1"]),
        ({"reward": {"num_replicas": 0}}, ["reward.num_replicas", "greater than or equal to 1"]),
        # bad enum
        ({"algorithm": {"mode": "ppo"}}, ["algorithm.mode", "'ppo'", "adaptive"]),
        # bad pattern
        ({"algorithm": {"reward_steps": "every:0"}}, ["algorithm.reward_steps", "every:k"]),
        ({"deploy": {"run_name": "../evil"}}, ["deploy.run_name", "../evil"]),
        # cross-field: eta = 0 with RL on
        ({"rollout": {"eta": 0.0}}, ["rollout.eta", "0.0", "algorithm.mode='adaptive'"]),
        # cross-field: batch not divisible by samples per input
        ({"rollout": {"batch_size": 7, "samples_per_input": 2}}, ["rollout.batch_size", "7", "multiple"]),
        # section-level checks
        ({"model": {"kind": "pretrained"}}, ["model", "pretrained_dir"]),
        ({"data": {"kind": "folder"}}, ["data", "root"]),
        ({"reward": {"max_batch_size": 32, "max_ongoing_requests": 8}}, ["reward", "max_ongoing_requests"]),
        ({"data": {"resolution": 62}}, ["data.resolution", "62", "multiple of 4"]),
    ],
)
def test_bad_config_message_names_field_value_and_expectation(data, fragments):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    msg = str(err.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert "Traceback" not in msg


def test_eta_zero_is_fine_without_rl():
    cfg = parse_config({"rollout": {"eta": 0.0}, "algorithm": {"mode": "sft_only"}})
    assert cfg.rollout.eta == 0.0


def test_several_problems_are_all_reported():
    with pytest.raises(ConfigError) as err:
        parse_config({"rollout": {"eta": 2.0, "num_workers": 0}, "reward": {"preset": "x"}})
    assert len(err.value.problems) == 3


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "rollout: [unclosed"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "spec, k, expected",
    [("all", 4, [0, 1, 2, 3]), ("last", 4, [3]), ("every:2", 5, [1, 3, 4]), ("every:2", 4, [1, 3]),
     ("every:10", 3, [2])],
)
def test_reward_steps(spec, k, expected):
    assert parse_reward_steps(spec, k) == expected


def test_cli_prints_readable_error_not_traceback(tmp_path):
    p = _write(tmp_path, {"rollout": {"eta": 0.0}})
    proc = subprocess.run([sys.executable, "-m", "common.config", "--config", str(p)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rollout.eta" in proc.stderr and "Traceback" not in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "common.config", "--set", "rollout.eta=0.25"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "eta: 0.25" in ok.stdout


def test_shipped_configs_are_valid():
    configs = sorted((REPO / "deploy" / "configs").glob("*.yaml"))
    for p in configs:
        load_config(p)


def test_docs_config_reference_is_up_to_date():
    from common.config import config_reference

    committed = (REPO / "docs" / "config.md").read_text()
    assert committed.strip() == config_reference().strip(), (
        "docs/config.md is stale: run `python -m common.config --reference > docs/config.md`"
    )
