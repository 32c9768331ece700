"""One training pass of the policy, in one process and one thread: plain PyTorch (what TRL's loop does)
against DeepSpeed (what our policy rank does) at ZeRO stage 0 and 2 with one rank, alternating, so that
other load hits all of them alike. The loss is a plain token mean of -log p (the arithmetic of a policy
update: forward with log-probs, backward, clip, AdamW step), on the same fixed batch for every variant.

Why: in the GRPO comparison our training phase alone took about as long as TRL's whole step; this
isolates what the DeepSpeed path costs on CPU beyond the arithmetic.

python -m bench.train_step                     # SmolLM2-135M, batch 32 x 80 tokens, micro-batch 8, 3 rounds
python -m bench.train_step --quick             # the tiny model, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench.common import machine, smollm2_dir, snapshot, spread, tiny_model_dir, write_result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=80, help="sequence length (prompt + response)")
    args = p.parse_args(argv)
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0")
    os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    from rlhf_ray.runtime import setup_process_env

    setup_process_env()
    import deepspeed
    import torch

    from rlhf_ray.models import load_causal_lm, sequence_logprobs

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    path = str(tiny_model_dir() if args.quick else smollm2_dir())
    n_micro = args.batch // args.micro_batch
    g = torch.Generator().manual_seed(0)
    vocab = load_causal_lm(path, trainable=False).config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=g)
    mask = torch.ones_like(ids)

    def build(kind: str):
        torch.manual_seed(0)
        model = load_causal_lm(path, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        if kind == "torch":
            return model, opt
        cfg = {
            "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": n_micro,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": int(kind.split("-")[1])},
            "zero_allow_untested_optimizer": True,
        }
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        return engine, opt

    def step(kind: str, model, opt) -> float:
        start = time.perf_counter()
        for i in range(n_micro):
            sl = slice(i * args.micro_batch, (i + 1) * args.micro_batch)
            lp, _ = sequence_logprobs(model, ids[sl], mask[sl])
            loss = -lp[:, 1:].mean() / n_micro
            if kind == "torch":
                loss.backward()
            else:
                model.set_gradient_accumulation_boundary(i == n_micro - 1)
                model.backward(loss, scale_wrt_gas=False)
                model.step()
        if kind == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    kinds = ["torch", "deepspeed-0", "deepspeed-2"]
    built = {k: build(k) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    loads = [snapshot()]
    for r in range(args.rounds + 1):  # round 0 warms up
        for k in kinds if r % 2 == 0 else reversed(kinds):
            t = step(k, *built[k])
            if r > 0:
                times[k].append(t)
        loads.append(snapshot())
    tokens = args.batch * args.tokens
    result = {
        "machine": machine(),
        "model": path,
        "batch": args.batch,
        "micro_batch": args.micro_batch,
        "tokens_per_sequence": args.tokens,
        "threads": 1,
        "load": loads,
        "variants": {
            k: {"step_s": spread(v), "tokens_per_s": tokens / spread(v)["median"]} for k, v in times.items()
        },
    }
    print("| variant | step s (median [min-max]) | tokens/s |")
    print("|---|---:|---:|")
    for k, v in result["variants"].items():
        s = v["step_s"]
        print(f"| {k} | {s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] | {v['tokens_per_s']:.0f} |")
    print(f"wrote {write_result('train_step_quick' if args.quick else 'train_step', result)}")
    return result


if __name__ == "__main__":
    main()
