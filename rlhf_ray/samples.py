"""Sample completions a person can read: a few rows of a step's batch (prompt, response, reward, advantage,
gold score, length) as small dicts, and a markdown table of them for TensorBoard's text tab.

Which rows: the first sample of `n` prompts spread evenly over the batch (so each engine's share shows up
and a group estimator's prompts are not all the same one). The rows are picked where the batch lives (the
glue worker, `actors.glue.samples`); only these dicts reach the driver. Pure: no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rlhf_ray.batch import Batch

# the columns of the TensorBoard table, in order (a row shows those it has)
COLUMNS = ("row", "prompt", "response", "reward", "advantage", "gold", "length")
TEXT_LIMIT = 400  # characters of a prompt or response shown in TensorBoard (samples.jsonl keeps them whole)


def sample_due(step: int, interval: int, total_steps: int) -> bool:
    """Whether training step `step` (from 1) writes samples: every `interval` steps (0: never) and the
    last step, so a run's final policy is always shown."""
    return interval > 0 and (step % interval == 0 or step == total_steps)


def pick_rows(prompt_index: Sequence[int] | None, size: int, n: int) -> list[int]:
    """Rows of the first sample of `n` prompts spread evenly over a batch of `size` rows whose row i
    answers prompt `prompt_index[i]` (None: each row its own prompt); fewer when it has fewer prompts."""
    firsts: list[int] = []
    seen: set[int] = set()
    for row, p in enumerate(prompt_index if prompt_index is not None else range(size)):
        if p not in seen:
            seen.add(p)
            firsts.append(row)
    if len(firsts) <= n:
        return firsts
    return [firsts[int(i)] for i in np.linspace(0, len(firsts) - 1, n).round()]


def sample_rows(
    batch: Batch, rows: Sequence[int], gold: Sequence[float] | None = None
) -> list[dict[str, Any]]:
    """The given rows of a batch with meta `prompt`/`response`, a `response_mask` and, where present,
    `scores` (the reward, before any normalisation) and `advantages` (their mean over the response's
    tokens; constant there for GRPO/RLOO). `gold`: a score per given row, e.g. the hidden labeler's."""
    mask = batch["response_mask"].float()
    lengths = mask.sum(1)
    out = []
    for k, i in enumerate(rows):
        row: dict[str, Any] = {
            "row": i,
            "prompt": batch.meta["prompt"][i],
            "response": batch.meta["response"][i],
            "length": int(lengths[i]),
        }
        if "scores" in batch:
            row["reward"] = float(batch["scores"][i])
        if "advantages" in batch:
            row["advantage"] = float((batch["advantages"][i] * mask[i]).sum() / lengths[i].clamp(min=1))
        if gold is not None:
            row["gold"] = float(gold[k])
        out.append(row)
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (TensorBoard renders it): long texts cut, `|` and line breaks escaped."""
    columns = [c for c in COLUMNS if any(c in r for r in rows)]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        text = str(value)
        if len(text) > TEXT_LIMIT:
            text = text[:TEXT_LIMIT] + "…"
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
