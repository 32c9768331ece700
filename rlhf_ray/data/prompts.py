"""Prompts: formatting (plain text, or a user turn through a chat template), tokenisation, length checks,
and `PromptSource`, the deterministic, resumable stream of prompts that RL draws its batches from.

A prompt in the data is either a string or a list of chat messages ({"role", "content"}). With
`data.apply_chat_template` a string becomes one user message; messages are rendered with the template
(`data.chat_template`, else the tokenizer's own) and the generation prompt that opens the assistant turn.
Plain prompts are tokenised with the tokenizer's special tokens (e.g. a BOS), rendered ones without (the
template writes its own).

Prompts longer than `data.max_prompt_len` tokens follow `data.overlong_prompt`:
- `skip` (default): the prompt is left out and counted;
- `truncate`: the **last** `max_prompt_len` tokens are kept (a leading BOS is kept too). The end of a
  prompt is what the response continues from: the question, the chat template's assistant header;
- `error`: a `DataError` naming the row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from rlhf_ray.config import DataConfig
from rlhf_ray.data.loading import DataError

logger = logging.getLogger(__name__)


def format_prompt(
    prompt: Any, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, where: str = "prompt"
) -> str:
    """The text the model sees for one prompt of the data (see the module docstring)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where} is empty; remove the row or fill in its {cfg.prompt_field!r} field")
        if not cfg.apply_chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        if not any(str(m["content"]).strip() for m in prompt):
            raise DataError(
                f"{where} is empty (every message's content is blank); remove the row or fill it in"
            )
        if not cfg.apply_chat_template:
            raise DataError(
                f"{where} is a list of chat messages but data.apply_chat_template=false; set "
                f"data.apply_chat_template=true (and data.chat_template if the tokenizer has none)"
            )
        messages = prompt
    else:
        raise DataError(
            f"{where}: field {cfg.prompt_field!r} must be a non-empty string or a list of "
            f"{{'role', 'content'}} messages, got {type(prompt).__name__} {str(prompt)[:80]!r}"
        )
    template = cfg.chat_template or tokenizer.chat_template
    if not template:
        raise DataError(
            "data.apply_chat_template=true but the tokenizer has no chat template; set data.chat_template "
            "to a Jinja template, or data.apply_chat_template=false"
        )
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def encode_prompts(
    prompts: Sequence[Any], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, what: str = "prompt"
) -> tuple[list[str], list[list[int] | None], dict[str, int]]:
    """Format, tokenise and length-check prompts. Returns (texts, ids, counts): `texts[i]` is the prompt as
    written in the data (chat messages: the rendered text), `ids[i]` its tokens, None when it was skipped
    for its length; counts: {"total", "skipped", "truncated"}. Errors name the row (0-based)."""
    texts = [format_prompt(p, tokenizer, cfg, where=f"{what} row {i}") for i, p in enumerate(prompts)]
    add_special = not cfg.apply_chat_template
    encoded = tokenizer(texts, add_special_tokens=add_special)["input_ids"] if texts else []
    limit = cfg.max_prompt_len
    bos = tokenizer.bos_token_id
    out: list[list[int] | None] = []
    counts = {"total": len(texts), "skipped": 0, "truncated": 0}
    for i, ids in enumerate(encoded):
        ids = list(ids)
        if not ids:
            raise DataError(f"{what} row {i} tokenises to no tokens: {texts[i]!r}")
        if len(ids) > limit:
            if cfg.overlong_prompt == "error":
                raise DataError(
                    f"{what} row {i} has {len(ids)} tokens, more than data.max_prompt_len={limit}; raise "
                    f"data.max_prompt_len, or set data.overlong_prompt=skip or truncate"
                )
            if cfg.overlong_prompt == "skip":
                counts["skipped"] += 1
                out.append(None)
                continue
            counts["truncated"] += 1
            keep_bos = bos is not None and ids[0] == bos and limit > 1
            ids = [bos, *ids[len(ids) - limit + 1 :]] if keep_bos else ids[len(ids) - limit :]
        out.append(ids)
    if counts["skipped"] or counts["truncated"]:
        logger.warning(
            "%ss longer than data.max_prompt_len=%d: %d skipped, %d truncated (of %d)",
            what,
            limit,
            counts["skipped"],
            counts["truncated"],
            counts["total"],
        )
    return [_as_text(t, p) for t, p in zip(texts, prompts)], out, counts


