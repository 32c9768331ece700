"""DAPO's reward shaping and sample selection (Yu et al. 2025): the soft overlong penalty and the pure part
of dynamic sampling. Sequence-level, `[N]` tensors; a prompt's `group_size` samples are consecutive."""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, to add to the scores: 0 for a response of up to max_len - buffer
    tokens, then falling linearly to -penalty at max_len (and -penalty beyond):
    -penalty * clamp((length - (max_len - buffer)) / buffer, 0, 1). `buffer=0` turns it off (all 0).
    `[N]` lengths (response tokens) -> `[N]`, floating (the default dtype for integer lengths)."""
    if not 0 <= buffer <= max_len:
        raise ValueError(
            f"overlong buffer={buffer} must be in [0, max_len={max_len}] (see algorithm.overlong_buffer and "
            f"rollout.max_new_tokens)"
        )
    x = lengths if lengths.is_floating_point() else lengths.to(torch.get_default_dtype())
    if buffer == 0:
        return torch.zeros_like(x)
    return -penalty * ((x - (max_len - buffer)) / buffer).clamp(0.0, 1.0)


def informative_groups(scores: Tensor, group_size: int) -> tuple[Tensor, int]:
    """The pure part of DAPO's dynamic sampling: the groups whose scores are not all equal (a group of equal
    scores has zero group-relative advantage, so it adds no gradient). Returns (the indices of the kept
    samples, ascending, `[K * group_size]` long; the number of groups dropped)."""
    if scores.dim() != 1 or group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} cannot be split into groups of {group_size} consecutive "
            f"samples: pass a 1-d tensor whose length is a multiple of samples_per_prompt"
        )
    groups = scores.view(-1, group_size)
    keep = groups.amax(dim=1) != groups.amin(dim=1)
    rows = torch.arange(scores.numel(), device=scores.device).view(-1, group_size)
    return rows[keep].reshape(-1), int((~keep).sum())
