"""TRL's `GRPOTrainer` on one workload, timed per optimisation step. Runs inside bench/.trl-venv (made by
bench/setup_trl.sh), never in the project's venv; bench/grpo_vs_trl.py starts it.

Settings mirror our GRPO (bench/grpo_vs_trl.py passes the same numbers to both sides): `num_generations`
samples per prompt, `per_device_train_batch_size * gradient_accumulation_steps` = prompts x samples, so
one optimiser step per generation batch (like our `algorithm.mini_batch_size` = the whole batch); KL to a
frozen reference with the k3 estimator in the loss (`beta`, our `algorithm.kl_coef`); clip 0.2; group
std scaling (our `compute_grpo_advantages`); token-mean loss over the batch (TRL 'dapo' = our
'token-mean'); fp32 on CPU; sampling at temperature 1, top_p 1, no top_k. Generation is transformers
`generate` (TRL's vLLM paths need a GPU or a separate vLLM server).

bench/.trl-venv/bin/python -m bench.trl_grpo_worker --model DIR --prompts FILE --out RESULT.json [...]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # rlhf_ray's reward functions are pure Python: the same code on both sides


def load_reward(spec: str, chat: bool):
    """Our rule function `module:function` (prompts, responses, **fields) -> scores, as a TRL reward
    function. TRL passes the dataset's other columns as keyword arguments, one value per completion, as
    our reward actor passes the prompt record's fields; those the function names are forwarded."""
    module, name = spec.split(":")
    fn = getattr(importlib.import_module(module), name)
    wanted = set(list(inspect.signature(fn).parameters)[2:])

    def text(x) -> str:
        return x[-1]["content"] if chat else x

    def reward(prompts, completions, **kwargs):
        fields = {k: v for k, v in kwargs.items() if k in wanted}
        return fn([text(p) for p in prompts], [text(c) for c in completions], **fields)

    reward.__name__ = name
    return reward


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field")
    p.add_argument("--chat", action="store_true", help="each prompt is a user turn of the chat template")
    p.add_argument("--reward", required=True, help="module:function (the rule-function protocol)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--save", default=None, help="directory to save the trained policy to (transformers format)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t_start = time.perf_counter()
    ds = load_dataset("json", data_files=args.prompts, split="train")
    if args.chat:
        ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})
    batch = args.prompts_per_step * args.samples
    if batch % args.micro_batch:
        sys.exit(f"--micro-batch {args.micro_batch} must divide prompts x samples = {batch}")

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=batch // args.micro_batch,
            num_generations=args.samples,
            max_completion_length=args.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=args.beta,
            epsilon=0.2,
            num_iterations=1,
            loss_type="dapo",
            scale_rewards="group",
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            max_steps=args.warmup + args.steps,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=load_reward(args.reward, args.chat),
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[timer],
        )
        startup = time.perf_counter() - t_start
        trainer.train()
        if args.save:
            trainer.save_model(args.save)
            tok.save_pretrained(args.save)
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    step_logs = [lg for lg in timer.logs if "loss" in lg or "reward" in lg]
    record = {
        "startup_s": startup,
        "train_s": sum(steps),
        "threads": torch.get_num_threads(),
        "step_s": steps[args.warmup :],
        "warmup_step_s": steps[: args.warmup],
        "samples_per_step": batch,
        "logs": step_logs[args.warmup :],
        "versions": {
            "trl": __import__("trl").__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "pid": os.getpid(),
    }
    Path(args.out).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
