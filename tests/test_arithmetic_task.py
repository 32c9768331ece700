"""The arithmetic word-problem task (`jobs.arithmetic_task`), its reward
(`rlhf_ray.rewards_builtin:arithmetic_reward`) and its GRPO config: deterministic, held-out problems
kept apart, answers right by recomputation, the committed files equal to what the script writes. Also the
offline stages' data (demonstrations and preference pairs from training problems only, right and wrong by
the reward) and the DPO and four-stage pipeline configs on SmolLM2. Fast."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import pytest

from jobs.arithmetic_task import (
    EVAL_FILE,
    INSTRUCTION,
    KINDS,
    MISTAKES,
    PAIRS_FILE,
    SFT_FILE,
    TRAIN_FILE,
    main,
    make_offline_data,
    make_problems,
)
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data import load_records
from rlhf_ray.rewards_builtin import (
    arithmetic_format_score,
    arithmetic_partial_score,
    arithmetic_reward,
    arithmetic_score,
    final_number,
)
from rlhf_ray.trainer.pipeline_layout import stage_plan

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


# ---- the offline stages' data: demonstrations and preference pairs ----------------------------------------
DPO_CONFIG = ROOT / "jobs" / "configs" / "smollm2_dpo.yaml"
PIPELINE_CONFIG = ROOT / "jobs" / "configs" / "smollm2_pipeline.yaml"
ADDED = {SFT_FILE: {"response"}, PAIRS_FILE: {"chosen", "rejected", "mistake"}}


def test_committed_offline_files_are_what_the_script_writes(tmp_path):
    paths = main(["--out", str(tmp_path)])
    assert set(paths) == {"train", "eval", "sft", "pairs"}
    for name in (TRAIN_FILE, EVAL_FILE, SFT_FILE, PAIRS_FILE):  # train and eval unchanged by the new files
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    for name in (SFT_FILE, PAIRS_FILE):
        assert len(read(DATA / name)) == 400 and (DATA / name).stat().st_size < 200_000, name


def test_offline_data_is_deterministic_and_seeded():
    train, _ = make_problems(200, 40, seed=1)
    assert make_offline_data(train, 30, 30, seed=1) == make_offline_data(train, 30, 30, seed=1)
    assert make_offline_data(train, 30, 30, seed=1) != make_offline_data(train, 30, 30, seed=2)
    with pytest.raises(ValueError, match="need that many"):
        make_offline_data(train, 150, 100)


def test_offline_data_uses_training_problems_only():
    train, held_out = read(DATA / TRAIN_FILE), read(DATA / EVAL_FILE)
    key = lambda r: (r["kind"], r["a"], r["b"])  # noqa: E731
    eval_keys, by_prompt = {key(r) for r in held_out}, {r["prompt"]: r for r in train}
    prompts = {}
    for name, added in ADDED.items():
        records = read(DATA / name)
        assert not {key(r) for r in records} & eval_keys, name  # not even reworded
        for r in records:  # a training record as it is, plus the stage's fields
            assert set(r) == set(by_prompt[r["prompt"]]) | added
            assert {k: v for k, v in r.items() if k not in added} == by_prompt[r["prompt"]]
        prompts[name] = [r["prompt"] for r in records]
        assert len(set(prompts[name])) == len(records), name
    assert not set(prompts[SFT_FILE]) & set(prompts[PAIRS_FILE])  # the pairs are other problems


def test_demonstrations_are_right_chosen_right_rejected_wrong():
    for r in read(DATA / SFT_FILE):
        assert arithmetic_score(r["response"], r["answer"]) == 1.0, r
        assert r["response"] in (f"{r['expression']} = {r['answer']}.", f"The answer is {r['answer']}.")
    pairs = read(DATA / PAIRS_FILE)
    for r in pairs:
        assert arithmetic_score(r["chosen"], r["answer"]) == 1.0, r
        assert arithmetic_score(r["rejected"], r["answer"]) == 0.0, r
        assert r["chosen"] != r["rejected"]
    mistakes = {m: [r for r in pairs if r["mistake"] == m] for m in MISTAKES}
    assert all(len(v) >= 60 for v in mistakes.values()), {m: len(v) for m, v in mistakes.items()}
    for r in mistakes["off_by_one"] + mistakes["off_by_ten"]:
        off = abs(final_number(r["rejected"]) - r["answer"])
        assert off == (1 if r["mistake"] == "off_by_one" else 10), r
    for r in mistakes["wrong_operation"]:  # + for - and x, - for +; a temperature above zero (b - a)
        a, b = r["a"], r["b"]
        wrong = {"add": a - b, "sub": a + b, "mul": a + b, "temp": b - a}[r["kind"]]
        assert final_number(r["rejected"]) == wrong, r
        assert r["rejected"].split(" = ")[0] != r["expression"], r
    for r in mistakes["rambling"]:  # never gets to a number that could be the answer
        assert not r["rejected"].endswith(".") and final_number(r["rejected"]) in (None, r["a"]), r


def test_offline_data_fits_the_configs_lengths():
    """With SmolLM2's tokenizer and chat template (when converted here): no prompt skipped for length, no
    answer cut, under the two configs' data.max_prompt_len / max_response_len."""
    from rlhf_ray import pretrained

    model = pretrained.default_cache_root() / "models" / pretrained.MODEL_NAME
    if not pretrained.is_converted(model):
        pytest.skip(f"SmolLM2 not converted at {model} (python -m jobs.convert_smollm2)")
    from rlhf_ray.data.preferences import encode_preferences
    from rlhf_ray.data.sft import encode_sft
    from rlhf_ray.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    for path in (DPO_CONFIG, PIPELINE_CONFIG):
        data = RLHFConfig.from_yaml(path, ["model.policy_path=/x"]).data
        sft, pairs = read(DATA / SFT_FILE), read(DATA / PAIRS_FILE)
        demos = encode_sft(sft, tokenizer, data)
        assert len(demos) == len(sft)
        assert all(ids[-1] == tokenizer.eos_token_id for ids in _responses(demos, "")), path.name
        prefs = encode_preferences(pairs, tokenizer, data)
        assert len(prefs) == len(pairs)
        for side in ("chosen_", "rejected_"):
            assert all(ids[-1] == tokenizer.eos_token_id for ids in _responses(prefs, side)), path.name


