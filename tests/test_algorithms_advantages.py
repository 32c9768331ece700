"""Advantage estimators: hand-computed values, float64 python loops on seeded random batches, and the
edge cases (prompt region masked, right padding, one-token and empty responses, identical scores)."""

import math
import statistics

import pytest
import torch

from rlhf_ray.algorithms import (
    broadcast_to_tokens,
    compute_gae,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_rloo_advantages,
    sequence_to_token_rewards,
)


def _random_rows(seed: int, batch: int = 6, length: int = 10):
    """float64 rewards/values with garbage outside the mask; each row: a masked prompt, a response, then
    right padding. Row 0 has no response at all, row 1 a one-token response, row 2 ends at T - 1."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, length, generator=g, dtype=torch.float64)
    values = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, length, dtype=torch.float64)
    mask[1, 4] = 1.0
    mask[2, 3:] = 1.0
    for b in range(3, batch):
        start = int(torch.randint(0, length - 1, (1,), generator=g))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=g))
        mask[b, start:end] = 1.0
    return rewards, values, mask


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def _span(mask_row):
    idx = [t for t, m in enumerate(mask_row.tolist()) if m != 0]
    return (idx[0], idx[-1] + 1) if idx else (0, 0)


# ---- GAE --------------------------------------------------------------------------------------------
def test_gae_hand_values_gamma_1():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t=2: 1 - 0.7 = 0.3; t=1: (0.7 - 0.6) + 0.5 * 0.3 = 0.25; t=0: (0.6 - 0.5) + 0.5 * 0.25 = 0.225
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])


def test_gae_hand_values_discounted():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.95)
    # t=2: 0.3; t=1: 0.9*0.7 - 0.6 + 0.855*0.3 = 0.2865; t=0: 0.9*0.6 - 0.5 + 0.855*0.2865 = 0.2849575
    assert adv[0].tolist() == pytest.approx([0.2849575, 0.2865, 0.3])
    assert ret[0].tolist() == pytest.approx([0.7849575, 0.8865, 1.0])


def test_gae_ignores_prompt_region_and_right_padding():
    # the same response as above, behind a masked prompt of 2 tokens and before 1 pad; garbage outside
    rewards = torch.tensor([[5.0, 5.0, 0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.0, 0.0, 0.225, 0.25, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.0, 0.0, 0.725, 0.85, 1.0, 0.0])


def test_gae_one_token_and_empty_rows():
    rewards = torch.tensor([[0.0, 2.0, 7.0], [3.0, 3.0, 3.0]])
    values = torch.tensor([[4.0, 0.5, 4.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 0], [0, 0, 0]])  # one response token; no response token
    adv, ret = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    _close(adv, [[0.0, 1.5, 0.0], [0.0, 0.0, 0.0]])
    _close(ret, [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(("seed", "gamma", "lam"), [(0, 1.0, 0.95), (1, 0.99, 0.9), (2, 0.5, 1.0)])
def test_gae_matches_python_loop(seed, gamma, lam):
    rewards, values, mask = _random_rows(seed)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b in range(mask.shape[0]):
        start, end = _span(mask[b])
        expected_adv = [0.0] * mask.shape[1]
        running = 0.0
        for t in range(end - 1, start - 1, -1):
            next_value = values[b, t + 1].item() if t + 1 < end else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            expected_adv[t] = running
        expected_ret = [
            a + values[b, t].item() if start <= t < end else 0.0 for t, a in enumerate(expected_adv)
        ]
        assert adv[b].tolist() == pytest.approx(expected_adv, abs=1e-12)
        assert ret[b].tolist() == pytest.approx(expected_ret, abs=1e-12)


def test_gae_carries_no_gradient():
    values = torch.tensor([[0.5, 0.6]], requires_grad=True)
    adv, ret = compute_gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


# ---- GRPO / Dr. GRPO ---------------------------------------------------------------------------------
def test_grpo_hand_values():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = compute_grpo_advantages(scores, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(1/3): +-0.5 / 0.57735 = +-0.866025; group 2 identical -> 0
    assert adv.tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0], abs=1e-5)
    dr = compute_grpo_advantages(scores, group_size=4, scale_by_std=False)
    assert dr.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_grpo_identical_scores_give_exact_zero():
    # 0.1 seven times: the float mean is off by an ulp, which / eps would otherwise give ~0.0075
    scores = torch.full((7,), 0.1)
    adv = compute_grpo_advantages(scores, group_size=7)
    assert torch.equal(adv, torch.zeros(7))
    assert torch.equal(compute_grpo_advantages(scores, group_size=7, scale_by_std=False), torch.zeros(7))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_python_loop(scale_by_std):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(15, generator=g, dtype=torch.float64)
    adv = compute_grpo_advantages(scores, group_size=5, scale_by_std=scale_by_std)
    for i in range(0, 15, 5):
        group = scores[i : i + 5].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)
        expected = [(s - mean) / (std + 1e-6) if scale_by_std else s - mean for s in group]
        assert adv[i : i + 5].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fn", [compute_grpo_advantages, compute_rloo_advantages])
def test_group_estimators_reject_bad_groups(fn):
    with pytest.raises(ValueError, match="samples_per_prompt"):
        fn(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        fn(torch.zeros(5), 2)


# ---- RLOO ---------------------------------------------------------------------------------------------
def test_rloo_hand_values():
    adv = compute_rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 1.0, 3.0, 3.0, 3.0]), group_size=4)
    # 1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2;  1 - 3, 3 - 7/3 (x3)
    expected = [-8 / 3, -4 / 3, 0.0, 4.0, -2.0, 2 / 3, 2 / 3, 2 / 3]
    assert adv.tolist() == pytest.approx(expected)
    pair = compute_rloo_advantages(torch.tensor([1.0, 3.0]), group_size=2)
    assert pair.tolist() == pytest.approx([-2.0, 2.0])
    _close(compute_rloo_advantages(torch.full((3,), 0.7), 3), [0.0, 0.0, 0.0])  # to an ulp of the sum


def test_rloo_matches_python_loop():
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    adv = compute_rloo_advantages(scores, group_size=3)
    for i in range(12):
        start = i - i % 3
        others = [scores[j].item() for j in range(start, start + 3) if j != i]
        assert adv[i].item() == pytest.approx(scores[i].item() - sum(others) / 2, abs=1e-12)


# ---- REINFORCE++ --------------------------------------------------------------------------------------
def test_reinforce_pp_hand_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0], [9.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    adv = compute_reinforce_pp_advantages(rewards, mask, gamma=1.0)
    # returns on valid tokens: 1, 1, 1 and 2; mean 1.25, unbiased var 0.25 -> (G - 1.25) / 0.5
    _close(adv, [[-0.5, -0.5, -0.5, 0.0], [0.0, 1.5, 0.0, 0.0]])


def test_reinforce_pp_discounting_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = compute_reinforce_pp_advantages(rewards, mask, gamma=0.5)
    returns = [0.25, 0.5, 1.0, 2.0, 4.0]  # row 0: 1 discounted twice; row 1: 4 discounted once
    mean, std = statistics.fmean(returns), math.sqrt(statistics.variance(returns) + 1e-8)
    w = [(g - mean) / std for g in returns]
    _close(adv, [[w[0], w[1], w[2]], [w[3], w[4], 0.0]])


@pytest.mark.parametrize(("seed", "gamma"), [(3, 1.0), (4, 0.9)])
def test_reinforce_pp_matches_python_loop(seed, gamma):
    rewards, _, mask = _random_rows(seed)
    adv = compute_reinforce_pp_advantages(rewards, mask, gamma=gamma)
    returns = {}
    for b in range(mask.shape[0]):
        start, end = _span(mask[b])
        running = 0.0
        for t in range(end - 1, start - 1, -1):
            running = rewards[b, t].item() + gamma * running
            returns[b, t] = running
    mean = statistics.fmean(returns.values())
    std = math.sqrt(statistics.variance(returns.values()) + 1e-8)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            expected = (returns[b, t] - mean) / std if (b, t) in returns else 0.0
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-10)


def test_reinforce_pp_all_masked_is_zero_not_nan():
    adv = compute_reinforce_pp_advantages(torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.equal(adv, torch.zeros(2, 3))


# ---- token helpers ------------------------------------------------------------------------------------
def test_sequence_to_token_rewards_puts_score_on_last_response_token():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    out = sequence_to_token_rewards(scores, mask)
    assert out.tolist() == [[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 4]]
    assert out.dtype == scores.dtype


def test_broadcast_to_tokens():
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert broadcast_to_tokens(adv, mask).tolist() == [[0.0, 0.5, 0.5], [-2.0, 0.0, 0.0]]


def test_sequence_reward_with_kl_penalty_through_gae():
    # the driver's GAE path: score on the last token, minus beta * per-token KL; gamma = lam = 1 and
    # zero values make the advantage the reward-to-go
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.0, 0.1, 0.2, 0.0]])
    rewards = sequence_to_token_rewards(torch.tensor([1.0]), mask) - 0.5 * kl
    adv, _ = compute_gae(rewards, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 1.0 - 0.05 - 0.1, 1.0 - 0.1, 0.0])
