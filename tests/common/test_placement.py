"""A role's resources as Ray options and bundles (common/placement.py), and every role's builder
passing its ``custom_resources`` on: rollout workers, learners and reward replicas."""

from __future__ import annotations

import pytest

from common.config import ConfigError, LearnerConfig, RewardConfig, RolloutConfig, load_config
from common.placement import actor_resources, bundle, check_custom_resources


def test_actor_resources_carry_the_custom_resources_only_when_there_are_some():
    assert actor_resources(4, 1, {"rollout_gpu": 1}) == {"num_cpus": 4, "num_gpus": 1,
                                                         "resources": {"rollout_gpu": 1}}
    assert actor_resources(1, 0, {}) == {"num_cpus": 1, "num_gpus": 0}


def test_bundle_leaves_out_zero_amounts():
    assert bundle(4, 1, {"learner_gpu": 1}) == {"CPU": 4.0, "GPU": 1.0, "learner_gpu": 1.0}
    assert bundle(1, 0, {}) == {"CPU": 1.0}  # no GPU key: a bundle asking for 0 GPUs asks for nothing


@pytest.mark.parametrize(("custom", "fragment"), [
    ({"GPU": 1}, "not a custom resource"),
    ({"CPU": 2}, "not a custom resource"),
    ({"node:10.0.0.1": 1}, "not a custom resource"),
    ({"reward_gpu": 0}, "amount > 0"),
    ({"reward_gpu": -1}, "amount > 0"),
    ({"": 1}, "non-empty"),
])
def test_bad_custom_resources_are_named(custom, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_custom_resources(custom, "reward.custom_resources")


def test_the_config_rejects_a_reserved_name_with_the_field_path():
    with pytest.raises(ConfigError, match=r"learner\.custom_resources"):
        from common.config import parse_config

        parse_config({"learner": {"custom_resources": {"GPU": 1}}})


def test_every_role_builder_passes_its_custom_resources_on():
    from learner.learner import learner_actor_options
    from reward_server.serve_app import deployment_options
    from rollout.worker import rollout_actor_options

    ro = RolloutConfig(num_cpus_per_worker=4, num_gpus_per_worker=1, custom_resources={"rollout_gpu": 1})
    assert rollout_actor_options(ro) == {"num_cpus": 4, "num_gpus": 1, "resources": {"rollout_gpu": 1},
                                         "max_restarts": ro.max_restarts, "max_task_retries": 0}
    le = LearnerConfig(num_cpus_per_learner=4, num_gpus_per_learner=1, custom_resources={"learner_gpu": 1})
    assert learner_actor_options(le) == {"num_cpus": 4, "num_gpus": 1, "resources": {"learner_gpu": 1}}
    rw = RewardConfig(backend="pyiqa", num_cpus_per_replica=4, num_gpus_per_replica=1,
                      custom_resources={"reward_gpu": 1})
    actor = deployment_options(rw)["ray_actor_options"]
    assert {k: actor[k] for k in ("num_cpus", "num_gpus", "resources")} == {
        "num_cpus": 4, "num_gpus": 1, "resources": {"reward_gpu": 1}}


def test_the_gpu_config_pins_each_role_to_its_own_resource():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "deploy" / "configs" / "pasd_lol_gpu.yaml")
    sets = [set(cfg.rollout.custom_resources), set(cfg.reward.custom_resources), set(cfg.learner.custom_resources)]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), sets
