"""The `rlhf-ray` command: one subcommand per job, running the same code as `python -m jobs.<module>`.

rlhf-ray pipeline --config jobs/configs/tiny.yaml          # = python -m jobs.pipeline --config ...
rlhf-ray ppo --config jobs/configs/tiny.yaml algorithm.kl_coef=0.1
rlhf-ray ppo --help                                        # the job's flags and every config key

Everything after the command goes to the job unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (job module, what it does); a module is imported only when its subcommand runs
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("jobs.sft", "stage 2: supervised fine-tuning of the policy on demonstrations"),
    "reward-model": ("jobs.reward_model", "stage 3: a Bradley-Terry reward model on preference pairs"),
    "dpo": ("jobs.dpo", "DPO on preference pairs against a frozen copy of the policy"),
    "ppo": ("jobs.ppo", "stage 4: RL (PPO / GRPO / RLOO / REINFORCE++) with the roles as Ray actors"),
    "pipeline": ("jobs.pipeline", "all four stages on the synthetic sorting task, ending with a report"),
    "sweep": ("jobs.sweep", "a Ray Tune sweep over algorithm.kl_coef and trainer.lr"),
    "plan": (
        "jobs.plan",
        "the GPU memory plan of a config: what each role needs on each GPU, and if it fits",
    ),
    "convert-smollm2": ("jobs.convert_smollm2", "convert SmolLM2-135M-Instruct to an HF directory"),
    "synthetic-task": ("jobs.synthetic_task", "write the synthetic task's data and a tiny model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints the help, or exits naming the subcommands
        return 2
    name, rest = argv[0], argv[1:]
    sys.argv[0] = f"rlhf-ray {name}"  # the job's usage line names the command a user typed
    importlib.import_module(COMMANDS[name][0]).main(rest)
    return 0  # the jobs return their summary; the exit status is 0 when they do


if __name__ == "__main__":
    sys.exit(main())
