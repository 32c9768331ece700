"""The synthetic digit-sorting task: gold score, demonstrations, the simulated labeler, the written files."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from rlhf_ray.data import load_records
from rlhf_ray.data.synthetic import (
    VOCAB,
    demonstration,
    gold_reward,
    gold_score,
    label,
    make_preference_records,
    parse_prompt,
    sample_prompts,
    target,
    write_task,
)

P = "sort: 3 9 1 4 ="  # sorted: 1 3 4 9


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("1 3 4 9", 1.0),
        (" 1 3 4 9 ", 1.0),  # vLLM's text starts with a space
        ("1 3 4 9<|eos|>", 1.0),
        ("1 4 3 9", 0.5),  # adjacent swap: 2 of 4 positions
        ("1 3 4", 0.75),  # dropped digit: 3 of max(3, 4)
        ("1 3 4 9 9", 0.8),  # digit written twice at the end: 4 of max(5, 4)
        ("1 1 3 4 9", 0.2),  # written twice at the start: only position 0 matches, of 5
        ("9 4 3 1", 0.0),
        ("3", 0.0),  # position 0 should be 1: 0 of 4
        ("1", 0.25),
        ("", 0.0),  # malformed: empty
        ("1 3 x 9", 0.0),  # malformed: a non-digit word
        ("1 3 4 = 9", 0.0),
        ("1 3 4 9 sort:", 0.0),
        ("13 4 9", 0.0),  # '13' is not a digit
    ],
)
def test_gold_score_hand_worked(response, expected):
    assert gold_score(P, response) == pytest.approx(expected)


def test_gold_score_with_repeated_digits():
    # sorted: 0 5 5; "0 5" -> 2 of 3; "5 0 5" -> only the last position matches: 1 of 3
    assert gold_score("sort: 5 0 5 =", "0 5 5") == 1.0
    assert gold_score("sort: 5 0 5 =", "0 5") == pytest.approx(2 / 3)
    assert gold_score("sort: 5 0 5 =", "5 0 5") == pytest.approx(1 / 3)


def test_prompt_parsing_and_rule_protocol():
    assert parse_prompt(P) == [3, 9, 1, 4]
    assert target(P) == "1 3 4 9"
    # a prompt rendered through the chat template still parses
    assert parse_prompt("<|user|>sort: 7 2 2 =<|eos|><|assistant|>") == [7, 2, 2]
    assert gold_reward([P, "sort: 2 1 0 ="], ["1 3 4 9", "0 2 1"]) == [1.0, pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="not a digit-sorting prompt"):
        gold_score("what is 2+2?", "4")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_reward([P, P], ["1"])


def test_prompts_use_only_the_vocabulary():
    prompts = sample_prompts(2000, seed=3)
    lengths = [len(parse_prompt(p)) for p in prompts]
    assert min(lengths) == 3 and max(lengths) == 6
    assert set(lengths) == {3, 4, 5, 6}
    assert {w for p in prompts for w in p.split()} <= set(VOCAB)
    assert sample_prompts(50, seed=3) == prompts[:50]  # deterministic from the seed


def test_demonstrations_slip_rates_and_mean_gold():
    rng = np.random.default_rng(0)
    prompts = sample_prompts(8000, seed=1)
    demos = [demonstration(p, rng) for p in prompts]
    golds = np.array(gold_reward(prompts, demos))
    assert golds.mean() == pytest.approx(0.84, abs=0.03)
    assert {w for d in demos for w in d.split()} <= set(VOCAB)
    longer = np.mean([len(d.split()) > len(parse_prompt(p)) for p, d in zip(prompts, demos)])
    shorter = np.mean([len(d.split()) < len(parse_prompt(p)) for p, d in zip(prompts, demos)])
    # 35% slips: dropped digit and digit written twice 25% each of them -> 8.75% each (4 sigma ~ 1.3%)
    assert longer == pytest.approx(0.0875, abs=0.013)
    assert shorter == pytest.approx(0.0875, abs=0.013)
    # swaps change the answer unless the two swapped digits are equal; all slips together stay under 35%
    wrong = np.mean([d != target(p) for p, d in zip(prompts, demos)])
    assert 0.28 < wrong <= 0.37
    # without slips a demonstration is the target
    assert demonstration(P, np.random.default_rng(0), slip_rate=0.0) == "1 3 4 9"


def test_labeler_follows_bradley_terry():
    rng = np.random.default_rng(0)
    # gold 1.0 vs 0.5: P(first preferred) = sigmoid(5) = 0.99331
    n = 4000
    wins = sum(label(P, "1 3 4 9", "1 4 3 9", rng) for _ in range(n))
    expected = 1 / (1 + math.exp(-5))
    assert wins / n == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n) + 1e-3)
    # the labeler is symmetric and a tie is a coin flip
    ties = sum(label(P, "1 3 4", "1 3 4", rng) for _ in range(n))
    assert ties / n == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / n))
    # over noisy demonstration pairs, agreement with the gold ordering matches the model's rate
    prompts = sample_prompts(3000, seed=2)
    a = [demonstration(p, rng) for p in prompts]
    b = [demonstration(p, rng) for p in prompts]
    ga, gb = np.array(gold_reward(prompts, a)), np.array(gold_reward(prompts, b))
    decided = np.flatnonzero(ga != gb)
    agree = np.mean([label(prompts[i], a[i], b[i], rng) == (ga[i] > gb[i]) for i in decided])
    p_agree = 1 / (1 + np.exp(-np.abs(ga[decided] - gb[decided]) / 0.1))
    sigma = math.sqrt(float(np.sum(p_agree * (1 - p_agree)))) / len(decided)
    assert agree == pytest.approx(p_agree.mean(), abs=4 * sigma)
    assert 0.9 < agree < 1.0


def test_make_preference_records():
    prompts = [P] * 300 + ["sort: 1 0 0 ="]
    a = ["1 3 4 9"] * 150 + ["1 3 9 4"] * 150 + ["0 0 1"]
    b = ["1 4 3 9"] * 150 + ["1 3 4 9"] * 150 + ["0 0 1"]  # the last pair is identical: dropped
    records = make_preference_records(prompts, a, b, seed=0)
    assert len(records) == 300
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in records)
    right = sum(r["chosen"] == "1 3 4 9" for r in records)
    assert right / 300 == pytest.approx(1 / (1 + math.exp(-5)), abs=0.03)
    assert make_preference_records(prompts, a, b, seed=0) == records
    with pytest.raises(ValueError, match="lengths differ"):
        make_preference_records([P], a, b)


def test_write_task(tmp_path):
    paths = write_task(tmp_path / "task", seed=0, n_demos=3000, n_train_prompts=1500, n_eval_prompts=500)
    assert set(paths) == {"sft", "prompts", "eval_prompts"}
    sft = load_records(paths["sft"], ["prompt", "response"])
    train = load_records(paths["prompts"], ["prompt"])
    held = load_records(paths["eval_prompts"], ["prompt"])
    assert (len(sft), len(train), len(held)) == (3000, 1500, 500)
    eval_set = set(held["prompt"])
    assert len(eval_set) == 500  # distinct
    assert not eval_set & set(train["prompt"])
    assert not eval_set & set(sft["prompt"])
    assert np.mean(gold_reward(sft["prompt"], sft["response"])) == pytest.approx(0.84, abs=0.04)
    again = write_task(tmp_path / "again", seed=0, n_demos=3000, n_train_prompts=1500, n_eval_prompts=500)
    other = write_task(tmp_path / "other", seed=1, n_demos=3000, n_train_prompts=1500, n_eval_prompts=500)
    for key in paths:
        assert again[key].read_bytes() == paths[key].read_bytes()
        assert other[key].read_bytes() != paths[key].read_bytes()


def test_rule_function_imports_without_torch():
    # a rule reward is loaded by name in the reward actor: it must not drag in torch/transformers/datasets
    code = "import sys, rlhf_ray.data.synthetic; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_digit_shaped_score_by_hand():
    from rlhf_ray.data.synthetic import digit_shaped_reward, digit_shaped_score

    p = "sort: 3 9 1 4 ="
    assert digit_shaped_score(p, "1 3 4 9") == 1.0
    assert digit_shaped_score(p, "9 4 3 1") == 1.0  # order is ignored: a stepping stone only
    assert digit_shaped_score(p, "1 3") == 0.5  # all digits, half the length
    assert digit_shaped_score(p, "1 = 3 4") == 0.75  # 3 of 4 words are digits, right length
    assert digit_shaped_score(p, "") == 0.0
    assert digit_shaped_reward([p, p], ["1 3 4 9 <|eos|>", "sort:"]) == [1.0, 0.0]
