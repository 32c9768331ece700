"""Stage 2: supervised fine-tuning of model.policy_path on data.train_path (prompt/response records) on
trainer.num_ranks DeepSpeed ranks; writes <run.output_dir>/sft and <run.output_dir>/logs/sft/.

python -m jobs.sft --config jobs/configs/tiny.yaml [--epochs N] [--batch-size N] [--lr X] [section.key=value ...]
ray job submit --working-dir . -- python -m jobs.sft --config jobs/configs/tiny.yaml

--epochs, --batch-size (sequences per optimiser step, all ranks) and --lr (default trainer.lr) override
the config's offline.sft section when it has one.
"""

from __future__ import annotations

import json

from jobs.common import init_ray, parse_args
from rlhf_ray.trainer.offline import parse_stage_flags
from rlhf_ray.trainer.sft import run_sft


def main(argv: list[str] | None = None) -> dict:
    flags, rest = parse_stage_flags(argv)
    args, cfg = parse_args(__doc__, rest)
    init_ray(args.address, args.num_cpus, needed_cpus=cfg.trainer.num_ranks * cfg.placement.policy.num_cpus)
    summary = run_sft(cfg, **flags)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
