"""Stage 3: a Bradley-Terry reward model trained on data.train_path (prompt/chosen/rejected records) on
trainer.num_ranks DeepSpeed ranks, starting from model.reward_path, else <run.output_dir>/sft, else
model.policy_path; writes <run.output_dir>/reward_model and <run.output_dir>/logs/reward_model/.

python -m jobs.synthetic_task --out runs/tiny-task   # first: the task's data and a tiny model
python -m jobs.reward_model --config jobs/configs/tiny_reward_model.yaml [--epochs N] [--batch-size N] [--lr X] [section.key=value ...]
ray job submit --working-dir . -- python -m jobs.reward_model --config jobs/configs/tiny_reward_model.yaml

--epochs, --batch-size (pairs per optimiser step, all ranks) and --lr (default trainer.lr) override the
config's offline.reward_model section.
"""

from __future__ import annotations

from jobs.common import run_offline_job
from rlhf_ray.trainer.reward_model import run_reward_model


def main(argv: list[str] | None = None) -> dict:
    return run_offline_job(__doc__, argv, run_reward_model)


if __name__ == "__main__":
    main()
