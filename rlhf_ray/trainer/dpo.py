"""DPO (direct preference optimisation, or IPO): the driver loop over preference pairs on a DeepSpeed
worker group whose ranks hold the policy and a frozen reference copy of its initial weights.

Input: the causal LM at `model.policy_path` (usually the SFT model) and `data.train_path` with the fields
`data.prompt_field`, `data.chosen_field`, `data.rejected_field`; held out: `data.eval_path` or
`data.eval_fraction`. Output: `<run.output_dir>/dpo`, an HF directory (model + tokenizer) that
transformers and vLLM load, and `<run.output_dir>/logs/dpo/`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from actors.dpo_trainer import DPOTrainer
from actors.placement import role_options
from actors.worker_group import combine_rank_stats, wait_all
from rlhf_ray.config import RLHFConfig
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

BAR = {
    "train/loss": "loss",
    "train/rewards/margin": "margin",
    "tokens_per_s": "tok/s",
    "eval/rewards/accuracy": "eval_acc",
}


def run_dpo(
    cfg: RLHFConfig,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    beta: float | None = None,
    loss_type: str | None = None,
) -> dict[str, Any]:
    """Optimise `model.policy_path` on the preference pairs with `dpo_loss` (`loss_type` 'sigmoid' or
    'ipo', strength `beta`). Returns a summary: `model` (the saved directory), `eval/rewards/accuracy`
    (held-out pairs whose chosen response gains more log-probability over the reference than the rejected
    one), `eval/rewards/margin`, `eval/loss` and their `_initial` values, `train/...`, `seconds`."""
    t0 = time.perf_counter()
    s = stage_settings(
        cfg, "dpo", epochs=epochs, batch_size=batch_size, lr=lr, beta=beta, loss_type=loss_type
    )
    init = require_model_dir(cfg.model.policy_path, "model.policy_path")
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or init, cfg.data.chat_template)
    fields = [cfg.data.prompt_field, cfg.data.chosen_field, cfg.data.rejected_field]
    train_records, eval_records = load_split(cfg, fields)
    train = encode_preferences(train_records, tokenizer, cfg.data)
    held_out = encode_preferences(eval_records, tokenizer, cfg.data) if eval_records is not None else None
    out_dir, timeout = Path(cfg.run.output_dir), cfg.run.call_timeout_s

    options = [role_options(cfg.placement.policy) for _ in range(cfg.trainer.num_ranks)]
    trainer = DPOTrainer(rank_config(cfg, "dpo", s), options, init_timeout=timeout)
    try:
        evaluate = None
        if held_out is not None:
            held_out_ref = ray.put(held_out)

            def evaluate() -> dict[str, float]:
                stats = trainer.evaluate(held_out_ref, s.beta, s.loss_type, timeout)
                return {f"eval/{k}": v for k, v in stats.items() if k != "pairs"}

        def train_step(ref: ray.ObjectRef) -> dict[str, float]:
            return combine_rank_stats(
                wait_all(trainer.train(ref, s.beta, s.loss_type), timeout, "DPO train step")
            )

        result = fit_epochs(
            "dpo",
            cfg,
            s,
            train,
            train_step,
            evaluate,
            out_dir / "logs" / "dpo",
            BAR,
            plot_keys=("train/loss", "eval/loss", "eval/rewards/margin", "eval/rewards/accuracy"),
        )
        model_dir = trainer.save_pretrained(str(out_dir / "dpo"), timeout)
    finally:
        trainer.kill()
    n_eval = len(held_out) if held_out is not None else 0
    return summary("dpo", model_dir, result, len(train), n_eval, t0) | {
        "beta": s.beta,
        "loss_type": s.loss_type,
    }
