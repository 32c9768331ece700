"""DPO: model.policy_path (the SFT model) optimised directly on data.train_path (prompt/chosen/rejected
records) against a frozen copy of itself, on trainer.num_ranks DeepSpeed ranks; writes
<run.output_dir>/dpo and <run.output_dir>/logs/dpo/.

python -m jobs.synthetic_task --out runs/tiny-task   # first: the task's data and a tiny model
python -m jobs.sft --config jobs/configs/tiny_sft.yaml   # then the SFT policy DPO starts from
python -m jobs.dpo --config jobs/configs/tiny_dpo.yaml [--epochs N] [--batch-size N] [--lr X] [--beta B] [--loss-type sigmoid|ipo] [section.key=value ...]
ray job submit --working-dir . -- python -m jobs.dpo --config jobs/configs/tiny_dpo.yaml

The flags override the config's offline.dpo section (defaults: beta 0.1, sigmoid).
"""

from __future__ import annotations

from jobs.common import run_offline_job
from rlhf_ray.trainer.dpo import run_dpo


def main(argv: list[str] | None = None) -> dict:
    return run_offline_job(__doc__, argv, run_dpo, dpo=True)


if __name__ == "__main__":
    main()
