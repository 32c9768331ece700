"""Stage 2: supervised fine-tuning of model.policy_path on data.train_path (prompt/response records) on
trainer.num_ranks DeepSpeed ranks; writes <run.output_dir>/sft and <run.output_dir>/logs/sft/.

python -m jobs.synthetic_task --out runs/tiny-task   # first: the task's data and a tiny model
python -m jobs.sft --config jobs/configs/tiny_sft.yaml [--epochs N] [--batch-size N] [--lr X] [section.key=value ...]
ray job submit --working-dir . -- python -m jobs.sft --config jobs/configs/tiny_sft.yaml

--epochs, --batch-size (sequences per optimiser step, all ranks) and --lr (default trainer.lr) override
the config's offline.sft section.
"""

from __future__ import annotations

from jobs.common import run_offline_job
from rlhf_ray.trainer.sft import run_sft


def main(argv: list[str] | None = None) -> dict:
    return run_offline_job(__doc__, argv, run_sft)


if __name__ == "__main__":
    main()
