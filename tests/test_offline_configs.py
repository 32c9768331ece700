"""The offline stage jobs' `--help` examples work: jobs/sft.py, reward_model.py and dpo.py name their own
configs (jobs/configs/tiny_{sft,reward_model,dpo}.yaml), and each config's data, as `jobs.synthetic_task`
writes it, has the fields the stage reads: the stage's own loading and encoding (everything before its
actors start) runs on it here. Fast: no Ray, no training."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from jobs.synthetic_task import write_synthetic_task
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data import encode_preferences, encode_sft
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainer.offline import load_split

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = "runs/tiny-task"  # where the configs expect `python -m jobs.synthetic_task --out runs/tiny-task`
STAGES = {"sft": "tiny_sft.yaml", "reward_model": "tiny_reward_model.yaml", "dpo": "tiny_dpo.yaml"}


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """`jobs.synthetic_task` at a small size, standing in for runs/tiny-task."""
    out = tmp_path_factory.mktemp("tiny-task")
    write_synthetic_task(out, seed=0, n_demos=200, n_train_prompts=200, n_eval_prompts=20)
    return out


def stage_config(stage: str, task: Path) -> RLHFConfig:
    """The stage's example config with runs/tiny-task/... pointing at `task` (every other path as written)."""
    cfg = RLHFConfig.from_yaml(ROOT / "jobs" / "configs" / STAGES[stage])
    for section, key in (("model", "policy_path"), ("data", "train_path"), ("data", "eval_path")):
        value = getattr(getattr(cfg, section), key)
        if value and value.startswith(TASK_DIR + "/"):
            setattr(getattr(cfg, section), key, str(task / value.removeprefix(TASK_DIR + "/")))
    return cfg


@pytest.mark.parametrize("stage", STAGES)
def test_help_examples_name_the_stage_config(stage):
    doc = importlib.import_module(f"jobs.{stage}").__doc__
    named = re.findall(rf"jobs\.{stage} --config\s+(\S+)", doc)  # its own commands (dpo's names SFT's too)
    assert named and set(named) == {f"jobs/configs/{STAGES[stage]}"}, named
    assert (ROOT / named[0]).is_file()


def test_task_writes_what_the_configs_read(task):
    for name in ("sft.jsonl", "pairs.jsonl", "prompts.jsonl", "eval_prompts.jsonl", "model/config.json"):
        assert (task / name).is_file(), name


@pytest.mark.parametrize("stage", ["sft", "reward_model"])
def test_sft_and_reward_model_start_from_the_task_model(stage, task):
    cfg = stage_config(stage, task)
    assert Path(cfg.model.policy_path) == task / "model"
    assert cfg.data.train_path.startswith(str(task))


def test_dpo_starts_from_the_sft_stage_output(task):
    sft, dpo = stage_config("sft", task), stage_config("dpo", task)
    assert Path(dpo.model.policy_path) == Path(sft.run.output_dir) / "sft"
    assert dpo.data.train_path == stage_config("reward_model", task).data.train_path


@pytest.mark.parametrize("stage", STAGES)
def test_stage_data_loads_and_encodes(stage, task):
    """What the stage does with its data before any actor starts: the fields it asks for load, the held-out
    split is made, and every record encodes within the config's lengths."""
    cfg = stage_config(stage, task)
    data = cfg.data
    tokenizer = load_tokenizer(str(task / "model"))
    if stage == "sft":
        train, held_out = load_split(cfg, [data.prompt_field, data.response_field])
        batches = [encode_sft(train, tokenizer, data), encode_sft(held_out, tokenizer, data)]
    else:
        train, held_out = load_split(cfg, [data.prompt_field, data.chosen_field, data.rejected_field])
        assert all(r[data.chosen_field] != r[data.rejected_field] for r in train)
        batches = [encode_preferences(train, tokenizer, data), encode_preferences(held_out, tokenizer, data)]
    assert len(train) > 100 and held_out is not None and len(held_out) >= 5
    assert [len(b) for b in batches] == [len(train), len(held_out)]  # no prompt left out for its length
