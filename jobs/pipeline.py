"""All four RLHF stages in one job: data -> SFT -> preference pairs -> reward model -> RL -> held-out
evaluation, ending with a table (SFT vs RL policy: gold score, reward-model score, KL, time per stage),
<pipeline.output_dir>/summary.json (its path printed last) and a PNG of the reward, KL and gold curves. A
stage already done with the same settings is skipped, so an interrupted run continues where it stopped.

By default on the embedded synthetic sorting task; with pipeline.task=own on your model and files
(pipeline.base_model, pipeline.demonstrations, pipeline.preference_pairs, pipeline.prompts,
pipeline.eval_prompts), and pipeline.sft_model / pipeline.reward_model skip the stages whose output you
have (template: jobs/configs/own_data.yaml; walk-through: docs/OWN_DATA.md).

python -m jobs.pipeline --config jobs/configs/tiny.yaml [section.key=value ...]      # `make demo`
python -m jobs.pipeline --config jobs/configs/tiny.yaml pipeline.output_dir=runs/demo2 run.total_steps=100
python -m jobs.pipeline --config jobs/configs/own_data.yaml pipeline.sft_model=/models/my-sft
ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/tiny.yaml \
  pipeline.output_dir=/shared/runs/demo
"""

from __future__ import annotations

import sys

import ray

from jobs.common import init_ray, parse_args
from rlhf_ray.config import ConfigError
from rlhf_ray.data import DataError
from rlhf_ray.models import ModelError
from rlhf_ray.trainer.pipeline import check_inputs, needed_cpus, pending_stages, run_pipeline


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(__doc__, argv)
    try:  # the plan and your files, before Ray starts
        pending = pending_stages(cfg)
        check_inputs(cfg, pending)
    except (ConfigError, DataError, ModelError) as exc:
        sys.exit(f"input error: {exc}")
    # no Ray when every stage is done; and a caller (a test, a notebook) may have started it already
    started = bool(pending) and not ray.is_initialized()
    if started:
        init_ray(args.address, args.num_cpus, needed_cpus=needed_cpus(cfg))
    try:
        summary = run_pipeline(cfg, inputs_checked=True)
    finally:
        if started:
            ray.shutdown()
    print("\n" + summary["table"])
    print(f"\ncurves: {summary['paths']['plot']}\nsummary: {summary['paths']['summary']}")
    return summary


if __name__ == "__main__":
    main()
