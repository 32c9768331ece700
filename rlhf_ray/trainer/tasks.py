"""Small Ray tasks that combine the roles' outputs inside the cluster, so the driver holds only refs."""

from __future__ import annotations

import ray

from rlhf_ray.batch import Batch
from rlhf_ray.config import AlgorithmConfig
from rlhf_ray.experience import RewardNormalizer, make_experience
from rlhf_ray.rewards import check_scores, load_rule_function


@ray.remote(num_cpus=0)
def concat_batches(*batches: Batch) -> Batch:
    """Concatenate the engines' rollouts; prompt_index is renumbered to stay unique across engines."""
    offset, parts = 0, []
    for b in batches:
        if "prompt_index" in b.meta:
            b.meta["prompt_index"] = [i + offset for i in b.meta["prompt_index"]]
            offset = max(b.meta["prompt_index"], default=offset - 1) + 1
        parts.append(b)
    return Batch.concat(parts)


@ray.remote(num_cpus=0, num_returns=3)
def experience_task(
    rollout: Batch,
    logprobs: Batch | None,
    ref: Batch,
    scores: Batch,
    values: Batch | None,
    algo: AlgorithmConfig,
    kl_coef: float,
    group_size: int,
    normalizer: RewardNormalizer | None,
) -> tuple[Batch, dict[str, float], RewardNormalizer | None]:
    batch = rollout.union(ref).union(scores)
    if logprobs is not None:  # None: the update uses its own (RLHFConfig.reuses_training_logprobs)
        batch = batch.union(logprobs)
    if values is not None:
        batch = batch.union(values)
    batch, stats = make_experience(batch, algo, kl_coef, group_size, normalizer)
    stats["tokens"] = float(batch["response_mask"].sum())
    return batch, stats, normalizer


@ray.remote(num_cpus=0)
def eval_function_task(function: str, batch: Batch, scores: Batch) -> dict[str, float]:
    """Mean reward-model score and mean `function` score (e.g. the gold labeler) of an eval rollout."""
    out = {
        "eval/reward": float(scores["scores"].mean()),
        "eval/response_length": float(batch["response_mask"].sum(1).float().mean()),
    }
    if function:
        fn = load_rule_function(function)
        values = check_scores(fn(batch.meta["prompt"], batch.meta["response"]), len(batch), function)
        out["eval/gold"] = sum(values) / max(len(values), 1)
    return out
