"""The stages of `rlhf_ray.trainer.pipeline`, each a function `(stage config, layout) -> result dict`
that reads what the stage before it wrote and writes its own outputs (paths in `pipeline_layout.Layout`).

- data: the synthetic task's files and a random tiny model (pipeline.task=synthetic only);
- sft: `run_sft` on the demonstrations (settings `offline.sft`);
- preferences: two temperature-1 samples per prompt from the SFT policy on a vLLM `RolloutEngine`,
  ordered by the simulated labeler into (prompt, chosen, rejected) pairs (synthetic only);
- reward_model: `run_reward_model` on the pairs from the SFT weights (settings `offline.reward_model`);
- rl: `PPOTrainer` from the SFT policy against the reward (`reward.*`), reference = SFT policy;
- evaluate: the SFT and the RL policy on the held-out prompts (`rlhf_ray.trainer.evaluation`).

Which of them run, and what each reads, is the run's plan (`pipeline_layout.stage_plan`); the stage's
config (built by `stage_configs` in `rlhf_ray.trainer.pipeline`) holds the paths.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from actors.placement import role_options
from rlhf_ray.config import RLHFConfig
from rlhf_ray.trainer.pipeline_layout import Layout

log = logging.getLogger(__name__)


def data_stage(cfg: RLHFConfig, lay: Layout) -> dict[str, Any]:
    from rlhf_ray.data.synthetic import VOCAB, write_task
    from rlhf_ray.models import build_word_tokenizer, tiny_model

    p = cfg.pipeline
    paths = write_task(
        lay.task,
        seed=cfg.run.seed,
        n_demos=p.n_demos,
        n_train_prompts=p.n_train_prompts,
        n_eval_prompts=p.n_eval_prompts,
    )
    model = tiny_model(lay.init_model, build_word_tokenizer(VOCAB), seed=cfg.run.seed)
    return {k: str(v) for k, v in paths.items()} | {"model": str(model)}


def sft_stage(cfg: RLHFConfig, lay: Layout) -> dict[str, Any]:
    from rlhf_ray.trainer.sft import run_sft

    return run_sft(cfg)


def reward_model_stage(cfg: RLHFConfig, lay: Layout) -> dict[str, Any]:
    from rlhf_ray.trainer.reward_model import run_reward_model

    return run_reward_model(cfg)


def preferences_stage(cfg: RLHFConfig, lay: Layout) -> dict[str, Any]:
    """Sample two answers per prompt from the SFT policy (vLLM, temperature 1) and let the simulated
    labeler order them. Pairs of two identical answers carry no preference and are dropped."""
    from actors.rollout import RolloutEngine
    from rlhf_ray.data import encode_prompts, load_records, write_jsonl
    from rlhf_ray.data.synthetic import gold_reward, make_preference_records
    from rlhf_ray.models import load_tokenizer

    records = load_records(cfg.data.train_path, [cfg.data.prompt_field])
    n = min(cfg.pipeline.preference_prompts, len(records))
    order = np.random.default_rng([cfg.run.seed, 3]).permutation(len(records))[:n]
    texts = records.select(order)[cfg.data.prompt_field]
    tokenizer = load_tokenizer(cfg.model.policy_path, cfg.data.chat_template)
    texts, ids, _ = encode_prompts(texts, tokenizer, cfg.data, what="preference prompt")
    kept = [i for i, x in enumerate(ids) if x is not None]
    engine = RolloutEngine.options(**role_options(cfg.placement.rollout)).remote(cfg)
    try:
        batch = ray.get(
            engine.generate.remote([ids[i] for i in kept], 2, seed=cfg.run.seed * 7919 + 3),
            timeout=cfg.run.call_timeout_s,
        )
    finally:
        ray.kill(engine, no_restart=True)
    responses = batch.meta["response"]
    prompts = [texts[i] for i in kept]
    first, second = responses[0::2], responses[1::2]
    pairs = make_preference_records(prompts, first, second, seed=cfg.run.seed)
    lay.pairs.parent.mkdir(parents=True, exist_ok=True)
    tmp = lay.pairs.with_suffix(".tmp.jsonl")
    write_jsonl(tmp, pairs)
    tmp.replace(lay.pairs)
    gold = gold_reward(prompts * 2, first + second)
    log.info(
        "preferences: %d pairs from %d prompts (sampled SFT gold %.3f)", len(pairs), len(kept), np.mean(gold)
    )
    return {
        "pairs": str(lay.pairs),
        "prompts": len(kept),
        "num_pairs": len(pairs),
        "identical_dropped": len(kept) - len(pairs),
        "sft_sampled_gold_train_prompts": float(np.mean(gold)),
    }


def rl_stage(cfg: RLHFConfig, lay: Layout) -> dict[str, Any]:
    from rlhf_ray.trainer.ppo import PPOTrainer

    trainer = PPOTrainer(cfg)
    try:
        out = trainer.fit()
    finally:
        trainer.shutdown()
    return out | {"steps": cfg.run.total_steps}


def evaluate_stage(cfg: RLHFConfig, lay: Layout) -> dict[str, Any]:
    """The SFT policy (`model.policy_path`, the reference) against the RL policy on the held-out prompts."""
    from rlhf_ray.trainer.evaluation import evaluate_policies

    return evaluate_policies(cfg, {"sft": cfg.model.policy_path, "rl": lay.rl_policy}, reference="sft")


STAGE_FUNCTIONS = {
    "data": data_stage,
    "sft": sft_stage,
    "preferences": preferences_stage,
    "reward_model": reward_model_stage,
    "rl": rl_stage,
    "evaluate": evaluate_stage,
}
