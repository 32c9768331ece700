"""Held-out evaluation of the SFT and the RL policy for the pipeline's report.

Both policies answer the same held-out prompts on their own vLLM `RolloutEngine`: one temperature-1
sample per prompt with the same seeds (the honest measure: what the policy actually does) and, if asked,
the greedy answer. Prompts (`held_out_prompts`: the first `pipeline.n_eval_prompts` of `data.eval_path`)
and sampling (`sample_held_out`) are shared with `PPOTrainer.evaluate`, so with `run.eval_prompts` equal
to `pipeline.n_eval_prompts` the RL curve's first and last points are these figures. Each answer gets the hidden gold score (`run.eval_function`), the learned reward
model's score, its length and, for samples, its KL to the reference (the SFT policy): the sum over the
answer's tokens of log pi(token) - log pi_ref(token), whose mean over samples of pi estimates
KL(pi || pi_ref) per answer without bias (the k1 estimator at the sequence level). Both log-probs come
from vLLM at temperature 1: the sampler's own, and the SFT engine scoring the answer (`logprobs`), so
the SFT policy's KL to itself is 0 up to float noise.

Per-answer values are kept, so the report can pair the two policies prompt by prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import torch

from actors.placement import role_options
from rlhf_ray.batch import Batch
from rlhf_ray.config import RLHFConfig
from rlhf_ray.trainer.pipeline_layout import Layout
from rlhf_ray.trainer.roles import wait_for


@ray.remote(num_cpus=0)
def answer_stats(
    function: str, batch: Batch, scores: Batch, ref_logprobs: torch.Tensor | None
) -> dict[str, list[Any]]:
    """Per answer: gold (`function`), reward (the reward model's score), length in tokens, the prompt and
    response texts and, when reference log-probs are given, the answer's log-ratio to the reference (its KL
    contribution)."""
    from rlhf_ray.rewards import fields_of, load_rule_function, score_with_rule

    fn = load_rule_function(function)
    mask = batch["response_mask"]
    prompts, responses = batch.meta["prompt"], batch.meta["response"]
    out = {
        "gold": score_with_rule(fn, prompts, responses, function, fields_of(batch.meta)),
        "reward": scores["scores"].float().tolist(),
        "length": mask.sum(1).tolist(),
        "prompt": list(batch.meta["prompt"]),  # the texts, for the report's examples
        "response": list(batch.meta["response"]),
    }
    if ref_logprobs is not None:
        out["kl"] = ((batch["rollout_logprobs"] - ref_logprobs) * mask).sum(1).tolist()
    return out


def held_out_prompts(cfg: RLHFConfig, n: int) -> list[list[int]]:
    """Token ids of the first `n` prompts of `data.eval_path` that pass the length check (a skipped one
    does not count): the held-out prompts of every evaluation."""
    return held_out_records(cfg, n)[0]


def held_out_records(cfg: RLHFConfig, n: int) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """`held_out_prompts` and, aligned with them, each prompt record's other fields (e.g. the answer a
    verifiable task's `run.eval_function` checks against)."""
    from rlhf_ray.data import encode_prompts, load_records
    from rlhf_ray.data.prompts import record_fields
    from rlhf_ray.models import load_tokenizer

    records = load_records(cfg.data.eval_path, [cfg.data.prompt_field])
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.policy_path, cfg.data.chat_template)
    _, ids, _ = encode_prompts(records[cfg.data.prompt_field], tokenizer, cfg.data, what="held-out prompt")
    kept = [(x, f) for x, f in zip(ids, record_fields(records, cfg.data.prompt_field)) if x is not None][:n]
    return [x for x, _ in kept], [f for _, f in kept]


def sample_held_out(
    engine: Any,
    prompts: list[list[int]],
    cfg: RLHFConfig,
    greedy: bool,
    fields: list[dict[str, Any]] | None = None,
) -> ray.ObjectRef:
    """Ref of one answer per prompt from a `RolloutEngine`: greedy, or sampled with the seed `run.seed`
    (the same samples in every evaluation of the same weights); `fields`: the prompts' record fields,
    carried in the batch for the reward and the eval function."""
    return engine.generate.remote(prompts, 1, greedy=greedy, seed=cfg.run.seed, fields=fields)


def evaluate_policies(
    cfg: RLHFConfig, policies: dict[str, str | Path], reference: str
) -> dict[str, dict[str, Any]]:
    """{policy: {"sampled": per-answer stats, "greedy": ...}} for each named policy directory; the reward
    model is `model.reward_path`; the reference is the policy named `reference` (it must be one of them)."""
    import dataclasses

    from actors.reward import RewardModel
    from actors.rollout import RolloutEngine

    if reference not in policies:
        raise ValueError(
            f"evaluate_policies: reference {reference!r} is not one of the policies {list(policies)}"
        )

    prompts, fields = held_out_records(cfg, cfg.pipeline.n_eval_prompts)
    function = cfg.run.eval_function or ""
    engines = {
        name: RolloutEngine.options(**role_options(cfg.placement.rollout)).remote(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, policy_path=str(path)))
        )
        for name, path in policies.items()
    }
    reward = RewardModel.options(**role_options(cfg.placement.reward)).remote(cfg)
    try:
        pending = {}
        for name, engine in engines.items():
            sampled = sample_held_out(engine, prompts, cfg, greedy=False, fields=fields)
            pending[f"{name}/sampled"] = answer_stats.remote(
                function, sampled, reward.score.remote(sampled), engines[reference].logprobs.remote(sampled)
            )
            if cfg.pipeline.report_greedy:
                greedy = sample_held_out(engine, prompts, cfg, greedy=True, fields=fields)
                pending[f"{name}/greedy"] = answer_stats.remote(
                    function, greedy, reward.score.remote(greedy), None
                )
        results = wait_for(pending, cfg.run.call_timeout_s)
    finally:
        for handle in (*engines.values(), reward):
            ray.kill(handle, no_restart=True)
    out: dict[str, dict[str, Any]] = {name: {} for name in policies}
    for key, stats in results.items():
        name, mode = key.split("/")
        out[name][mode] = stats
    return out


def evaluate_stage(cfg: RLHFConfig, lay: Layout) -> dict[str, Any]:
    """The pipeline's evaluation: the SFT policy against the RL policy on the held-out prompts."""
    return evaluate_policies(cfg, {"sft": lay.sft, "rl": lay.rl_policy}, reference="sft")
