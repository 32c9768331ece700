"""The embedded default task: sort a short list of digits.

    prompt "sort: 3 9 1 4 ="   ->   answer "1 3 4 9" (then EOS)

3 to 6 digits drawn with replacement. The hidden **gold** score of an answer is the number of positions
that match the sorted list divided by max(len(answer), len(target)), and 0 for a malformed answer (empty,
or a word that is not a digit). The task comes with what each RLHF stage needs:
- noisy human demonstrations for SFT: 35% carry one slip (an adjacent swap 50%, a dropped digit 25%,
  a digit written twice 25%), for a mean gold of about 0.84;
- a simulated labeler that prefers the better of two answers under Bradley–Terry noise,
  P(a preferred) = sigmoid((gold(a) - gold(b)) / temperature), for reward-model preference pairs;
- `gold_reward`, the gold score as a rule function, used for evaluation: it tells whether RL improved what
  the labeler prefers or only fooled the learned reward model.
`write_task` writes ordinary JSONL files, so every stage reads the task exactly like user data.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

DIGITS = [str(d) for d in range(10)]
VOCAB = ["sort:", "=", *DIGITS]  # the words of the task, for `rlhf_ray.models.build_word_tokenizer`
MIN_DIGITS, MAX_DIGITS = 3, 6
SLIP_RATE = 0.35
SLIP_KINDS = ("swap", "drop", "repeat")
SLIP_PROBS = (0.5, 0.25, 0.25)
LABEL_TEMPERATURE = 0.1

_PROMPT_RE = re.compile(r"sort:((?:\s+\d)+)\s+=")
_EOS_TEXT = "<|eos|>"


# ---- prompts and the gold score -------------------------------------------------------------------
def make_prompt(digits: list[int]) -> str:
    return "sort: " + " ".join(str(d) for d in digits) + " ="


def parse_prompt(prompt: str) -> list[int]:
    """The digits of a task prompt; the last 'sort: ... =' in the text counts, so a prompt rendered
    through a chat template parses too. ValueError for text that holds no task prompt."""
    matches = _PROMPT_RE.findall(prompt)
    if not matches:
        raise ValueError(f"not a digit-sorting prompt (expected 'sort: 3 9 1 4 ='): {prompt!r}")
    return [int(d) for d in matches[-1].split()]


def target(prompt: str) -> str:
    return " ".join(str(d) for d in sorted(parse_prompt(prompt)))


def gold_score(prompt: str, response: str) -> float:
    """Share of positions where the answer matches the sorted digits, over max(len answer, len target);
    0 for a malformed answer. One trailing '<|eos|>' in the text is ignored."""
    want = sorted(parse_prompt(prompt))
    text = response.strip()
    if text.endswith(_EOS_TEXT):
        text = text[: -len(_EOS_TEXT)]
    words = text.split()
    if not words or any(w not in DIGITS for w in words):
        return 0.0
    answer = [int(w) for w in words]
    hits = sum(a == t for a, t in zip(answer, want))
    return hits / max(len(answer), len(want))


def digit_shaped_score(prompt: str, response: str) -> float:
    """A dense partial-credit score for learning from scratch (smoke tests, the first steps of a random
    model): the share of answer words that are digits, times how close the answer's length is to the
    target's. Unlike `gold_score` it ignores order, so it is only a stepping stone, never the objective."""
    want = len(parse_prompt(prompt))
    text = response.strip()
    if text.endswith(_EOS_TEXT):
        text = text[: -len(_EOS_TEXT)]
    words = text.split()
    if not words or not want:
        return 0.0
    digit_share = sum(w in DIGITS for w in words) / len(words)
    return digit_share * max(0.0, 1.0 - abs(len(words) - want) / want)


