"""Rule rewards that ship with rlhf_ray, for `reward.kind: rule` (`reward.function: rlhf_ray.rewards_builtin:NAME`).

Each is a pure Python function `fn(prompts, responses) -> list[float]` (see `rlhf_ray.rewards`).
"""

from __future__ import annotations

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
