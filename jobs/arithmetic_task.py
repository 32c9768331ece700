"""A verifiable task a person recognises: short arithmetic word problems with an exact integer answer, for
RL on a real model (reward: `rlhf_ray.rewards_builtin:arithmetic_reward`, which checks a response's final
number against each record's `answer` field).

python -m jobs.arithmetic_task --out jobs/data      # writes the files committed there (seed 0)

Writes <out>/arithmetic_train.jsonl (2000 problems) and <out>/arithmetic_eval.jsonl (200, held out). Each
record: `prompt` (the question and the instruction), `answer` (int), `kind` (add, sub, mul, temp),
`expression` (e.g. "12 - 5") and the operands `a`, `b`.

For the offline stages (SFT, reward model, DPO; jobs/configs/smollm2_dpo.yaml, smollm2_pipeline.yaml), from
training problems only, two more files of the same problems' records plus:

- <out>/arithmetic_sft.jsonl (400): `response`, a short right answer, "12 - 5 = 7." or "The answer is 7.";
- <out>/arithmetic_pairs.jsonl (400, other problems than the demonstrations'): `chosen`, a short right
  answer, and `rejected`, a wrong one, as a labeler who knows the answer would rank them; `mistake` names
  the wrong one's kind: off by one or by ten, the wrong operation (for a temperature: the sign), or a
  rambling start that never reaches the answer.

Held out means more than a different wording: no (kind, a, b) of an eval problem appears in training, so
a model cannot pass the eval by remembering "7 x 8" from a training prompt. Four kinds, equally often:
addition and subtraction of numbers up to 80 (never below zero), multiplication tables 2-12, and a
temperature that drops below zero (negative answers). Deterministic from the seed; no download.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTRUCTION = "Answer with just the number."
TRAIN_FILE, EVAL_FILE = "arithmetic_train.jsonl", "arithmetic_eval.jsonl"
SFT_FILE, PAIRS_FILE = "arithmetic_sft.jsonl", "arithmetic_pairs.jsonl"
NAMES = ["Tom", "Anna", "Sam", "Maria", "Ben", "Lily", "Omar", "Mei", "Jack", "Sara", "Ravi", "Emma"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "shells"]


@dataclass(frozen=True)
class Kind:
    """One kind of problem: its operator, its operand pairs and the wordings that ask it."""

    name: str
    symbol: str  # as written in `expression`
    compute: Callable[[int, int], int]
    pairs: list[tuple[int, int]]
    templates: list[str]  # {name}, {item}, {a}, {b}


KINDS = [
    Kind(
        "add",
        "+",
        lambda a, b: a + b,
        [(a, b) for a in range(2, 61) for b in range(2, 61)],
        [
            "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
            "There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box now?",
            "{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {name} read?",
        ],
    ),
    Kind(
        "sub",
        "-",
        lambda a, b: a - b,
        [(a, b) for a in range(5, 81) for b in range(1, a)],
        [
            "{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
            "A shop has {a} {item}. It sells {b} of them. How many {item} does the shop have left?",
        ],
    ),
    Kind(
        "mul",
        "x",
        lambda a, b: a * b,
        [(a, b) for a in range(2, 13) for b in range(2, 13)],
        [
            "{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?",
            "A classroom has {a} rows of desks with {b} desks in each row. How many desks are there?",
        ],
    ),
    Kind(
        "temp",
        "-",
        lambda a, b: a - b,
        [(a, b) for a in range(0, 21) for b in range(1, 31)],
        [
            "In the morning it is {a} degrees. By night the temperature drops by {b} degrees. What is the "
            "temperature at night?",
            "{name} sees that it is {a} degrees outside. Then it gets {b} degrees colder. What is the "
            "temperature now?",
        ],
    ),
]


def problem(kind: Kind, a: int, b: int, rng: random.Random) -> dict[str, Any]:
    """One record: the question in one of `kind`'s wordings (name and item drawn from `rng`) and its answer."""
    question = rng.choice(kind.templates).format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return {
        "prompt": f"{question} {INSTRUCTION}",
        "answer": kind.compute(a, b),
        "kind": kind.name,
        "expression": f"{a} {kind.symbol} {b}",
        "a": a,
        "b": b,
    }