def _as_text(formatted: str, prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else formatted


class PromptSource:
    """An endless, deterministic stream of tokenised prompts. Every epoch visits each kept prompt once, in
    an order drawn from (seed, epoch); `state_dict`/`load_state_dict` carry the position for resume.

    `records` is a `datasets.Dataset` or a sequence of mappings with the `cfg.prompt_field` field. Every
    prompt is formatted and checked up front, so bad data fails before training starts. Each record's
    other fields (e.g. a verifiable task's `answer`) are kept beside its prompt for the reward
    (`next_records`); they are held on the driver, so keep them small."""

    def __init__(
        self,
        records: Any,
        tokenizer: PreTrainedTokenizerBase,
        cfg: DataConfig,
        seed: int = 0,
        shuffle: bool = True,
    ):
        prompts = _column(records, cfg.prompt_field)
        texts, ids, counts = encode_prompts(prompts, tokenizer, cfg)
        self.items: list[tuple[str, list[int]]] = [(t, i) for t, i in zip(texts, ids) if i is not None]
        fields = record_fields(records, cfg.prompt_field)
        self.fields: list[dict[str, Any]] = [f for f, i in zip(fields, ids) if i is not None]
        if not self.items:
            raise DataError(
                f"no prompts left: all {counts['total']} are longer than data.max_prompt_len={cfg.max_prompt_len}; "
                f"raise it or set data.overlong_prompt=truncate"
            )
        self.num_total = counts["total"]
        self.num_skipped = counts["skipped"]
        self.num_truncated = counts["truncated"]
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def epoch(self) -> int:
        return self._epoch

    def stats(self) -> dict[str, int]:
        """Counters for the metrics log: the epoch the stream is in, prompts kept, skipped, truncated."""
        return {
            "data/epoch": self._epoch,
            "data/prompts": len(self.items),
            "data/prompts_skipped": self.num_skipped,
            "data/prompts_truncated": self.num_truncated,
        }

    def next(self, n: int) -> list[tuple[str, list[int]]]:
        """The next `n` prompts as (text, token ids), crossing into the next (reshuffled) epoch as needed."""
        return [self.items[i] for i in self._next_indices(n)]

    def next_records(self, n: int) -> list[tuple[str, list[int], dict[str, Any]]]:
        """As `next`, with each prompt's record fields (all but the prompt field) as a third element."""
        return [(*self.items[i], self.fields[i]) for i in self._next_indices(n)]

    def _next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self._position >= len(self.items):
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order(self._epoch)
            take = min(n - len(out), len(self.items) - self._position)
            out.extend(int(i) for i in self._order[self._position : self._position + take])
            self._position += take
        return out

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self._epoch,
            "position": self._position,
            "num_prompts": len(self.items),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_prompts"] != len(self.items):
            raise DataError(
                f"cannot resume the prompt stream: the checkpoint saw {state['num_prompts']} prompts, the data "
                f"now has {len(self.items)}; resume with the same data and data.max_prompt_len"
            )
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self._epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))


def record_fields(records: Any, prompt_field: str) -> list[dict[str, Any]]:
    """Each record's fields other than `prompt_field`, as a dict per record (from a `datasets.Dataset`
    or a sequence of mappings): what the reward receives beside the prompt (`rlhf_ray.rewards`)."""
    names = getattr(records, "column_names", None)
    if names is not None:
        columns = {name: list(records[name]) for name in names if name != prompt_field}
        return [{name: values[i] for name, values in columns.items()} for i in range(len(records))]
    return [{k: v for k, v in row.items() if k != prompt_field} for row in records]


def _column(records: Any, field: str) -> list[Any]:
    """One field of every record, from a `datasets.Dataset` or a sequence of mappings."""
    names = getattr(records, "column_names", None)
    if names is not None:
        if field not in names:
            raise DataError(
                f"records have no field {field!r} (available fields: {', '.join(map(repr, names))})"
            )
        return list(records[field])
    out = []
    for i, row in enumerate(records):
        if field not in row:
            raise DataError(
                f"record {i} has no field {field!r} (available fields: {', '.join(map(repr, row))})"
            )
        out.append(row[field])
    return out
