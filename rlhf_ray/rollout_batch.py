"""Turning generated token lists into a `Batch` and back, independent of the engine that generated them.

Layout (see `rlhf_ray.batch`): each row is prompt then response, left-aligned and right-padded to the
longest row; `response_mask` is 1 on every generated token, the EOS included when the engine stopped on
it; `rollout_logprobs[b, t]` is the sampler's log-prob of token t, so it sits on response positions and is
0 elsewhere (position 0 included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlhf_ray.batch import Batch


def build_rollout_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    response_logprobs: Sequence[Sequence[float]] | None,
    pad_token_id: int,
    meta: dict[str, list[Any]] | None = None,
) -> Batch:
    """A right-padded `Batch` with input_ids, attention_mask, response_mask and (when the sampler's
    log-probs are given, one per response token) rollout_logprobs."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"build_rollout_batch: {len(prompt_ids)} prompts but {len(response_ids)} responses")
    if response_logprobs is not None and len(response_logprobs) != len(response_ids):
        raise ValueError(
            f"build_rollout_batch: {len(response_logprobs)} log-prob lists for {len(response_ids)} responses"
        )
    rows = len(prompt_ids)
    width = max((len(p) + len(r) for p, r in zip(prompt_ids, response_ids)), default=0)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    response_mask = torch.zeros((rows, width), dtype=torch.float32)
    logprobs = torch.zeros((rows, width), dtype=torch.float32)
    for b, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if not prompt:
            raise ValueError(f"build_rollout_batch: prompt {b} is empty; every sequence needs a prompt token")
        p, r = len(prompt), len(response)
        input_ids[b, :p] = torch.as_tensor(list(prompt), dtype=torch.long)
        input_ids[b, p : p + r] = torch.as_tensor(list(response), dtype=torch.long)
        attention_mask[b, : p + r] = 1
        response_mask[b, p : p + r] = 1.0
        if response_logprobs is not None:
            lp = response_logprobs[b]
            if len(lp) != r:
                raise ValueError(f"build_rollout_batch: response {b} has {r} tokens but {len(lp)} log-probs")
            logprobs[b, p : p + r] = torch.as_tensor(list(lp), dtype=torch.float32)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
    if response_logprobs is not None:
        tensors["rollout_logprobs"] = logprobs
    return Batch(tensors, dict(meta or {}))


def split_sequences(batch: Batch) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each row: the inverse of `build_rollout_batch`."""
    out = []
    for ids, attn, resp in zip(batch["input_ids"], batch["attention_mask"], batch["response_mask"]):
        length = int(attn.sum())
        positions = resp[:length].nonzero().flatten()
        start = int(positions[0]) if len(positions) else length
        row = ids[:length].tolist()
        out.append((row[:start], row[start:]))
    return out


def scatter_response_values(
    values: Sequence[Sequence[float]], starts: Sequence[int], shape: tuple[int, int]
) -> Tensor:
    """A `[B, T]` float32 tensor with `values[b]` written from position `starts[b]` on, 0 elsewhere."""
    out = torch.zeros(shape, dtype=torch.float32)
    for b, (row, start) in enumerate(zip(values, starts)):
        if len(row):
            out[b, start : start + len(row)] = torch.as_tensor(list(row), dtype=torch.float32)
    return out
