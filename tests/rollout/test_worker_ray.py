"""RolloutWorker actors on a local Ray bound to loopback."""

import pytest
import torch

from common.config import AlgorithmConfig, DataConfig, ModelConfig, RolloutConfig, TinyModelConfig
from rollout.worker import RolloutWorker, StaleWeightsError, create_rollout_workers

pytestmark = pytest.mark.slow

RES = 32


def _cfgs():
    rollout = RolloutConfig(num_workers=2, num_inference_steps=3, eta=1.0, samples_per_input=2, batch_size=8,
                            num_cpus_per_worker=1)
    algo = AlgorithmConfig(reward_steps="every:2", policy_target="enhanced")
    model = ModelConfig(kind="tiny", tiny=TinyModelConfig())
    data = DataConfig(kind="synthetic", resolution=RES, num_synthetic=8, num_test=2)
    return rollout, algo, model, data


def test_two_workers_sample_4_inputs_g2(ray_local):
    import ray

    rollout, algo, model, data = _cfgs()
    workers = create_rollout_workers(rollout, algo, model, data)
    # 4 inputs, 2 per worker, G = 2 -> 4 trajectories per worker
    refs = [workers[0].sample.remote([0, 1]), workers[1].sample.remote([2, 3])]
    trajs = ray.get(refs, timeout=300)
    K, R = 3, 2  # every:2 over 3 steps -> steps 1 and 2
    for tr, ids in zip(trajs, ([0, 0, 1, 1], [2, 2, 3, 3])):
        tr.validate()
        assert tr.input_ids.tolist() == ids
        assert tr.latents.shape[:2] == (4, K + 1) and tr.latents.dtype == torch.float32
        assert tr.log_probs.shape == (4, K) and tr.reward_images.shape == (4, R, RES, RES, 3)
        assert tr.final_images.shape == (4, RES, RES, 3) and tr.final_images.dtype == torch.uint8
        assert tr.policy_version == 0
        assert torch.isfinite(tr.log_probs).all()

    # Same seed, same inputs -> the same trajectory, on the other worker too.
    again = ray.get(workers[1].sample.remote([0, 1]), timeout=300)
    assert torch.equal(again.latents, trajs[0].latents)
    assert torch.equal(again.log_probs, trajs[0].log_probs)

    # Versions: set_weights moves them forward and every trajectory reports its version.
    state = ray.get(workers[0].trainable_state.remote())
    bumped = {k: v + 0.01 for k, v in state.items()}
    assert ray.get([w.set_weights.remote(1, bumped) for w in workers]) == [1, 1]
    tr = ray.get(workers[0].sample.remote([0]), timeout=300)
    assert tr.policy_version == 1
    held = ray.get(workers[1].trainable_state.remote())
    assert all(torch.equal(held[k], bumped[k]) for k in bumped)
    with pytest.raises(StaleWeightsError):
        ray.get(workers[0].set_weights.remote(1, bumped))
    for w in workers:
        ray.kill(w)


def test_worker_rejects_unknown_input_ids():
    rollout, algo, model, data = _cfgs()
    from rollout.worker import sampler_settings

    w = RolloutWorker(0, model, data, sampler_settings(rollout, algo), seed=0)
    with pytest.raises(IndexError, match=r"outside the dataset of 8 pairs"):
        w.sample([0, 99])
