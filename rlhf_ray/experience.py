"""Turn a scored rollout into training experience: KL penalty, rewards per token, advantages, returns.

Pure torch over a `Batch` (no Ray, no I/O): the driver has it run on the glue worker
(`actors.glue`) from the object-store references of the roles' outputs, so the batch tensors never pass
through the driver.

It is also the one home of where the PPO ratio's old log-probs come from (`OldLogprobs`): decided once
from the config (`old_logprobs_source`), written into the batch (`mark_old_logprobs`), and read back by
whoever needs it (`old_logprobs_of`): the KL here and the policy ranks' update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from rlhf_ray.algorithms import (
    AdvantageInputs,
    get_estimator,
    kl_estimate,
    masked_mean,
    masked_whiten,
    overlong_penalty,
    sequence_to_token_rewards,
)
from rlhf_ray.batch import Batch
from rlhf_ray.config import AlgorithmConfig, RLHFConfig


class OldLogprobs(StrEnum):
    """Where the PPO ratio's "old" log-probs of a batch come from."""

    # a scoring pass of the policy ranks before the update: the batch's `logprobs` field
    SCORED = "scored"
    # the update's own forward, detached: exact only when one optimiser step takes the whole batch (the
    # ratio is then 1, as TRL's num_iterations=1); saves a policy forward per step. The sampler's
    # `rollout_logprobs` stand in for the policy's in the KL metric.
    FROM_UPDATE = "from_update"


OLD_LOGPROBS_KEY = "old_logprobs"  # the batch's per-row record of its `OldLogprobs`


def old_logprobs_source(cfg: RLHFConfig) -> OldLogprobs:
    """`FROM_UPDATE` when `algorithm.old_logprobs=auto`, one optimiser step takes the step's whole batch
    (ppo_epochs=1, mini_batch_size >= prompts_per_step * samples_per_prompt), the KL is in the loss (in
    the reward it must be the policy's own before the update) and the sampler's log-probs are the policy's
    (rollout.top_p=1: under top-p they are those of the truncated distribution, wrong for the KL metric);
    `SCORED` otherwise."""
    a = cfg.algorithm
    batch = cfg.run.prompts_per_step * cfg.rollout.samples_per_prompt
    one_step = a.ppo_epochs == 1 and a.mini_batch_size >= batch
    plain_sampler = cfg.rollout.top_p == 1.0
    auto = a.old_logprobs == "auto" and one_step and a.kl_in == "loss" and plain_sampler
    return OldLogprobs.FROM_UPDATE if auto else OldLogprobs.SCORED


def mark_old_logprobs(batch: Batch, source: OldLogprobs) -> Batch:
    """`batch` recording where its old log-probs come from (a `SCORED` batch must hold `logprobs`)."""
    if source is OldLogprobs.SCORED and "logprobs" not in batch:
        raise ValueError("mark_old_logprobs: a SCORED batch needs the policy's 'logprobs' field")
    batch.meta[OLD_LOGPROBS_KEY] = [source.value] * len(batch)
    return batch


def old_logprobs_of(batch: Batch) -> OldLogprobs:
    """Where `batch`'s old log-probs come from: its record (`mark_old_logprobs`); a batch without one
    is `SCORED` when it holds `logprobs` (made by hand, e.g. in tests) and an error otherwise."""
    marks = set(batch.meta.get(OLD_LOGPROBS_KEY, []))
    if len(marks) > 1:
        raise ValueError(f"batch rows disagree on where their old log-probs come from: {sorted(marks)}")
    if marks:
        return OldLogprobs(marks.pop())
    if "logprobs" in batch:
        return OldLogprobs.SCORED
    raise ValueError(
        "the batch has no old log-probs ('logprobs') and does not say where they come from: score it "
        "with the policy's compute_logprobs, or mark it with "
        "rlhf_ray.experience.mark_old_logprobs(batch, OldLogprobs.FROM_UPDATE)"
    )


