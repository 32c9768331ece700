"""Write the embedded synthetic task (sort the digits) and a randomly initialised tiny model to a directory,
so that every stage can run on this machine with nothing from a model hub.

python -m jobs.synthetic_task --out runs/tiny-task     # prints the directory
Writes <out>/{sft,prompts,eval_prompts}.jsonl, <out>/pairs.jsonl (preference pairs for a reward model or
DPO run alone: jobs/configs/tiny_reward_model.yaml, tiny_dpo.yaml) and <out>/model (tokenizer +
0.86M-parameter Llama). Idempotent: files already there are kept, so several jobs may share one directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_ray.runtime import setup_process_env


def write_synthetic_task(out: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """The task files, preference pairs and the tiny model under `out`; returns {"sft", "prompts",
    "eval_prompts", "pairs", "model"}."""
    from rlhf_ray.data.synthetic import VOCAB, write_task
    from rlhf_ray.models import build_word_tokenizer, tiny_model

    out = Path(out)
    names = {"sft": "sft.jsonl", "prompts": "prompts.jsonl", "eval_prompts": "eval_prompts.jsonl"}
    paths = {k: out / v for k, v in names.items()}
    if not all(p.exists() for p in paths.values()):
        paths = write_task(out, seed=seed, **sizes)
    pairs = out / "pairs.jsonl"
    if not pairs.exists():
        write_pairs(paths["prompts"], pairs, seed=seed)
    model = out / "model"
    if not (model / "config.json").exists():
        tiny_model(model, build_word_tokenizer(VOCAB), seed=seed)
    return {**paths, "pairs": pairs, "model": model}


def write_pairs(prompts_path: Path, out: Path, seed: int = 0) -> Path:
    """Preference records {prompt, chosen, rejected} for the offline stages run alone, without an SFT
    policy to sample from: per training prompt, the correct answer against a demonstration that certainly
    carries a slip, ordered by the simulated labeler (so a few pairs are flipped, as real labels are). The
    pipeline instead samples its pairs from the SFT policy."""
    import numpy as np

    from rlhf_ray.data.loading import load_records, write_jsonl
    from rlhf_ray.data.synthetic import demonstration, make_preference_records, target

    prompts = [r["prompt"] for r in load_records(prompts_path)]
    rng = np.random.default_rng([seed, 100])
    slipped = [demonstration(p, rng, slip_rate=1.0) for p in prompts]
    records = make_preference_records(prompts, [target(p) for p in prompts], slipped, seed=seed + 1)
    return write_jsonl(out, records)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/tiny-task", help="directory to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_process_env()
    paths = write_synthetic_task(args.out, seed=args.seed)
    print(Path(args.out))
    return paths["model"].parent


if __name__ == "__main__":
    main()
