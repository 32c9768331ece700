"""Rollout-vs-trainer correction: the sampler (vLLM) and the trainer compute slightly different
log-probabilities for the same tokens, so the rollout is a little off-policy even at the first update.
Importance weights that correct for it (Yao et al. 2025, "truncated importance sampling", TIS), a mask that
drops sequences too far off (masked importance sampling, MIS) and statistics of the ratio.

The ratio is pi_trainer / pi_rollout per token: `exp(trainer_logprobs - rollout_logprobs)`, with the
log-ratio clamped to [-20, 20]. Per-token tensors are `[B, T]` with `mask` 1 on response tokens; the
weights carry no gradient and are 0 off the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.algorithms.stats import masked_mean, masked_sum

_LOG_RATIO_CLAMP = 20.0


def _log_ratio(trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    lr = (trainer_logprobs.detach() - rollout_logprobs.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.where(mask != 0, lr, torch.zeros((), dtype=lr.dtype, device=lr.device))


def sequence_log_ratio(
    trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, geometric: bool = False
) -> Tensor:
    """Each row's log importance ratio `[B]`: the sum over its response tokens of the token log-ratios
    (the ratio of the sequence probabilities), or their mean with `geometric=True` (the per-token
    geometric mean, which does not grow with the length). 0 for a row with no response token."""
    lr = _log_ratio(trainer_logprobs, rollout_logprobs, mask)
    return masked_mean(lr, mask, dim=1) if geometric else masked_sum(lr, mask, dim=1)


@torch.no_grad()
def token_tis_weights(
    trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float = 2.0
) -> Tensor:
    """Token-level TIS: min(ratio_t, cap) per token `[B, T]` (0 off the mask); multiply the per-token policy
    loss by it."""
    w = torch.exp(_log_ratio(trainer_logprobs, rollout_logprobs, mask)).clamp(max=cap)
    return w * mask.to(w.dtype)


@torch.no_grad()
def sequence_tis_weights(
    trainer_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    cap: float = 2.0,
    geometric: bool = False,
) -> Tensor:
    """Sequence-level TIS: min(sequence ratio, cap) per row `[B]` (see `sequence_log_ratio`)."""
    seq = sequence_log_ratio(trainer_logprobs, rollout_logprobs, mask, geometric)
    return torch.exp(seq).clamp(max=cap)


@torch.no_grad()
def mis_mask(
    trainer_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    low: float = 0.5,
    high: float = 2.0,
    geometric: bool = False,
) -> Tensor:
    """MIS: `[B]` bool, True for the rows whose sequence ratio lies in [low, high] (keep them; drop the
    others from the loss instead of down-weighting them). Bounds are inclusive."""
    if not 0 <= low <= 1 <= high:
        raise ValueError(f"MIS band [{low}, {high}] must hold 1 (0 <= low <= 1 <= high)")
    ratio = torch.exp(sequence_log_ratio(trainer_logprobs, rollout_logprobs, mask, geometric))
    return (ratio >= low) & (ratio <= high)


@torch.no_grad()
def ratio_stats(
    trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, band: tuple[float, float] = (0.9, 1.1)
) -> dict[str, float]:
    """Token ratio statistics over the response tokens: `rollout_ratio/mean`, `/max`, `/min` and
    `/frac_outside` (the share of tokens whose ratio is outside `band`, bounds inside). All 0 when the
    mask selects nothing."""
    valid = mask != 0
    ratio = torch.exp(_log_ratio(trainer_logprobs, rollout_logprobs, mask))
    if not bool(valid.any()):
        return {
            k: 0.0
            for k in (
                "rollout_ratio/mean",
                "rollout_ratio/max",
                "rollout_ratio/min",
                "rollout_ratio/frac_outside",
            )
        }
    outside = ((ratio < band[0]) | (ratio > band[1])).to(ratio.dtype)
    return {
        "rollout_ratio/mean": masked_mean(ratio, valid).item(),
        "rollout_ratio/max": ratio[valid].max().item(),
        "rollout_ratio/min": ratio[valid].min().item(),
        "rollout_ratio/frac_outside": masked_mean(outside, valid).item(),
    }