@dataclass
class RewardNormalizer:
    """Running mean/std of sequence scores (Welford), so reward scale stays stable across steps."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, scores: torch.Tensor) -> None:
        for x in scores.double().tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0


def make_experience(
    batch: Batch,
    algo: AlgorithmConfig,
    kl_coef: float,
    group_size: int,
    normalizer: RewardNormalizer | None = None,
    max_len: int | None = None,
) -> tuple[Batch, dict[str, float]]:
    """Add `rewards`, `advantages` (and `returns` for an estimator with a critic, GAE) to a batch holding
    `scores`, `ref_logprobs`, the policy's `logprobs` (a `SCORED` batch, see `old_logprobs_of`) or only the
    sampler's `rollout_logprobs` (`FROM_UPDATE`), and `values` for GAE. `algo.estimator` picks the
    estimator (`rlhf_ray.algorithms.registry`). `max_len` (rollout.max_new_tokens) is the generation
    limit that `algo.overlong_buffer` counts back from. Returns the batch and step statistics."""
    mask = batch["response_mask"].float()
    scores = batch["scores"].float()
    raw_scores = scores.clone()
    extra: dict[str, float] = {}
    if algo.overlong_buffer:  # DAPO's soft overlong penalty, on the score before normalising
        if max_len is None:
            raise ValueError(
                "make_experience: algorithm.overlong_buffer > 0 needs max_len (rollout.max_new_tokens)"
            )
        penalty = overlong_penalty(mask.sum(dim=1), max_len, algo.overlong_buffer, algo.overlong_penalty)
        scores = scores + penalty
        extra["overlong/penalty_mean"] = penalty.mean().item()
        extra["overlong/frac_penalised"] = (penalty < 0).float().mean().item()
    if normalizer is not None:
        normalizer.update(scores)
        scores = scores / max(normalizer.std, 1e-6)
    if algo.reward_clip is not None:
        scores = scores.clamp(-algo.reward_clip, algo.reward_clip)

    # the policy's log-probs: the trainer's, or the sampler's when the trainer's are not computed
    # (OldLogprobs.FROM_UPDATE; equal up to kernel differences in the same precision)
    scored = old_logprobs_of(batch) is OldLogprobs.SCORED
    policy_logprobs = batch["logprobs"] if scored else batch["rollout_logprobs"]
    kl = kl_estimate(policy_logprobs, batch["ref_logprobs"], algo.kl_estimator) * mask
    kl_per_seq = kl.sum(dim=1)
    penalty = kl_coef * kl if algo.kl_in == "reward" else torch.zeros_like(kl)
    token_rewards = sequence_to_token_rewards(scores, mask) - penalty

    estimator = get_estimator(algo.estimator)
    values = batch["values"].float() if "values" in batch else None
    if estimator.needs_critic and values is None:
        raise ValueError(
            f"make_experience: estimator {algo.estimator!r} learns a critic; the batch has no 'values'"
        )
    # group estimators sum token_rewards per row: the score minus the summed KL penalty when kl_in == 'reward'
    inputs = AdvantageInputs(token_rewards, mask, group_size, algo.gamma, algo.lam, values)
    advantages, returns = estimator(inputs)
    if returns is not None:
        batch["returns"] = returns
    if algo.whiten_advantages and estimator.whiten:
        advantages = masked_whiten(advantages, mask) * mask

    batch["rewards"] = token_rewards
    batch["advantages"] = advantages
    lengths = mask.sum(dim=1)
    stats = {
        "reward/mean": raw_scores.mean().item(),
        "reward/std": raw_scores.std().item() if len(raw_scores) > 1 else 0.0,
        "reward/max": raw_scores.max().item(),
        "reward/min": raw_scores.min().item(),
        "kl": kl_per_seq.mean().item(),
        "kl/per_token": masked_mean(kl, mask).item(),
        "kl_coef": kl_coef,
        "advantage/mean": masked_mean(advantages, mask).item(),
        "advantage/std": masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt().item(),
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "rollout_vs_trainer_logprob_diff": masked_mean(
            (batch["rollout_logprobs"] - batch["logprobs"]).abs(), mask
        ).item()
        if scored and "rollout_logprobs" in batch
        else float("nan"),
    }
    if values is not None and returns is not None:
        stats["value/mean"] = masked_mean(values, mask).item()
        stats["return/mean"] = masked_mean(returns, mask).item()
    return batch, stats | extra
