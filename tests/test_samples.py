"""Sample completions a person reads: which rows are shown, what each row says, when a run writes them,
samples.jsonl and TensorBoard's text tab, and that a resumed run keeps each step once."""

from __future__ import annotations

import json

import pytest
import torch

from actors.glue import samples
from rlhf_ray.batch import Batch
from rlhf_ray.config import ConfigError, LoggingConfig, RLHFConfig
from rlhf_ray.metrics import MetricsLogger, read_metrics
from rlhf_ray.samples import markdown_table, pick_rows, sample_due, sample_rows
from rlhf_ray.trainer.recovery import drop_rows_after

GOLD_CALLS: list[int] = []


def gold_len(prompts: list[str], responses: list[str]) -> list[float]:
    """A stand-in gold labeler (`tests.test_samples:gold_len`): the response's length; records its calls."""
    GOLD_CALLS.append(len(responses))
    return [float(len(r)) for r in responses]


def step_batch(prompts: int = 6, group: int = 4) -> Batch:
    """An experience-like batch: `group` consecutive samples per prompt, response i of length 1 + i % 3."""
    n = prompts * group
    mask = torch.zeros(n, 6)
    for i in range(n):
        mask[i, 2 : 3 + i % 3] = 1
    advantages = torch.arange(n, dtype=torch.float32)[:, None] * mask  # constant over the response
    return Batch(
        {
            "response_mask": mask,
            "scores": torch.arange(n, dtype=torch.float32) / 10,
            "advantages": advantages,
        },
        {
            "prompt_index": [i // group for i in range(n)],
            "prompt": [f"p{i // group}" for i in range(n)],
            "response": [f"r{i}" + "x" * (i % 3) for i in range(n)],
        },
    )


def test_rows_are_first_samples_of_prompts_spread_over_the_batch():
    group = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert pick_rows(group, 10, 3) == [0, 4, 8]  # prompts 0, 2, 4: first, middle, last
    assert pick_rows(group, 10, 5) == [0, 2, 4, 6, 8]
    assert pick_rows(group, 10, 9) == [0, 2, 4, 6, 8]  # fewer prompts than asked: each once
    assert pick_rows(None, 4, 2) == [0, 3]  # no groups: each row its own prompt
    assert pick_rows([], 0, 4) == []


def test_a_row_carries_text_reward_advantage_gold_and_length():
    batch = step_batch()
    rows = sample_rows(batch, [4, 9], gold=[0.5, 1.0])
    assert rows[0] == {
        "row": 4,
        "prompt": "p1",
        "response": "r4x",
        "length": 2,
        "reward": pytest.approx(0.4),
        "advantage": 4.0,  # the mean over response tokens, not the sum
        "gold": 0.5,
    }
    assert rows[1]["response"] == "r9" and rows[1]["gold"] == 1.0 and rows[1]["length"] == 1
    # an eval batch has no advantages; a rollout has no scores yet
    bare = Batch({"response_mask": batch["response_mask"]}, dict(batch.meta))
    assert set(sample_rows(bare, [0])[0]) == {"row", "prompt", "response", "length"}


def test_glue_picks_rows_and_scores_gold_on_those_rows_only():
    GOLD_CALLS.clear()
    batch = step_batch(prompts=6, group=4)
    rows = samples(batch, 3, "tests.test_samples:gold_len")
    assert [r["row"] for r in rows] == [0, 8, 20]  # first samples of prompts 0, 2, 5
    assert GOLD_CALLS == [3]  # the labeler saw the 3 shown rows, not the 24 of the batch
    assert [r["gold"] for r in rows] == [len(r["response"]) for r in rows]
    # held-out answers: the reward comes apart from the rollout; no gold function, no gold
    scores = Batch({"scores": torch.full((len(batch),), 2.0)})
    rollout = Batch({"response_mask": batch["response_mask"]}, dict(batch.meta))
    rows = samples(rollout, 2, "", scores)
    assert [r["reward"] for r in rows] == [2.0, 2.0] and "gold" not in rows[0]


@pytest.mark.parametrize(
    ("interval", "total", "due"),
    [(10, 25, [10, 20, 25]), (5, 10, [5, 10]), (0, 10, []), (100, 3, [3])],
)
def test_samples_every_interval_and_at_the_last_step(interval, total, due):
    assert [s for s in range(1, total + 1) if sample_due(s, interval, total)] == due


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="logging.sample_interval=-1"):
        LoggingConfig(sample_interval=-1).check("logging.")
    with pytest.raises(ConfigError, match="logging.num_samples=0"):
        RLHFConfig.from_dict({"logging": {"num_samples": 0}})
    LoggingConfig(sample_interval=0).check("logging.")  # 0: off


def test_markdown_table_escapes_and_cuts():
    table = markdown_table(
        [
            {"row": 1, "prompt": "a|b\nc", "response": "y" * 1000, "reward": 0.123456},
            {"row": 2, "prompt": "q"},
        ]
    )
    lines = table.splitlines()
    assert lines[0] == "| row | prompt | response | reward |"
    assert len(lines) == 4  # header, rule, two rows: line breaks inside cells are <br>
    assert "a\\|b<br>c" in lines[2] and "0.1235" in lines[2] and "…" in lines[2] and len(lines[2]) < 500
    assert lines[3] == "| 2 | q |  |  |"  # a cell a row lacks stays empty


def test_logger_writes_samples_jsonl_and_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(tensorboard=True, progress_bar=False)
    logger = MetricsLogger(tmp_path, cfg, total_steps=20)
    batch = step_batch()
    logger.log_samples(0, sample_rows(batch, [0]), split="eval")
    logger.log_samples(10, sample_rows(batch, [0, 4], gold=[1.0, float("nan")]))
    logger.log_samples(20, [])  # nothing picked: nothing written
    logger.close()

    rows = read_metrics(tmp_path / "samples.jsonl")
    assert [(r["step"], r["split"], r["row"]) for r in rows] == [
        (0, "eval", 0),
        (10, "train", 0),
        (10, "train", 4),
    ]
    assert rows[1]["prompt"] == "p0" and rows[1]["response"] == "r0" and rows[1]["gold"] == 1.0
    assert rows[2]["gold"] is None  # NaN as null: the file stays valid JSON

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"] if tag.startswith("samples/")}
    assert set(texts) == {"samples/train/text_summary", "samples/eval/text_summary"}
    train = texts["samples/train/text_summary"]
    assert [e.step for e in train] == [10]
    table = train[0].tensor_proto.string_val[0].decode()
    assert table == markdown_table(sample_rows(batch, [0, 4], gold=[1.0, float("nan")]))


def test_offline_logging_writes_no_samples_file(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), total_steps=0)
    logger.log(1, {"train/loss": 0.5})
    logger.close()
    assert not (tmp_path / "samples.jsonl").exists()


def test_resume_drops_the_sample_rows_of_undone_steps(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [
        {"step": s, "split": sp, "row": r}
        for s, sp in [(0, "eval"), (10, "train"), (20, "train"), (20, "eval")]
        for r in (0, 1)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert drop_rows_after(path, 10) == 4
    assert [(r["step"], r["split"]) for r in read_metrics(path)] == [(0, "eval")] * 2 + [(10, "train")] * 2
    # the steps done again append after the kept rows, each step once
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), total_steps=20)
    logger.log_samples(20, sample_rows(step_batch(), [0]))
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [0, 0, 10, 10, 20]
