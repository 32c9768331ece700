"""make_experience: KL penalty placement, estimator dispatch, and hand-checked numbers."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.batch import Batch
from rlhf_ray.config import AlgorithmConfig
from rlhf_ray.experience import OldLogprobs, RewardNormalizer, make_experience, mark_old_logprobs


def batch(n=4, t=5) -> Batch:
    torch.manual_seed(0)
    mask = torch.zeros(n, t)
    mask[:, 2:4] = 1  # tokens 2 and 3 are the response; 0-1 prompt, 4 padding
    lp = -torch.rand(n, t) * mask
    return Batch(
        {
            "input_ids": torch.ones(n, t, dtype=torch.long),
            "attention_mask": (torch.arange(t) < 4).long().expand(n, t).clone(),
            "response_mask": mask,
            "logprobs": lp,
            "ref_logprobs": lp - 0.1 * mask,  # log p - log q = 0.1 on every response token
            "scores": torch.tensor([1.0, 0.0, 3.0, 3.0])[:n],
            "values": torch.full((n, t), 0.5) * mask,
        }
    )


def test_grpo_kl_in_loss_gives_group_normalised_advantages():
    algo = AlgorithmConfig(estimator="grpo", kl_in="loss", kl_estimator="k1")
    out, stats = make_experience(batch(), algo, kl_coef=0.5, group_size=2)
    adv = out["advantages"]
    # groups (1, 0) and (3, 3): (s - mean) / (unbiased std + eps) -> +-0.7071, then 0, 0
    expected = torch.tensor([0.70710677, -0.70710677, 0.0, 0.0])
    assert torch.allclose(adv[:, 2], expected, atol=1e-5)
    assert torch.equal(adv[:, 2], adv[:, 3])
    assert torch.all(adv[:, [0, 1, 4]] == 0)
    assert stats["kl"] == pytest.approx(0.2, abs=1e-6)  # 2 tokens x 0.1 per sequence
    assert stats["reward/mean"] == pytest.approx(1.75)
    # the reward itself carries no KL penalty when kl_in == 'loss'
    assert out["rewards"].sum(1).tolist() == pytest.approx([1.0, 0.0, 3.0, 3.0])


def test_kl_in_reward_subtracts_penalty_per_token():
    algo = AlgorithmConfig(estimator="rloo", kl_in="reward", kl_estimator="k1", whiten_advantages=False)
    out, _ = make_experience(batch(), algo, kl_coef=0.5, group_size=2)
    r = out["rewards"]
    assert r[0, 2].item() == pytest.approx(-0.05)  # -kl_coef * 0.1
    assert r[0, 3].item() == pytest.approx(1.0 - 0.05)  # score on the last response token
    # RLOO with equal penalties: advantage = s_i - s_other
    assert out["advantages"][:, 2].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-6)


def test_gae_adds_returns_and_whitens():
    algo = AlgorithmConfig(
        estimator="gae", kl_in="reward", kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False
    )
    out, stats = make_experience(batch(), algo, kl_coef=0.0, group_size=1)
    # gamma = lam = 1: returns are the score from every response token; advantages = returns - V
    assert out["returns"][:, 2].tolist() == pytest.approx([1.0, 0.0, 3.0, 3.0])
    assert out["advantages"][:, 3].tolist() == pytest.approx([0.5, -0.5, 2.5, 2.5])
    assert stats["value/mean"] == pytest.approx(0.5)
    whitened, _ = make_experience(batch(), AlgorithmConfig(estimator="gae", kl_coef=0.0), 0.0, 1)
    m = whitened["response_mask"].bool()
    assert whitened["advantages"][m].mean().item() == pytest.approx(0.0, abs=1e-5)


def test_reward_clip_and_normalizer():
    algo = AlgorithmConfig(estimator="reinforce_pp", reward_clip=2.0, kl_coef=0.0)
    norm = RewardNormalizer()
    out, stats = make_experience(batch(), algo, kl_coef=0.0, group_size=2, normalizer=norm)
    assert norm.count == 4
    assert norm.std == pytest.approx(torch.tensor([1.0, 0.0, 3.0, 3.0]).std().item(), rel=1e-6)
    assert out["rewards"].max().item() <= 2.0
    assert stats["reward/max"] == 3.0  # statistics report the raw scores


def test_without_trainer_logprobs_the_kl_uses_the_samplers():
    """When the update makes its own old log-probs (OldLogprobs.FROM_UPDATE), the batch holds
    only the sampler's `rollout_logprobs`: the KL is measured with those, and the advantages are unchanged."""
    full = batch()
    sampler_only = Batch({k: v for k, v in full.tensors.items() if k != "logprobs"})
    sampler_only["rollout_logprobs"] = full["logprobs"] - 0.05 * full["response_mask"]
    mark_old_logprobs(sampler_only, OldLogprobs.FROM_UPDATE)
    algo = AlgorithmConfig(estimator="grpo", kl_in="loss", kl_estimator="k1")
    out, stats = make_experience(sampler_only, algo, kl_coef=0.5, group_size=2)
    assert stats["kl"] == pytest.approx(0.1, abs=1e-6)  # 2 tokens x (0.1 - 0.05) per sequence
    assert "logprobs" not in out
    expected, _ = make_experience(batch(), algo, kl_coef=0.5, group_size=2)
    assert torch.equal(out["advantages"], expected["advantages"])
    assert stats["rollout_vs_trainer_logprob_diff"] != stats["rollout_vs_trainer_logprob_diff"]  # NaN
