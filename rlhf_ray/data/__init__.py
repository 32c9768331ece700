"""Data for every stage: loading local datasets, prompt formatting and tokenisation, SFT and preference
batches, and the embedded synthetic task (`rlhf_ray.data.synthetic`).

Names are imported on first use, so `rlhf_ray.data.synthetic:gold_reward` (a rule reward function) loads
with numpy alone, without torch, transformers or datasets."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataError": "loading",
    "load_records": "loading",
    "write_jsonl": "loading",
    "PromptSource": "prompts",
    "encode_prompts": "prompts",
    "format_prompt": "prompts",
    "encode_sft": "sft",
    "encode_preferences": "preferences",
}

__all__ = [
    "DataError",
    "PromptSource",
    "encode_preferences",
    "encode_prompts",
    "encode_sft",
    "format_prompt",
    "load_records",
    "write_jsonl",
]

if TYPE_CHECKING:
    from rlhf_ray.data.loading import DataError, load_records, write_jsonl
    from rlhf_ray.data.preferences import encode_preferences
    from rlhf_ray.data.prompts import PromptSource, encode_prompts, format_prompt
    from rlhf_ray.data.sft import encode_sft


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rlhf_ray.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rlhf_ray.data' has no attribute {name!r}")
