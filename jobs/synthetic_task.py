"""Write the embedded synthetic task (sort the digits) and a randomly initialised tiny model to a directory,
so that every stage can run on this machine with nothing from a model hub.

python -m jobs.synthetic_task --out runs/tiny-task     # prints the directory
Writes <out>/{sft,prompts,eval_prompts}.jsonl and <out>/model (tokenizer + 0.86M-parameter Llama).
Idempotent: files already there are kept, so several jobs may share one directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_ray.runtime import setup_process_env


def write_synthetic_task(out: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """The task files and the tiny model under `out`; returns {"sft", "prompts", "eval_prompts", "model"}."""
    from rlhf_ray.data.synthetic import VOCAB, write_task
    from rlhf_ray.models import build_word_tokenizer, tiny_model

    out = Path(out)
    names = {"sft": "sft.jsonl", "prompts": "prompts.jsonl", "eval_prompts": "eval_prompts.jsonl"}
    paths = {k: out / v for k, v in names.items()}
    if not all(p.exists() for p in paths.values()):
        paths = write_task(out, seed=seed, **sizes)
    model = out / "model"
    if not (model / "config.json").exists():
        tiny_model(model, build_word_tokenizer(VOCAB), seed=seed)
    return {**paths, "model": model}


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
