"""The numeric core of rlhf_ray: pure torch functions (no I/O, no Ray) for masked statistics, KL
estimators and controllers, advantage estimators and training losses. Actors call these; they never
re-implement them."""

from rlhf_ray.algorithms.advantages import (
    broadcast_to_tokens,
    compute_gae,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_rloo_advantages,
    sequence_to_token_rewards,
)
from rlhf_ray.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_ray.algorithms.losses import (
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    ppo_policy_loss,
    sft_loss,
    value_loss,
    value_loss_stats,
)
from rlhf_ray.algorithms.stats import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "compute_gae",
    "compute_grpo_advantages",
    "compute_reinforce_pp_advantages",
    "compute_rloo_advantages",
    "dpo_loss",
    "entropy_from_logits",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "sequence_to_token_rewards",
    "sft_loss",
    "value_loss",
    "value_loss_stats",
]
