"""Advantage estimators: GAE (with a critic) and the critic-free GRPO, Dr. GRPO, RLOO and REINFORCE++.

Per-token tensors are `[B, T]`, right-padded, with `mask` 1 on response tokens (the prompt region before
the response and the padding after it are 0). Sequence-level scores are `[N]`; group estimators expect
the `group_size` samples of one prompt to be consecutive. Everything here runs without gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.algorithms.stats import masked_whiten


def _check_groups(scores: Tensor, group_size: int, estimator: str) -> Tensor:
    if group_size < 2:
        raise ValueError(
            f"group_size={group_size}: estimator {estimator!r} compares samples of one prompt, so it needs "
            f"at least 2 (set rollout.samples_per_prompt=4, or use estimator 'gae')"
        )
    if scores.dim() != 1 or scores.numel() % group_size != 0:
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} cannot be split into groups of {group_size} consecutive "
            f"samples: pass a 1-d tensor whose length is a multiple of samples_per_prompt"
        )
    return scores.view(-1, group_size)


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016):
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns_t = A_t + V_t.

    Rewards and values are zeroed where `mask` is 0 and the value after the last position is 0, so the
    recursion runs over all T positions: right padding contributes nothing, and the prompt region before
    the response cannot reach the response (the recursion runs right to left). Both outputs are 0 where
    `mask` is 0. Assumes one contiguous response per row."""
    m = mask.to(values.dtype)
    r, v = rewards.to(values.dtype) * m, values * m
    advantages = torch.zeros_like(v)
    next_adv = torch.zeros_like(v[:, 0])
    next_value = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value = v[:, t]
    return advantages * m, (advantages + v) * m


@torch.no_grad()
def compute_grpo_advantages(
    scores: Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath): (s - group mean) / (group std + eps),
    the std unbiased. `scale_by_std=False` drops the division (Dr. GRPO, Liu et al. 2025), which removes
    the bias towards groups of near-identical scores. A group of identical scores gets 0. `[N] -> [N]`."""
    groups = _check_groups(scores, group_size, "grpo")
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    # the float mean of identical scores can be off by an ulp, which / eps would turn into a visible value
    identical = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(identical, 0.0, centred).view(-1)


@torch.no_grad()
def compute_rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline (Ahmadian et al. 2024): each sample's score minus the mean of the other
    samples drawn for the same prompt. `scores` holds groups of `group_size` consecutive samples."""
    groups = _check_groups(scores, group_size, "rloo")
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).view(-1)


@torch.no_grad()
def compute_reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ (Hu et al. 2025): the discounted return G_t = r_t + gamma G_{t+1} of the per-token
    rewards (zeroed where `mask` is 0), whitened over all response tokens of the batch (global
    normalisation instead of a critic or a per-prompt baseline); 0 where `mask` is 0."""
    m = mask.to(rewards.dtype)
    r = rewards * m
    returns = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    return masked_whiten(returns, m) * m


def sequence_to_token_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Put each sequence score `[B]` on the last response token of its row -> `[B, T]` (0 elsewhere; a row
    with no response token gets nothing). Add a per-token KL penalty to this for GAE/REINFORCE++."""
    batch, length = mask.shape
    positions = torch.arange(length, device=mask.device).expand(batch, length)
    last = torch.where(mask != 0, positions, -1).amax(dim=1)
    has_response = last >= 0
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.arange(batch, device=mask.device)[has_response]
    out[rows, last[has_response]] = scores[has_response]
    return out


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level advantages `[B]` (GRPO, RLOO) onto every response token: `adv[:, None] * mask`."""
    return advantages[:, None] * mask.to(advantages.dtype)
