"""The glue worker: one long-lived actor per Ray session that joins batches and makes experience off the
driver (a Ray task would need a fresh worker process per step on a fully reserved cluster)."""

from __future__ import annotations

import pytest
import ray
import torch

from actors.glue import concat_batches, experience, glue, reset_glue
from rlhf_ray.batch import Batch
from rlhf_ray.config import AlgorithmConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # starts a local Ray


def rollout(n: int, offset: int = 0) -> Batch:
    mask = torch.tensor([[0, 1, 1]] * n, dtype=torch.float32)
    return Batch(
        {
            "input_ids": torch.arange(3 * n).reshape(n, 3),
            "attention_mask": torch.ones(n, 3, dtype=torch.long),
            "response_mask": mask,
            "rollout_logprobs": -0.5 * mask,
        },
        {"prompt_index": [i // 2 for i in range(n)]},
    )


def test_one_worker_per_session_same_results_as_the_functions(ray_local):
    worker = glue()
    assert glue() is worker  # not re-created per call
    a, b = rollout(4), rollout(2)
    joined = ray.get(worker.concat.remote(ray.put(a), ray.put(b)), timeout=60)
    assert joined.meta["prompt_index"] == [0, 0, 1, 1, 2, 2]
    assert torch.equal(joined["input_ids"], concat_batches(rollout(4), rollout(2))["input_ids"])

    ref = Batch({"ref_logprobs": -0.75 * a["response_mask"]})
    scores = Batch({"scores": torch.tensor([1.0, 0.0, 0.5, 0.5])})
    algo = AlgorithmConfig(estimator="grpo", kl_estimator="k1")
    refs = worker.experience.remote(a, None, ref, scores, None, algo, 0.1, 2, None)
    batch, stats, _ = ray.get(list(refs), timeout=60)
    want, want_stats, _ = experience(a, None, ref, scores, None, algo, 0.1, 2, None)
    assert torch.equal(batch["advantages"], want["advantages"])
    assert stats == pytest.approx(want_stats, nan_ok=True)
    assert stats["kl"] == pytest.approx(0.5)  # 2 tokens x (-0.5 - -0.75), from the sampler's log-probs

    reset_glue()
    fresh = glue()
    assert fresh is not worker and ray.get(fresh.ping.remote(), timeout=60)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(worker.ping.remote(), timeout=60)
    reset_glue()
