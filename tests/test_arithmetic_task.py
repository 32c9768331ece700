"""The arithmetic word-problem task (`jobs.arithmetic_task`), its reward
(`rlhf_ray.rewards_builtin:arithmetic_reward`) and its GRPO config: deterministic, held-out problems
kept apart, answers right by recomputation, the committed files equal to what the script writes. Fast."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import pytest

from jobs.arithmetic_task import EVAL_FILE, INSTRUCTION, KINDS, TRAIN_FILE, main, make_problems
from rlhf_ray.config import RLHFConfig
from rlhf_ray.rewards_builtin import (
    arithmetic_format_score,
    arithmetic_partial_score,
    arithmetic_reward,
    arithmetic_score,
    final_number,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "jobs" / "data"
CONFIG = ROOT / "jobs" / "configs" / "smollm2_arithmetic.yaml"
OPS = {"+": operator.add, "-": operator.sub, "x": operator.mul}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- the generator ---------------------------------------------------------------------------------------
def test_committed_files_are_what_the_script_writes(tmp_path):
    main(["--out", str(tmp_path)])
    for name in (TRAIN_FILE, EVAL_FILE):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    assert len(read(DATA / TRAIN_FILE)) == 2000 and len(read(DATA / EVAL_FILE)) == 200


def test_deterministic_and_seeded():
    assert make_problems(200, 40, seed=1) == make_problems(200, 40, seed=1)
    assert make_problems(200, 40, seed=1) != make_problems(200, 40, seed=2)


def test_held_out_problems_are_kept_apart():
    train, held_out = read(DATA / TRAIN_FILE), read(DATA / EVAL_FILE)
    key = lambda r: (r["kind"], r["a"], r["b"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held_out}  # not even reworded
    prompts = [r["prompt"] for r in train + held_out]
    assert len(set(prompts)) == len(prompts)  # no duplicates within either split
    kinds = [k.name for k in KINDS]
    assert sorted({r["kind"] for r in held_out}) == sorted(kinds)
    assert all(sum(r["kind"] == k for r in train) == 500 for k in kinds)


def test_answers_are_right_by_recomputation():
    records = read(DATA / TRAIN_FILE) + read(DATA / EVAL_FILE)
    for r in records:
        a, symbol, b = r["expression"].split()
        assert (int(a), int(b)) == (r["a"], r["b"])
        assert r["answer"] == OPS[symbol](r["a"], r["b"]) and isinstance(r["answer"], int)
        # the question states both numbers and ends with the instruction
        assert f" {r['a']} " in r["prompt"] and f" {r['b']} " in r["prompt"]
        assert r["prompt"].endswith(INSTRUCTION)
    assert any(r["answer"] < 0 for r in records)  # the temperature problems go below zero
    assert all(r["answer"] >= 0 for r in records if r["kind"] != "temp")


# ---- the reward ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("12", 12.0),
        ("The answer is 12.", 12.0),
        ("Tom has 3 + 4 = 7 apples now.", 7.0),
        ("1,234", 1234.0),
        ("She has 1,234 stickers!", 1234.0),
        ("-5", -5.0),
        ("It is \u22123 degrees at night.", -3.0),
        ("10-3=7", 7.0),
        ("5 - 3", 3.0),
        ("2.5 kg", 2.5),
        ("**42**", 42.0),
        ("no number here", None),
        ("", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_arithmetic_score_hand_cases():
    assert arithmetic_score("The answer is 12.", 12) == 1.0
    assert arithmetic_score("12.0", 12) == 1.0
    assert arithmetic_score("It will be -4 degrees.", -4) == 1.0
    assert arithmetic_score("It will be 4 degrees.", -4) == 0.0  # the sign matters
    assert arithmetic_score("1,500", 1500) == 1.0
    assert arithmetic_score("1,500", "1,500") == 1.0  # an answer stored as text
    assert arithmetic_score("12 apples, then 13", 12) == 0.0  # the final number counts
    assert arithmetic_score("twelve", 12) == 0.0  # no number, no credit (no format credit at all)
    assert arithmetic_score("", 0) == 0.0


def test_arithmetic_reward_on_the_shipped_data():
    records = read(DATA / EVAL_FILE)[:20]
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    right = [f"{r['expression']} = {r['answer']}." for r in records]
    wrong = [f"The answer is {r['answer'] + 1}" for r in records]
    assert arithmetic_reward(prompts, right, answer=answers) == [1.0] * 20
    assert arithmetic_reward(prompts, wrong, answer=answers) == [0.0] * 20
    with pytest.raises(ValueError):
        arithmetic_reward(prompts, right, answer=answers[:3])


def test_arithmetic_partial_score_hand_cases():
    assert arithmetic_partial_score("6 * 3 = 18", 18) == 1.0  # ends on the answer: full credit
    assert arithmetic_partial_score("6 bags * 3 apples = 18 apples in 6 bags", 18) == 0.5  # said, then more
    assert arithmetic_partial_score("It drops to -4, not 4", 4) == 1.0
    assert arithmetic_partial_score("It drops to -4 degrees.", 4) == 0.0  # -4 is not 4
    assert arithmetic_partial_score("1,500 stickers, 3 boxes", 1500) == 0.5
    assert arithmetic_partial_score("17 and 19", 18) == 0.0
    assert arithmetic_partial_score("", 0) == 0.0


def test_arithmetic_format_score_hand_cases():
    assert arithmetic_format_score("18", 18) == 1.2  # right, and just the number as asked
    assert arithmetic_format_score("The answer is 18.", 18) == 1.2  # 4 words ending on the number
    assert arithmetic_format_score("17", 18) == 0.2  # the format alone: less than any right answer
    assert arithmetic_format_score("18 apples in 6 bags", 18) == 0.0  # the final number is 6, not 18
    assert arithmetic_format_score("Anna buys 6 bags of 3 apples, so she has 18", 18) == 1.0  # right, long
    assert arithmetic_format_score("", 0) == 0.0


def test_the_trl_workers_reward_gets_the_records_answer():
    """bench/trl_grpo_worker.py adapts our rule function to TRL's calling convention: chat messages in,
    the dataset's columns as keyword arguments; only the fields the function names are forwarded."""
    from bench.trl_grpo_worker import load_reward

    reward = load_reward("rlhf_ray.rewards_builtin:arithmetic_partial_reward", chat=True)
    prompts = [[{"role": "user", "content": "2 + 3?"}]] * 3
    completions = [[{"role": "assistant", "content": c}] for c in ("5", "5 apples, 2 bags", "6")]
    got = reward(prompts, completions, answer=[5, 5, 5], kind=["add"] * 3, trainer_state=None)
    assert got == [1.0, 0.5, 0.0]


# ---- the config ------------------------------------------------------------------------------------------
def test_config_loads_and_points_at_the_task():
    cfg = RLHFConfig.from_yaml(CONFIG)
    assert cfg.algorithm.estimator == "grpo" and cfg.data.apply_chat_template
    assert (ROOT / cfg.data.train_path).resolve() == (DATA / TRAIN_FILE).resolve()
    assert (ROOT / cfg.data.eval_path).resolve() == (DATA / EVAL_FILE).resolve()
    assert cfg.reward.kind == "rule" and cfg.reward.function == "rlhf_ray.rewards_builtin:arithmetic_reward"
    assert cfg.run.eval_function == cfg.reward.function and cfg.run.eval_prompts > 0
