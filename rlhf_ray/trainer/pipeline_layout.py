"""Where each stage of a pipeline run (`rlhf_ray.trainer.pipeline`) reads and writes: one `Layout` of paths
under the run's root, and the run's plan (`stage_plan`): which stages run, from which inputs, and which
are skipped because you gave their output (`pipeline.sft_model`, `pipeline.reward_model`) or nothing
needs them. Pure: no Ray, no files read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf_ray.config import ConfigError, RLHFConfig

STAGES = ("data", "sft", "preferences", "reward_model", "rl", "evaluate")
GOLD_FUNCTION = "rlhf_ray.data.synthetic:gold_reward"  # the synthetic task's hidden gold score
OWN_INPUTS = ("base_model", "demonstrations", "preference_pairs", "prompts", "eval_prompts")


@dataclass(frozen=True)
class Layout:
    """The paths of one pipeline run (see the module docstring of `rlhf_ray.trainer.pipeline`)."""

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


@dataclass(frozen=True)
class StagePlan:
    """What one stage does in a run: `run`; `given`: its output is yours (`output`), the stage is skipped;
    `unused`: nothing later needs it (e.g. no reward model with reward.kind=rule). `inputs`: what a stage
    that runs reads, by role ('model', 'data', ...): paths, yours or an earlier stage's output."""

    action: Literal["run", "given", "unused"]
    inputs: dict[str, str] = field(default_factory=dict)
    output: str | None = None


def _run(inputs: dict[str, str | None], output: Path) -> StagePlan:
    return StagePlan("run", {k: str(v) for k, v in inputs.items() if v is not None}, str(output))


def stage_plan(cfg: RLHFConfig) -> dict[str, StagePlan]:
    """Each stage's `StagePlan`. pipeline.task=synthetic: every stage runs on the task's files; own: your
    model and files (`pipeline.base_model` ... `pipeline.eval_prompts`), no data or preference sampling
    (your pairs are the preferences). Either way `pipeline.sft_model` / `pipeline.reward_model` skip the
    stages that make them. A ConfigError when the reward needs a reward model that nothing provides."""
    p, lay = cfg.pipeline, Layout(Path(cfg.pipeline.output_dir))
    own = p.task == "own"
    if own:
        data = StagePlan("given", {k: getattr(p, k) for k in OWN_INPUTS if getattr(p, k)})
    else:
        data = StagePlan("run", output=str(lay.task))
    if p.sft_model:
        sft = StagePlan("given", output=p.sft_model)
    elif own:
        sft = _run({"model": p.base_model, "data": p.demonstrations}, lay.sft)
    else:
        sft = _run({"model": lay.init_model, "data": lay.task / "sft.jsonl"}, lay.sft)
    policy = str(sft.output)

    learned = not own or cfg.reward.kind == "model"  # the synthetic pipeline optimises its learned reward
    if not learned or p.reward_model:
        preferences = StagePlan("unused")
    elif own and not p.preference_pairs:
        raise ConfigError(
            "pipeline.preference_pairs is not set: with reward.kind=model the RL stage needs a reward model; "
            "set pipeline.preference_pairs to your pairs to train one, or pipeline.reward_model to one you "
            "have, or score with a rule (reward.kind=rule, reward.function=module:function)"
        )
    elif own:
        preferences = StagePlan("given", output=p.preference_pairs)
    else:
        preferences = _run({"policy": policy, "prompts": lay.task / "prompts.jsonl"}, lay.pairs)
    if not learned:
        reward_model = StagePlan("unused")
    elif p.reward_model:
        reward_model = StagePlan("given", output=p.reward_model)
    else:
        reward_model = _run({"init": policy, "data": preferences.output}, lay.reward_model)

    prompts = (
        (p.prompts, p.eval_prompts) if own else (lay.task / "prompts.jsonl", lay.task / "eval_prompts.jsonl")
    )
    rl = _run(
        {
            "policy": policy,
            "reward_model": reward_model.output,
            "prompts": prompts[0],
            "eval_prompts": prompts[1],
        },
        lay.rl,
    )
    if prompts[1] and (cfg.run.eval_function or not own):
        evaluate = _run(
            {"sft": policy, "rl": lay.rl_policy, "prompts": prompts[1]}, lay.root / "summary.json"
        )
    else:
        evaluate = StagePlan("unused")  # no held-out prompts or nothing to score them with
    return {
        "data": data,
        "sft": sft,
        "preferences": preferences,
        "reward_model": reward_model,
        "rl": rl,
        "evaluate": evaluate,
    }
