"""Supervised fine-tuning data: (prompt, response) records -> a right-padded `Batch`.

Each sequence is the prompt's tokens (formatted, length-checked and, if asked, truncated as in
`rlhf_ray.data.prompts`) followed by the response's tokens and EOS; `response_mask` is 1 on the response
and its EOS, the tokens the SFT loss trains on. A response longer than `data.max_response_len` tokens
(EOS included) keeps its first `max_response_len` tokens, and then has no EOS: the model is not taught to
stop where the text was cut.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlhf_ray.batch import Batch
from rlhf_ray.config import DataConfig
from rlhf_ray.data.loading import DataError
from rlhf_ray.data.prompts import _column, encode_prompts

logger = logging.getLogger(__name__)


def encode_sft(records: Any, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Batch:
    """A `Batch` with input_ids, attention_mask [B, T] long and response_mask [B, T] float, meta prompt and
    response (text). Records whose prompt is skipped for its length are left out (a warning counts them)."""
    prompts = _column(records, cfg.prompt_field)
    responses = _column(records, cfg.response_field)
    texts, prompt_ids, _ = encode_prompts(prompts, tokenizer, cfg, what="SFT prompt")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise DataError(
                f"SFT record {i}: field {cfg.response_field!r} must be a non-empty string, got {r!r}"
            )
    response_ids = encode_responses(responses, tokenizer, cfg)
    keep = [i for i, p in enumerate(prompt_ids) if p is not None]
    if not keep:
        raise DataError(
            f"no SFT records left: every prompt is longer than data.max_prompt_len={cfg.max_prompt_len}"
        )
    batch = pack([prompt_ids[i] for i in keep], [response_ids[i] for i in keep], tokenizer)
    batch.meta = {"prompt": [texts[i] for i in keep], "response": [responses[i] for i in keep]}
    return batch


def encode_responses(
    responses: list[str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> list[list[int]]:
    """Tokens of each response followed by EOS, cut to `cfg.max_response_len` (see the module docstring)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, so responses cannot be terminated; give it one")
    encoded = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    out = [[*ids, eos][: cfg.max_response_len] for ids in encoded]
    cut = sum(len(ids) + 1 > cfg.max_response_len for ids in encoded)
    if cut:
        logger.warning(
            "%d of %d responses longer than data.max_response_len=%d were truncated",
            cut,
            len(out),
            cfg.max_response_len,
        )
    return out


def pack(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    width: int | None = None,
) -> Batch:
    """Prompt + response sequences, left-aligned and right-padded (with the pad token) to `width` or the
    longest: input_ids, attention_mask (long) and response_mask (float)."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = width or max((len(s) for s in seqs), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for b, (p, s) in enumerate(zip(prompt_ids, seqs)):
        input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, : len(s)] = 1
        response_mask[b, len(p) : len(s)] = 1.0
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask})
