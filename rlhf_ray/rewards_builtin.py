"""Rule rewards that ship with rlhf_ray, for `reward.kind: rule` (`reward.function: rlhf_ray.rewards_builtin:NAME`).

Each is a pure Python function `fn(prompts, responses, **fields) -> list[float]` (see `rlhf_ray.rewards`):
`concise_reward` reads only the responses, `arithmetic_reward` also the prompt records' `answer` field.
"""

from __future__ import annotations

import math
import re

CONCISE_MAX_WORDS = 20
_CLOSERS = "\"')]}»”’*"  # closing quotes and brackets that may follow a sentence's full stop


def concise_score(response: str, max_words: int = CONCISE_MAX_WORDS) -> float:
    """How short and finished `response` is, in [0, 1]:

    - 0.5 if it ends with a full stop ('.', possibly inside closing quotes or brackets; an ellipsis does
      not count), i.e. the answer was finished rather than cut off;
    - 0.5 if it has at most `max_words` words, falling linearly to 0 at twice that many;
    - 0 for an empty answer.

    So "Paris is the capital of France." scores 1.0, the same sentence without its full stop 0.5, and a
    rambling answer cut off after 40 words 0."""
    text = response.strip()
    words = len(text.split())
    if words == 0:
        return 0.0
    end = text.rstrip(_CLOSERS).rstrip()
    finished = end.endswith(".") and not end.endswith("..")
    brevity = min(1.0, max(0.0, (2 * max_words - words) / max_words))
    return 0.5 * finished + 0.5 * brevity


def concise_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward short answers that finish with a full stop, at most 20 words (`concise_score`); meant for
    instructions like "Write a one-sentence ...". The prompts are not used."""
    return [concise_score(r) for r in responses]


# ---- verifiable answers ---------------------------------------------------------------------------------
# a number as people write it: an optional minus sign (ASCII or U+2212), digits with optional thousands
# commas ("1,234"), an optional decimal part; a full stop not followed by a digit is not part of it
_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in `text` ("... so she has 1,234 apples." -> 1234.0, "-7." -> -7.0), or
    None when it has none. A minus sign counts only right before the digits ("5 - 3" reads 5 and 3)."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return float(matches[-1].replace(",", "").replace("\u2212", "-"))


def arithmetic_score(response: str, answer: int | float | str) -> float:
    """1.0 if the last number in `response` equals `answer` (a number, or a string holding one), else 0.0.
    No credit for format: the mean score over prompts is the fraction answered correctly, and a
    group-relative estimator (GRPO, RLOO) already learns from the prompts where some samples are right."""
    expected = final_number(str(answer)) if isinstance(answer, str) else float(answer)
    got = final_number(response)
    return float(got is not None and expected is not None and math.isclose(got, expected, abs_tol=1e-9))


def arithmetic_reward(
    prompts: list[str], responses: list[str], answer: list[int | float | str]
) -> list[float]:
    """Reward for the arithmetic word problems of `jobs.arithmetic_task`: 1.0 when a response's final
    number is the record's `answer`, 0.0 otherwise (`arithmetic_score`). `answer` is the prompt records'
    field, one per response, passed by the reward actor (`rlhf_ray.rewards`); the prompts are not used."""
    return [arithmetic_score(r, a) for r, a in zip(responses, answer, strict=True)]


def arithmetic_partial_score(response: str, answer: int | float | str) -> float:
    """Training signal for a model that rarely ends on the answer yet: 1.0 when the final number is the
    answer (`arithmetic_score`), 0.5 when the answer is written earlier in the response ("6 * 3 = 18
    apples in 6 bags"), 0.0 otherwise. Evaluate with `arithmetic_score`, which gives no partial credit."""
    if arithmetic_score(response, answer):
        return 1.0
    expected = final_number(str(answer)) if isinstance(answer, str) else float(answer)
    numbers = (float(m.replace(",", "").replace("\u2212", "-")) for m in _NUMBER.findall(response))
    return 0.5 * any(expected is not None and math.isclose(n, expected, abs_tol=1e-9) for n in numbers)


def arithmetic_partial_reward(
    prompts: list[str], responses: list[str], answer: list[int | float | str]
) -> list[float]:
    """`arithmetic_partial_score` per response: half credit for an answer stated before the end, so that
    a small model (SmolLM2-135M ends on the right number ~6% of the time) gets a denser signal toward
    saying it and stopping. The strict `arithmetic_reward` stays the held-out score."""
    return [arithmetic_partial_score(r, a) for r, a in zip(responses, answer, strict=True)]


ARITHMETIC_SHORT_WORDS = 6


def arithmetic_format_score(response: str, answer: int | float | str) -> float:
    """Training signal that also rewards following the instruction "Answer with just the number.":
    `arithmetic_score` (1.0 for the right final number) plus 0.2 for an answer of at most
    `ARITHMETIC_SHORT_WORDS` words that ends on a number (right or wrong). The format part is dense (a
    small model's answers vary in length from the start), so a run learns from its first steps; the strict
    `arithmetic_score` stays the held-out measure, and a short wrong answer (0.2) never beats a right one."""
    text = response.strip()
    short = 0 < len(text.split()) <= ARITHMETIC_SHORT_WORDS and final_number(text.split()[-1]) is not None
    return arithmetic_score(response, answer) + 0.2 * short


def arithmetic_format_reward(
    prompts: list[str], responses: list[str], answer: list[int | float | str]
) -> list[float]:
    """`arithmetic_format_score` per response: the right final number (1.0) plus 0.2 for a short answer
    that ends on a number, as the prompt asks. Evaluate with the strict `arithmetic_reward`."""
    return [arithmetic_format_score(r, a) for r, a in zip(responses, answer, strict=True)]
