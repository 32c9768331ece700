"""The numeric core of rlhf_ray: pure torch functions (no I/O, no Ray) for masked statistics, KL
estimators and controllers, advantage estimators and training losses (by name in `registry`), DAPO's
reward shaping, rollout-vs-trainer correction and pass@k. Actors call these; they never re-implement them."""

from rlhf_ray.algorithms.advantages import (
    broadcast_to_tokens,
    compute_gae,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_rloo_advantages,
    sequence_to_token_rewards,
)
from rlhf_ray.algorithms.correction import (
    mis_mask,
    ratio_stats,
    sequence_log_ratio,
    sequence_tis_weights,
    token_tis_weights,
)
from rlhf_ray.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhf_ray.algorithms.losses import (
    aggregate_loss,
    bradley_terry_loss,
    dpo_loss,
    gspo_policy_loss,
    ppo_policy_loss,
    sft_loss,
    value_loss,
    value_loss_stats,
)
from rlhf_ray.algorithms.passk import mean_at_k, pass_at_k
from rlhf_ray.algorithms.registry import (
    AdvantageInputs,
    Estimator,
    PolicyLoss,
    estimator_names,
    get_estimator,
    get_policy_loss,
    policy_loss_names,
    register_estimator,
    register_policy_loss,
    resolve_loss_agg,
)
from rlhf_ray.algorithms.shaping import informative_groups, overlong_penalty
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
    "AdvantageInputs",
    "Estimator",
    "FixedKLController",
    "PolicyLoss",
    "aggregate_loss",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "compute_gae",
    "compute_grpo_advantages",
    "compute_reinforce_pp_advantages",
    "compute_rloo_advantages",
    "dpo_loss",
    "entropy_from_logits",
    "estimator_names",
    "get_estimator",
    "get_policy_loss",
    "gspo_policy_loss",
    "informative_groups",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_at_k",
    "mis_mask",
    "overlong_penalty",
    "pass_at_k",
    "policy_loss_names",
    "ppo_policy_loss",
    "ratio_stats",
    "register_estimator",
    "register_policy_loss",
    "resolve_loss_agg",
    "sequence_log_ratio",
    "sequence_tis_weights",
    "sequence_to_token_rewards",
    "sft_loss",
    "token_tis_weights",
    "value_loss",
    "value_loss_stats",
]
