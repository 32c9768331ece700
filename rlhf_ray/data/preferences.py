"""Preference data: (prompt, chosen, rejected) records -> a `Batch` for reward-model and DPO training.

The chosen and rejected sequences of a record share its prompt tokens and are built exactly like SFT
sequences (`rlhf_ray.data.sft`): prompt, response, EOS, right-padded. Both sides are padded to one width,
so `torch.cat([chosen_input_ids, rejected_input_ids])` runs both through the model in one forward.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf_ray.batch import Batch
from rlhf_ray.config import DataConfig
from rlhf_ray.data.loading import DataError
from rlhf_ray.data.prompts import _column, encode_prompts
from rlhf_ray.data.sft import encode_responses, pack


def encode_preferences(records: Any, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Batch:
    """A `Batch` with chosen_input_ids, chosen_attention_mask, chosen_response_mask and the same three
    rejected_* fields ([B, T], one T for both), meta prompt, chosen, rejected (text). Records whose prompt
    is skipped for its length are left out. An empty response is allowed (it is just EOS)."""
    prompts = _column(records, cfg.prompt_field)
    sides = {"chosen": _column(records, cfg.chosen_field), "rejected": _column(records, cfg.rejected_field)}
    for side, field in (("chosen", cfg.chosen_field), ("rejected", cfg.rejected_field)):
        for i, r in enumerate(sides[side]):
            if not isinstance(r, str):
                raise DataError(
                    f"preference record {i}: field {field!r} must be a string, got {type(r).__name__}"
                )
    texts, prompt_ids, _ = encode_prompts(prompts, tokenizer, cfg, what="preference prompt")
    keep = [i for i, p in enumerate(prompt_ids) if p is not None]
    if not keep:
        raise DataError(
            f"no preference records left: every prompt is longer than data.max_prompt_len={cfg.max_prompt_len}"
        )
    kept_prompts = [prompt_ids[i] for i in keep]
    encoded = {side: encode_responses([v[i] for i in keep], tokenizer, cfg) for side, v in sides.items()}
    width = max(len(p) + len(r) for side in encoded.values() for p, r in zip(kept_prompts, side))
    tensors = {}
    for side, responses in encoded.items():
        packed = pack(kept_prompts, responses, tokenizer, width=width)
        tensors.update({f"{side}_{k}": v for k, v in packed.tensors.items()})
    meta = {"prompt": [texts[i] for i in keep]} | {side: [v[i] for i in keep] for side, v in sides.items()}
    return Batch(tensors, meta)
