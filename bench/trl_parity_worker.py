"""TRL's `SFTTrainer`, `RewardTrainer` and `DPOTrainer` for N optimiser steps on a fixed dataset, recording
each step's loss and metrics. Runs inside bench/.trl-venv (made by bench/setup_trl.sh), never in the
project's venv; bench/parity_vs_trl.py starts it and compares with our stage code.

The settings are aligned with ours (bench/parity_vs_trl.py passes the same numbers to both sides):
- data: the rows in file order (`train_sampling_strategy="sequential"`: no sampler shuffle), one optimiser
  step per `--batch` rows (`per_device_train_batch_size`, no gradient accumulation), plain text (no chat
  template), EOS appended to each answer by TRL (ours appends the EOS id);
- optimiser: torch AdamW (`optim="adamw_torch"`, not the fused default), constant learning rate, no
  warm-up, the given betas/eps/weight decay (no decay on norms and biases on both sides), clip 1.0;
- numerics: fp32 (`bf16=False`: TRL's default is bf16), no gradient checkpointing (TRL's default is on),
  no dropout;
- SFT: the loss on the completion only (prompt masked, as ours), `loss_type="nll"` (the plain token mean
  over the batch, ours: "token-mean");
- reward model: the sequence-classification head starts at zero (ours zero-initialises its head; TRL's is
  random), and the pad token is set to one that never occurs in the data (`<|endoftext|>`): SmolLM2's pad
  token is its EOS, and the classification head scores the last token that is not the pad id, which would
  be the token before EOS; ours scores the last real token, the EOS;
- DPO: the reference is a frozen copy of the initial weights (TRL's default).

Per step: the loss the optimiser step back-propagates (captured in `compute_loss`, before the update) and
TRL's own metrics of that step (reward-model accuracy/margin; DPO rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins). Also the token ids TRL trained on, so that the caller can check they
are ours.

bench/.trl-venv/bin/python -m bench.trl_parity_worker --stage sft --model DIR --data FILE --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

STAGES = ("sft", "reward_model", "dpo")


def _common(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """TrainingArguments shared by the three stages (see the module docstring)."""
    return {
        "output_dir": tmp,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": args.weight_decay,
        "adam_beta1": args.betas[0],
        "adam_beta2": args.betas[1],
        "adam_epsilon": args.eps,
        "max_grad_norm": args.max_grad_norm,
        "optim": "adamw_torch",
        "max_steps": args.steps,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "seed": args.seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "remove_unused_columns": True,
    }


def _rows(dataset: Any, column: str) -> list[list[int]]:
    """A token column as plain lists (datasets returns a lazy `Column`)."""
    return [list(map(int, row)) for row in dataset[column]]


def recording(trainer_cls: type, metric_keys: tuple[str, ...]) -> type:
    """`trainer_cls` with `compute_loss` recording each training call's loss and the last value of each of
    TRL's metrics in `metric_keys` (TRL appends one per call to `self._metrics["train"]`)."""

    class Recording(trainer_cls):
        records: ClassVar[list[dict[str, float]]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = out[0] if return_outputs else out
                row = {"loss": float(loss.detach())}
                metrics = self._metrics["train"]
                row |= {k: float(metrics[k][-1]) for k in metric_keys if metrics.get(k)}
                self.records.append(row)
            return out

    return Recording


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="JSONL: prompt + response (SFT) or chosen/rejected")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--loss-type", default="sigmoid", help="DPO loss type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    import transformers
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    rows = load_dataset("json", data_files=args.data, split="train")
    tok = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        common = _common(args, tmp)
        if args.stage == "sft":
            from trl import SFTConfig, SFTTrainer

            ds = rows.select_columns(["prompt", "response"]).rename_column("response", "completion")
            cfg = SFTConfig(
                **common,
                loss_type="nll",
                completion_only_loss=True,
                packing=False,
                padding_free=False,
                max_length=None,
                shuffle_dataset=False,
            )
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            trainer = recording(SFTTrainer, ())(model=model, args=cfg, train_dataset=ds, processing_class=tok)
            labels = _rows(trainer.train_dataset, "labels")  # TRL folds the completion mask into the labels
            tokens = {
                "input_ids": _rows(trainer.train_dataset, "input_ids"),
                "completion_mask": [[int(t != -100) for t in row] for row in labels],
            }
        elif args.stage == "reward_model":
            from trl import RewardConfig, RewardTrainer

            ds = rows.select_columns(["prompt", "chosen", "rejected"])
            cfg = RewardConfig(**common, max_length=None, center_rewards_coefficient=None)
            tok.pad_token = "<|endoftext|>"  # see the module docstring: never in the data, unlike EOS
            model = AutoModelForSequenceClassification.from_pretrained(
                args.model, dtype=torch.float32, num_labels=1
            )
            with torch.no_grad():
                model.score.weight.zero_()  # ours starts the head at zero
            trainer = recording(RewardTrainer, ("accuracy", "margin"))(
                model=model, args=cfg, train_dataset=ds, processing_class=tok
            )
            tokens = {k: _rows(trainer.train_dataset, k) for k in ("chosen_ids", "rejected_ids")}
        else:
            from trl import DPOConfig, DPOTrainer

            ds = rows.select_columns(["prompt", "chosen", "rejected"])
            cfg = DPOConfig(
                **common,
                beta=args.beta,
                loss_type=[args.loss_type],
                max_length=None,
                precompute_ref_log_probs=False,
            )
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            keys = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
            trainer = recording(DPOTrainer, keys)(
                model=model, args=cfg, train_dataset=ds, processing_class=tok
            )
            tokens = {
                k: _rows(trainer.train_dataset, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids")
            }
        trainer.train()
        records = type(trainer).records
    optimiser = trainer.optimizer
    inner = getattr(optimiser, "optimizer", optimiser)
    record = {
        "stage": args.stage,
        "steps": records,
        "tokens": tokens,
        "optimizer": type(inner).__name__,
        "param_groups": [
            {k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
            for g in inner.param_groups
        ],
        "threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    Path(args.out).write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    main()