def make_problems(
    n_train: int = 2000, n_eval: int = 200, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) records, each kind equally often (up to rounding). Every kind's operand pairs are
    shuffled once; the eval takes the first pairs, one problem each, and training draws from the others,
    so no (kind, a, b) is in both. Prompts are unique within and across the two splits."""
    rng = random.Random(seed)
    pools: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = {}
    eval_counts = _split_evenly(n_eval, len(KINDS))
    for kind, k in zip(KINDS, eval_counts):
        pairs = list(kind.pairs)
        rng.shuffle(pairs)
        if k >= len(pairs):
            raise ValueError(f"{n_eval} eval problems leave kind {kind.name!r} no operand pairs to train on")
        pools[kind.name] = (pairs[:k], pairs[k:])
    seen: set[str] = set()
    eval_records = []
    for kind in KINDS:
        for a, b in pools[kind.name][0]:
            record = problem(kind, a, b, rng)
            while record["prompt"] in seen:  # another name or item; the numbers stay
                record = problem(kind, a, b, rng)
            seen.add(record["prompt"])
            eval_records.append(record)
    train_records = []
    for kind, k in zip(KINDS, _split_evenly(n_train, len(KINDS))):
        made = 0
        for _ in range(1000 * max(k, 1)):
            if made == k:
                break
            record = problem(kind, *rng.choice(pools[kind.name][1]), rng)
            if record["prompt"] not in seen:
                seen.add(record["prompt"])
                train_records.append(record)
                made += 1
        if made < k:
            raise ValueError(f"kind {kind.name!r} has too few distinct problems for {k} training prompts")
    rng.shuffle(eval_records)
    rng.shuffle(train_records)
    return train_records, eval_records


def _split_evenly(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


# ---- demonstrations and preference pairs, for the offline stages -----------------------------------------
MISTAKES = ("off_by_one", "off_by_ten", "wrong_operation", "rambling")
RAMBLES = [
    "Let's think about this step by step. First, there are {a}, and then we need to work out",
    "Okay, so we start with {a}. To find the answer we have to think about what happens next, which is",
    "This is a word problem. Word problems can be tricky, so let's read the question carefully and",
]


def short_answer(
    record: dict[str, Any], value: int, rng: random.Random, expression: str | None = None
) -> str:
    """A short answer ending on `value`: "<expression> = <value>." or "The answer is <value>."."""
    if rng.random() < 0.5:
        return f"{expression or record['expression']} = {value}."
    return f"The answer is {value}."


def wrong_answer(record: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """(mistake, response): a plausible wrong answer to `record` whose final number is not its answer (or
    that has no final answer at all), the mistake drawn from `MISTAKES`."""
    a, b, answer, kind = record["a"], record["b"], record["answer"], record["kind"]
    while True:
        mistake = rng.choice(MISTAKES)
        if mistake == "rambling":  # unfinished; its last number, if any, is a: never the answer (b >= 1)
            return mistake, rng.choice(RAMBLES).format(a=a)
        expression = None
        if mistake == "off_by_one":
            value = answer + rng.choice((-1, 1))
        elif mistake == "off_by_ten":
            value = answer + rng.choice((-10, 10))
        elif kind == "temp":  # the sign lost: b - a degrees, above zero where the answer is below
            value, expression = b - a, f"{b} - {a}"
        else:  # + for - and x, - for +
            symbol = "-" if kind == "add" else "+"
            value = a - b if symbol == "-" else a + b
            expression = f"{a} {symbol} {b}"
        if value != answer:
            return mistake, short_answer(record, value, rng, expression)


def make_offline_data(
    train: list[dict[str, Any]], n_sft: int = 400, n_pairs: int = 400, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(demonstrations, preference pairs) from the training problems `train` only, on different problems:
    each record with `response` (SFT) or `chosen`, `rejected`, `mistake` (pairs) added. A random stream of
    its own, so the train and eval files do not depend on these sizes."""
    if n_sft + n_pairs > len(train):
        raise ValueError(
            f"{n_sft} demonstrations + {n_pairs} pairs need that many of the {len(train)} problems"
        )
    rng = random.Random(f"offline-{seed}")
    picked = rng.sample(train, n_sft + n_pairs)
    demonstrations = [r | {"response": short_answer(r, r["answer"], rng)} for r in picked[:n_sft]]
    pairs = []
    for r in picked[n_sft:]:
        right = short_answer(r, r["answer"], rng)
        mistake, wrong = wrong_answer(r, rng)
        pairs.append(r | {"chosen": right, "rejected": wrong, "mistake": mistake})
    return demonstrations, pairs


def write_arithmetic_task(
    out: str | Path,
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    n_sft: int = 400,
    n_pairs: int = 400,
) -> dict[str, Path]:
    """Write the four JSONL files under `out`; returns {"train", "eval", "sft", "pairs": path}."""
    from rlhf_ray.data import write_jsonl

    train, held_out = make_problems(n_train, n_eval, seed)
    demonstrations, pairs = make_offline_data(train, n_sft, n_pairs, seed)
    out = Path(out)
    return {
        "train": write_jsonl(out / TRAIN_FILE, train),
        "eval": write_jsonl(out / EVAL_FILE, held_out),
        "sft": write_jsonl(out / SFT_FILE, demonstrations),
        "pairs": write_jsonl(out / PAIRS_FILE, pairs),
    }


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="jobs/data", help="directory to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="training problems (default: %(default)s)")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems (default: %(default)s)")
    parser.add_argument("--sft", type=int, default=400, help="SFT demonstrations (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=400, help="preference pairs (default: %(default)s)")
    args = parser.parse_args(argv)
    paths = write_arithmetic_task(args.out, args.train, args.eval, args.seed, args.sft, args.pairs)
    for path in paths.values():
        print(path)
    return paths


if __name__ == "__main__":
    main()
