"""Where each stage of a pipeline run (`rlhf_ray.trainer.pipeline`) writes: one `Layout` of paths under
the run's root, shared by the pipeline, its stages and its evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("data", "sft", "preferences", "reward_model", "rl", "evaluate")


@dataclass(frozen=True)
class Layout:
    """The paths of one pipeline run (see the module docstring)."""

    root: Path

    @property
    def task(self) -> Path:
        return self.root / "task"

    @property
    def init_model(self) -> Path:
        return self.task / "model"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def pairs(self) -> Path:
        return self.root / "preferences" / "pairs.jsonl"

    @property
    def reward_model(self) -> Path:
        return self.root / "reward_model"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def rl_policy(self) -> Path:
        return self.rl / "policy"

    def record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def outputs(self, stage: str) -> list[Path]:
        """What a stage writes (removed before the stage runs again with other settings)."""
        return {
            "data": [self.task],
            "sft": [self.sft, self.root / "logs" / "sft"],
            "preferences": [self.pairs.parent],
            "reward_model": [self.reward_model, self.root / "logs" / "reward_model"],
            "rl": [self.rl],
            "evaluate": [],
        }[stage]
