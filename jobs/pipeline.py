"""All four RLHF stages in one job on the synthetic sorting task: data -> SFT -> preference pairs ->
reward model -> RL -> held-out evaluation, ending with a table (SFT vs RL policy: gold score,
reward-model score, KL, time per stage), <pipeline.output_dir>/summary.json (its path printed last) and a
PNG of the reward, KL and gold curves. A stage already done with the same settings is skipped, so an
interrupted run continues where it stopped.

python -m jobs.pipeline --config jobs/configs/tiny.yaml [section.key=value ...]      # `make demo`
python -m jobs.pipeline --config jobs/configs/tiny.yaml pipeline.output_dir=runs/demo2 run.total_steps=100
ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/tiny.yaml \
  pipeline.output_dir=/shared/runs/demo
"""

from __future__ import annotations

import ray

from jobs.common import init_ray, parse_args
from rlhf_ray.trainer.pipeline import needed_cpus, pending_stages, run_pipeline


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(__doc__, argv)
    # no Ray when every stage is done; and a caller (a test, a notebook) may have started it already
    started = bool(pending_stages(cfg)) and not ray.is_initialized()
    if started:
        init_ray(args.address, args.num_cpus, needed_cpus=needed_cpus(cfg))
    try:
        summary = run_pipeline(cfg)
    finally:
        if started:
            ray.shutdown()
    print("\n" + summary["table"])
    print(f"\ncurves: {summary['paths']['plot']}\nsummary: {summary['paths']['summary']}")
    return summary


if __name__ == "__main__":
    main()