def digit_shaped_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """`digit_shaped_score` per pair: the rule-function protocol (`reward.kind: rule`)."""
    return [digit_shaped_score(p, r) for p, r in zip(prompts, responses)]


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold score as a rule function (`fn(prompts, responses) -> list[float]`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


# ---- generators -----------------------------------------------------------------------------------
def random_digits(rng: np.random.Generator) -> list[int]:
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    return [int(d) for d in rng.integers(0, 10, size=n)]


def sample_prompts(
    n: int,
    seed: int | np.random.Generator = 0,
    exclude: set[str] | frozenset[str] = frozenset(),
    unique: bool = False,
) -> list[str]:
    """`n` task prompts, never one of `exclude`; with `unique`, no prompt twice."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        p = make_prompt(random_digits(rng))
        if p in exclude or (unique and p in seen):
            continue
        seen.add(p)
        out.append(p)
    return out


def demonstration(prompt: str, rng: np.random.Generator, slip_rate: float = SLIP_RATE) -> str:
    """A human-like answer: the sorted digits, with probability `slip_rate` carrying one slip at a
    uniformly chosen place (adjacent swap 50%, dropped digit 25%, digit written twice 25%)."""
    answer = sorted(parse_prompt(prompt))
    if rng.random() < slip_rate:
        kind = SLIP_KINDS[int(rng.choice(len(SLIP_KINDS), p=SLIP_PROBS))]
        if kind == "swap":
            i = int(rng.integers(0, len(answer) - 1))
            answer[i], answer[i + 1] = answer[i + 1], answer[i]
        elif kind == "drop":
            del answer[int(rng.integers(0, len(answer)))]
        else:
            i = int(rng.integers(0, len(answer)))
            answer.insert(i, answer[i])
    return " ".join(str(d) for d in answer)


def label(
    prompt: str, a: str, b: str, rng: np.random.Generator, temperature: float = LABEL_TEMPERATURE
) -> bool:
    """The simulated labeler: True when it prefers `a` over `b`, with probability
    sigmoid((gold(a) - gold(b)) / temperature) (Bradley–Terry noise around the gold score)."""
    margin = (gold_score(prompt, a) - gold_score(prompt, b)) / temperature
    p_a = 1.0 / (1.0 + math.exp(-margin))
    return bool(rng.random() < p_a)


def make_preference_records(
    prompts: list[str], samples_a: list[str], samples_b: list[str], seed: int = 0
) -> list[dict[str, str]]:
    """Preference records {prompt, chosen, rejected} from two responses per prompt, ordered by the
    simulated labeler. Pairs whose two responses are the same text carry no preference and are dropped."""
    if not len(prompts) == len(samples_a) == len(samples_b):
        raise ValueError(
            f"make_preference_records: lengths differ: prompts={len(prompts)}, "
            f"samples_a={len(samples_a)}, samples_b={len(samples_b)}"
        )
    rng = np.random.default_rng(seed)
    records = []
    for prompt, a, b in zip(prompts, samples_a, samples_b):
        if a.strip() == b.strip():
            continue
        chosen, rejected = (a, b) if label(prompt, a, b, rng) else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def write_task(
    out_dir: str | Path,
    seed: int = 0,
    n_demos: int = 8000,
    n_train_prompts: int = 4000,
    n_eval_prompts: int = 500,
) -> dict[str, Path]:
    """Write the task as JSONL: `sft.jsonl` {prompt, response} (noisy demonstrations),
    `prompts.jsonl` {prompt} (for preference sampling and RL) and `eval_prompts.jsonl` {prompt} (held
    out: distinct, and in neither of the other files). Returns {"sft", "prompts", "eval_prompts"} -> path.
    The same seed writes the same files."""
    from rlhf_ray.data.loading import write_jsonl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_rng, demo_rng, train_rng = (np.random.default_rng([seed, k]) for k in range(3))
    eval_prompts = sample_prompts(n_eval_prompts, eval_rng, unique=True)
    held_out = frozenset(eval_prompts)
    demo_prompts = sample_prompts(n_demos, demo_rng, exclude=held_out)
    demos = [{"prompt": p, "response": demonstration(p, demo_rng)} for p in demo_prompts]
    train_prompts = sample_prompts(n_train_prompts, train_rng, exclude=held_out)
    paths = {
        "sft": write_jsonl(out_dir / "sft.jsonl", demos),
        "prompts": write_jsonl(out_dir / "prompts.jsonl", [{"prompt": p} for p in train_prompts]),
        "eval_prompts": write_jsonl(out_dir / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts]),
    }
    return paths
