"""Training losses: PPO and GSPO policy losses, value loss, the Bradley-Terry reward-model loss, DPO and
SFT, and `aggregate_loss`, the one reduction of a per-token loss that every policy loss uses.

Per-token tensors are `[B, T]`, right-padded, aligned with each other; `mask` is 1 on the tokens that
count (response tokens) and 0 elsewhere. Stats dicts hold detached python floats.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_ray.algorithms.kl import kl_estimate
from rlhf_ray.algorithms.stats import logprobs_from_logits, masked_mean, masked_sum

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES: tuple[str, ...] = typing.get_args(LossAgg)

# The PPO ratio exponentiates a log-ratio: clamped to [-20, 20] so one runaway token cannot make it inf.
_LOG_RATIO_CLAMP = 20.0


def aggregate_loss(
    per_token: Tensor, mask: Tensor, agg: LossAgg = "token-mean", max_len: int | None = None
) -> Tensor:
    """Reduce a `[B, T]` per-token loss to a scalar.

    token-mean: masked mean over all tokens of the batch (long responses weigh more);
    seq-mean-token-mean: masked mean of each row, then mean over the rows that have any token;
    seq-mean-token-sum-norm: each row's masked sum divided by a constant, `max_len` or else T (the padded
    length), then mean over all B rows (Dr. GRPO, Liu et al. 2025: no length normalisation bias; pass
    the generation limit as `max_len`, as the trainer does);
    seq-mean-token-sum: the same (its name before the `-norm` one was added; kept for existing configs).
    Every mode gives 0, not NaN, when the mask selects nothing."""
    if agg == "token-mean":
        return masked_mean(per_token, mask)
    if agg == "seq-mean-token-mean":
        row_mean = masked_mean(per_token, mask, dim=1)
        has_tokens = (mask != 0).any(dim=1)
        return masked_mean(row_mean, has_tokens)
    if agg in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        norm = per_token.shape[1] if max_len is None else max_len
        return (masked_sum(per_token, mask, dim=1) / norm).mean()
    raise ValueError(
        f"loss aggregation agg={agg!r} is not one of {', '.join(map(repr, LOSS_AGG_MODES))} "
        f"(see algorithm.loss_agg)"
    )


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: LossAgg = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate objective (Schulman et al. 2017), as a loss to minimise:
    r = exp(logprobs - old_logprobs),  loss_t = -min(r A, clip(r, 1 - eps, 1 + eps_high) A)
    (`clip_eps_high` defaults to `clip_eps`; a larger one is DAPO's "clip-higher"). With `dual_clip=c > 1`
    (Ye et al. 2020) the loss of a token with A < 0 is also capped at -c A, so a huge ratio on a bad
    action cannot blow up the update. The log-ratio is clamped to [-20, 20] before exp.

    Returns (loss, stats): stats are `clip_frac` (tokens where the clipped term is the active one),
    `dual_clip_frac`, `approx_kl` (k3 estimate of KL(old || new), masked mean), `ratio_mean`, `ratio_max`, `ratio_min`,
    `pg_loss`."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(
            f"dual_clip={dual_clip} must be > 1 (set algorithm.dual_clip=3.0, or null to disable)"
        )
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > cap)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, cap), per_token)
    loss = aggregate_loss(per_token, mask, agg, max_len)

    with torch.no_grad():
        valid = mask != 0
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask).item(),
            "dual_clip_frac": masked_mean(dual_active.float(), mask).item(),
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": ratio[valid].max().item() if bool(valid.any()) else 0.0,
            "ratio_min": ratio[valid].min().item() if bool(valid.any()) else 0.0,
            "pg_loss": loss.item(),
        }
    return loss, stats


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    dual_clip: float | None = None,
    agg: LossAgg = "seq-mean-token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Group sequence policy optimisation (Zheng et al. 2025, Qwen), as a loss to minimise: one importance
    ratio per sequence, the geometric mean of its token ratios,
    s_i = exp(mean over the response tokens of (logprobs - old_logprobs)),
    loss_i = -min(s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i), clipped per sequence, not per token.
    A_i is the mean of row i's token advantages (GRPO's are constant along a row). loss_i is put on every
    response token of row i and reduced by `aggregate_loss`: `seq-mean-token-mean` (the default) is the
    paper's mean over sequences. The paper clips far tighter than PPO (eps 3e-4, eps_high 4e-4), because a
    sequence ratio moves less than a token's. No dual clip (`dual_clip` must be None).

    Returns (loss, stats) with the keys of `ppo_policy_loss`; `clip_frac` and `ratio_*` count sequences."""
    if dual_clip is not None:
        raise ValueError(
            f"dual_clip={dual_clip}: the GSPO loss has no dual clip (set algorithm.dual_clip=null, "
            f"or use algorithm.policy_loss=ppo)"
        )
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=1)
    ratio = torch.exp(seq_log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))  # [B]
    seq_adv = masked_mean(advantages, mask, dim=1)
    unclipped = -seq_adv * ratio
    clipped = -seq_adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    per_seq = torch.maximum(unclipped, clipped)
    loss = aggregate_loss(per_seq[:, None].expand(logprobs.shape), mask, agg, max_len)

    with torch.no_grad():
        rows = (mask != 0).any(dim=1)
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), rows).item(),
            "dual_clip_frac": 0.0,
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask).item(),
            "ratio_mean": masked_mean(ratio, rows).item(),
            "ratio_max": ratio[rows].max().item() if bool(rows.any()) else 0.0,
            "ratio_min": ratio[rows].min().item() if bool(rows.any()) else 0.0,
            "pg_loss": loss.item(),
        }
    return loss, stats