def _responses(batch, prefix: str) -> list[list[int]]:
    ids, mask = batch.tensors[f"{prefix}input_ids"], batch.tensors[f"{prefix}response_mask"]
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def test_dpo_config_loads_and_points_at_the_pairs():
    cfg = RLHFConfig.from_yaml(DPO_CONFIG, ["model.policy_path=/x"])
    assert (ROOT / cfg.data.train_path).resolve() == (DATA / PAIRS_FILE).resolve()
    assert cfg.data.apply_chat_template and cfg.offline.dpo.beta == 0.1
    assert 1e-6 <= cfg.offline.dpo.lr <= 5e-6 and cfg.offline.dpo.epochs == 1
    load_records(DATA / PAIRS_FILE, [cfg.data.prompt_field, cfg.data.chosen_field, cfg.data.rejected_field])


def test_pipeline_config_loads_and_plans_all_four_stages_on_the_task():
    cfg = RLHFConfig.from_yaml(PIPELINE_CONFIG)
    p = cfg.pipeline
    assert p.task == "own"
    files = {"demonstrations": SFT_FILE, "preference_pairs": PAIRS_FILE, "prompts": TRAIN_FILE}
    for key, name in (files | {"eval_prompts": EVAL_FILE}).items():
        assert (ROOT / getattr(p, key)).resolve() == (DATA / name).resolve(), key
    assert cfg.reward.kind == "model"  # RL optimises the learned reward model, not the answers
    assert cfg.run.eval_function == "rlhf_ray.rewards_builtin:arithmetic_reward"
    assert cfg.run.eval_prompts == p.n_eval_prompts and cfg.data.apply_chat_template
    assert cfg.run.prompts_per_step * cfg.rollout.samples_per_prompt == cfg.algorithm.mini_batch_size
    plan = {stage: s.action for stage, s in stage_plan(cfg).items()}
    assert plan == dict(
        data="given", sft="run", preferences="given", reward_model="run", rl="run", evaluate="run"
    )
    d = cfg.data
    load_records(DATA / SFT_FILE, [d.prompt_field, d.response_field])
    load_records(DATA / PAIRS_FILE, [d.prompt_field, d.chosen_field, d.rejected_field])
