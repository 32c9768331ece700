"""Stage 2, supervised fine-tuning: the driver loop over demonstrations on a DeepSpeed worker group.

Input: the causal LM at `model.policy_path` (the pretrained model) and `data.train_path` with the fields
`data.prompt_field` / `data.response_field`; held out: `data.eval_path` or `data.eval_fraction` of the
training file. Output: `<run.output_dir>/sft`, an HF directory (model + tokenizer) that transformers and
vLLM load, and `<run.output_dir>/logs/sft/` (metrics.jsonl, curves.png, config.json).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from actors.placement import role_options
from actors.sft_trainer import SFTTrainer
from actors.worker_group import combine_rank_stats, wait_all
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data import encode_sft
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainer.offline import (
    fit_epochs,
    load_split,
    rank_config,
    require_model_dir,
    stage_settings,
    summary,
)

BAR = {"train/loss": "loss", "tokens_per_s": "tok/s", "eval/loss": "eval_loss"}


def run_sft(
    cfg: RLHFConfig, *, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None
) -> dict[str, Any]:
    """Fine-tune `model.policy_path` on the demonstrations. Returns a summary: `model` (the saved
    directory), `eval/loss` and `eval/loss_initial` (token-mean cross entropy of the held-out responses
    after and before training), `train/loss`, `metrics`, `plot`, `steps`, `seconds`."""
    t0 = time.perf_counter()
    settings = stage_settings(cfg, "sft", epochs=epochs, batch_size=batch_size, lr=lr)
    init = require_model_dir(cfg.model.policy_path, "model.policy_path")
    tokenizer = load_tokenizer(cfg.model.tokenizer_path or init, cfg.data.chat_template)
    train_records, eval_records = load_split(cfg, [cfg.data.prompt_field, cfg.data.response_field])
    train = encode_sft(train_records, tokenizer, cfg.data)
    held_out = encode_sft(eval_records, tokenizer, cfg.data) if eval_records is not None else None
    out_dir, timeout = Path(cfg.run.output_dir), cfg.run.call_timeout_s

    options = [role_options(cfg.placement.policy) for _ in range(cfg.trainer.num_ranks)]
    trainer = SFTTrainer(rank_config(cfg, "sft", settings), options, init_timeout=timeout)
    try:
        evaluate = None
        if held_out is not None:
            held_out_ref = ray.put(held_out)

            def evaluate() -> dict[str, float]:
                return {"eval/loss": trainer.eval_loss(held_out_ref, timeout)}

        def train_step(ref: ray.ObjectRef) -> dict[str, float]:
            return combine_rank_stats(wait_all(trainer.train(ref), timeout, "SFT train step"))

        result = fit_epochs(
            "sft",
            cfg,
            settings,
            train,
            train_step,
            evaluate,
            out_dir / "logs" / "sft",
            BAR,
            plot_keys=("train/loss", "eval/loss"),
        )
        model_dir = trainer.save_pretrained(str(out_dir / "sft"), timeout)
    finally:
        trainer.kill()
    n_eval = len(held_out) if held_out is not None else 0
    return summary("sft", model_dir, result, len(train), n_eval, t0)
