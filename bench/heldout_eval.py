"""Score saved policies on the held-out arithmetic problems, all with one evaluator, so that a model
trained by us and one trained by TRL are measured by the same code: transformers `generate` on each
problem as a user turn of the model's chat template, greedy and sampled (temperature 1), scored by the
strict `rlhf_ray.rewards_builtin:arithmetic_score` (the final number must be the answer).

python -m bench.heldout_eval --models DIR [DIR ...] --out RESULT.json [--prompts 100] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bench.common import ROOT

EVAL_FILE = ROOT / "jobs" / "data" / "arithmetic_eval.jsonl"


def score_model(
    model_dir: str, records: list[dict[str, Any]], max_new_tokens: int, samples: int, seed: int
) -> dict[str, Any]:
    """Fraction of `records` answered correctly greedily and by `samples` sampled answers each, overall
    and per kind of problem, with a few greedy answers to read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.rewards_builtin import arithmetic_score

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for r in records
    ]

    def answers(do_sample: bool) -> list[str]:
        out: list[str] = []
        for i in range(0, len(texts), 50):
            enc = tok(texts[i : i + 50], return_tensors="pt", padding=True, add_special_tokens=False)
            sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if do_sample else {}
            with torch.no_grad():
                ids = model.generate(
                    **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling
                )
            out += tok.batch_decode(ids[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        return out

    torch.manual_seed(seed)
    greedy = answers(False)
    sampled = [answers(True) for _ in range(samples)]

    def accuracy(responses: list[str], kind: str | None = None) -> float:
        pairs = [(s, r) for s, r in zip(responses, records) if kind in (None, r["kind"])]
        return sum(arithmetic_score(s, r["answer"]) for s, r in pairs) / max(len(pairs), 1)

    kinds = sorted({r["kind"] for r in records})
    return {
        "model": model_dir,
        "greedy": accuracy(greedy),
        "sampled": sum(accuracy(s) for s in sampled) / max(samples, 1),
        "sampled_each": [accuracy(s) for s in sampled],
        "greedy_by_kind": {k: accuracy(greedy, k) for k in kinds},
        "greedy_mean_words": sum(len(s.split()) for s in greedy) / len(greedy),
        "examples": [
            {"prompt": r["prompt"], "answer": r["answer"], "response": s}
            for r, s in list(zip(records, greedy))[:4]
        ],
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", required=True, help="saved policy directories (transformers format)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=100, help="the first N held-out problems")
    p.add_argument("--samples", type=int, default=2, help="sampled answers per problem")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    records = [json.loads(line) for line in EVAL_FILE.read_text().splitlines()][: args.prompts]
    results = []
    for m in args.models:
        results.append(score_model(m, records, args.max_new_tokens, args.samples, args.seed))
        print(f"{m}: greedy {results[-1]['greedy']:.3f}, sampled {results[-1]['sampled']:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
