"""Stage 3, the reward model: the driver loop over preference pairs on a DeepSpeed worker group.

Input: the first of `model.reward_path`, `<run.output_dir>/sft` (what the SFT stage of the same run
wrote) and `model.policy_path` that is set and exists: a causal LM (a new scalar head starts at zero) or a
value model to train further; `data.train_path` with the fields `data.prompt_field`,
`data.chosen_field`, `data.rejected_field`; held out: `data.eval_path` or `data.eval_fraction`.
Output: `<run.output_dir>/reward_model`, a directory that `rlhf_ray.models.load_value_model` loads and
`actors.reward.RewardModel` serves (reward.kind='model', model.reward_path=<it>), and
`<run.output_dir>/logs/reward_model/`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from actors.placement import role_options
from actors.reward_trainer import RewardTrainer
from actors.worker_group import combine_rank_stats, wait_all
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.data import encode_preferences
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainer.offline import (
    fit_epochs,
    load_split,
    rank_config,
    require_model_dir,
    stage_settings,
    summary,
)

BAR = {"train/loss": "loss", "train/accuracy": "acc", "tokens_per_s": "tok/s", "eval/accuracy": "eval_acc"}


def reward_init_path(cfg: RLHFConfig) -> str:
    """Where the reward model starts (see the module docstring)."""
    sft_dir = Path(cfg.run.output_dir) / "sft"
    if cfg.model.reward_path:
        return require_model_dir(cfg.model.reward_path, "model.reward_path")
    if sft_dir.is_dir():
        return str(sft_dir)
    if cfg.model.policy_path:
        return require_model_dir(cfg.model.policy_path, "model.policy_path")
    raise ConfigError(
        f"the reward model has no starting point: set model.reward_path (or model.policy_path) to a model "
        f"directory, or run the SFT stage first so that {str(sft_dir)!r} exists"
    )


def run_reward_model(
    cfg: RLHFConfig, *, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None
) -> dict[str, Any]:
    """Train a Bradley-Terry reward model on the preference pairs. Returns a summary: `model` (the saved
    directory), `eval/accuracy` (held-out pairs whose chosen response scores higher; a tie counts half),
    `eval/loss`, `eval/margin` and their `_initial` values, `train/...`, `metrics`, `plot`, `seconds`."""
    t0 = time.perf_counter()
    settings = stage_settings(cfg, "reward_model", epochs=epochs, batch_size=batch_size, lr=lr)
    init = reward_init_path(cfg)
    tokenizer_path = cfg.model.tokenizer_path or init
    tokenizer = load_tokenizer(tokenizer_path, cfg.data.chat_template)
    fields = [cfg.data.prompt_field, cfg.data.chosen_field, cfg.data.rejected_field]
    train_records, eval_records = load_split(cfg, fields)
    train = encode_preferences(train_records, tokenizer, cfg.data)
    held_out = encode_preferences(eval_records, tokenizer, cfg.data) if eval_records is not None else None
    out_dir, timeout = Path(cfg.run.output_dir), cfg.run.call_timeout_s

    ranks_cfg = rank_config(cfg, "reward_model", settings, reward_path=init, tokenizer_path=tokenizer_path)
    options = [role_options(cfg.placement.policy) for _ in range(cfg.trainer.num_ranks)]
    trainer = RewardTrainer(ranks_cfg, options, init_timeout=timeout)
    try:
        evaluate = None
        if held_out is not None:
            held_out_ref = ray.put(held_out)

            def evaluate() -> dict[str, float]:
                stats = trainer.evaluate(held_out_ref, timeout)
                return {f"eval/{k}": v for k, v in stats.items() if k != "pairs"}

        def train_step(ref: ray.ObjectRef) -> dict[str, float]:
            return combine_rank_stats(wait_all(trainer.train(ref), timeout, "reward model train step"))

        result = fit_epochs(
            "reward_model",
            cfg,
            settings,
            train,
            train_step,
            evaluate,
            out_dir / "logs" / "reward_model",
            BAR,
            plot_keys=("train/loss", "eval/loss", "eval/accuracy"),
        )
        model_dir = trainer.save_pretrained(str(out_dir / "reward_model"), timeout)
    finally:
        trainer.kill()
    n_eval = len(held_out) if held_out is not None else 0
    return summary("reward_model", model_dir, result, len(train), n_eval, t0) | {"init": init}
