"""DPO: model.policy_path (the SFT model) optimised directly on data.train_path (prompt/chosen/rejected
records) against a frozen copy of itself, on trainer.num_ranks DeepSpeed ranks; writes
<run.output_dir>/dpo and <run.output_dir>/logs/dpo/.

python -m jobs.dpo --config jobs/configs/tiny.yaml [--epochs N] [--batch-size N] [--lr X] [--beta B] [--loss-type sigmoid|ipo] [section.key=value ...]
ray job submit --working-dir . -- python -m jobs.dpo --config jobs/configs/tiny.yaml

The flags override the config's offline.dpo section when it has one (defaults: beta 0.1, sigmoid).
"""

from __future__ import annotations

import json

from jobs.common import init_ray, parse_args
from rlhf_ray.trainer.dpo import run_dpo
from rlhf_ray.trainer.offline import parse_stage_flags


def main(argv: list[str] | None = None) -> dict:
    flags, rest = parse_stage_flags(argv, dpo=True)
    args, cfg = parse_args(__doc__, rest)
    init_ray(args.address, args.num_cpus, needed_cpus=cfg.trainer.num_ranks * cfg.placement.policy.num_cpus)
    summary = run_dpo(cfg, **flags)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
