"""Stage 3: a Bradley-Terry reward model trained on data.train_path (prompt/chosen/rejected records) on
trainer.num_ranks DeepSpeed ranks, starting from model.reward_path, else <run.output_dir>/sft, else
model.policy_path; writes <run.output_dir>/reward_model and <run.output_dir>/logs/reward_model/.

python -m jobs.reward_model --config jobs/configs/tiny.yaml [--epochs N] [--batch-size N] [--lr X] [section.key=value ...]
ray job submit --working-dir . -- python -m jobs.reward_model --config jobs/configs/tiny.yaml

--epochs, --batch-size (pairs per optimiser step, all ranks) and --lr (default trainer.lr) override the
config's offline.reward_model section when it has one.
"""

from __future__ import annotations

import json

from jobs.common import init_ray, parse_args
from rlhf_ray.trainer.offline import parse_stage_flags
from rlhf_ray.trainer.reward_model import run_reward_model


def main(argv: list[str] | None = None) -> dict:
    flags, rest = parse_stage_flags(argv)
    args, cfg = parse_args(__doc__, rest)
    init_ray(args.address, args.num_cpus, needed_cpus=cfg.trainer.num_ranks * cfg.placement.policy.num_cpus)
    summary = run_reward_model(cfg, **flags)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