def _value_loss_terms(
    values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None
) -> tuple[Tensor, Tensor]:
    unclipped = (values - returns).square()
    if clip is None:
        return unclipped, unclipped
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    return unclipped, (clipped_values - returns).square()


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = None
) -> Tensor:
    """Clipped value loss (PPO as in OpenAI baselines): 0.5 * masked mean of max((V - R)^2, (V_c - R)^2),
    V_c = old + clip(V - old, -clip, clip), so the critic cannot move further than `clip` from its rollout
    estimate for free. Plain 0.5 * masked-mean squared error when `clip` is None."""
    unclipped, clipped = _value_loss_terms(values, old_values, returns, clip)
    return 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)


@torch.no_grad()
def value_loss_stats(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = None
) -> dict[str, float]:
    """Diagnostics for `value_loss`: `vf_clip_frac` (tokens where the clipped term is active),
    `value_mean`, `return_mean`, `value_error` (masked mean |V - R|)."""
    unclipped, clipped = _value_loss_terms(values, old_values, returns, clip)
    return {
        "vf_clip_frac": masked_mean((clipped > unclipped).float(), mask).item(),
        "value_mean": masked_mean(values, mask).item(),
        "return_mean": masked_mean(returns, mask).item(),
        "value_error": masked_mean((values - returns).abs(), mask).item(),
    }


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Pairwise reward-model loss (Bradley-Terry; Ouyang et al. 2022): mean -log sigmoid(c - r - margin),
    `margin` (scalar or per pair) demanding a larger gap on pairs labelled as clearer (Llama 2)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation on summed sequence log-probs `[B]`, per pair.

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected);
    sigmoid (Rafailov et al. 2023; label smoothing ls as cDPO): -(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h);
    ipo (Azar et al. 2023): (h - 1 / (2 beta))^2.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]), rewards = beta (policy - ref), detached."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).square()
    else:
        raise ValueError(f"dpo loss_type={loss_type!r} is not one of 'sigmoid', 'ipo'")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sft_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Token-mean cross entropy over the response tokens only. Alignment: `logits[:, t]` predicts
    `labels[:, t]` (the caller shifts: logits of positions 0..T-2 against input_ids 1..T-1), and `mask`
    is aligned with `labels`. Labels where `mask` is 0 are ignored (they may be pad ids or -100)."""
    safe_labels = torch.where(mask != 0, labels, torch.zeros_like(labels))
    return -masked_mean(logprobs_from_logits(logits, safe_labels), mask)
