"""Stage 4: RL (PPO / GRPO / RLOO / REINFORCE++) with the roles as Ray actors.

python -m jobs.ppo --config jobs/configs/tiny.yaml [section.key=value ...]
ray job submit --working-dir . -- python -m jobs.ppo --config jobs/configs/tiny.yaml
"""

from __future__ import annotations

import json

from actors.placement import needed_cpus
from jobs.common import init_ray, parse_args
from jobs.plan import check_at_start
from rlhf_ray.metrics import read_metrics
from rlhf_ray.report import eval_before_after
from rlhf_ray.trainer.ppo import run_ppo


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(__doc__, argv)
    init_ray(args.address, args.num_cpus, needed_cpus=needed_cpus(cfg))
    check_at_start(cfg)  # on GPUs: a layout that cannot fit fails now, naming the GPU, roles and keys
    summary = run_ppo(cfg)
    print(json.dumps(summary, indent=1))
    table = eval_before_after(read_metrics(summary["metrics"]))
    if table:  # before RL (step 0) and after, on the held-out prompts
        print(table)
    return summary


if __name__ == "__main__":
    main()
