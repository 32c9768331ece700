"""Evaluation estimators over n samples per prompt: unbiased pass@k (Chen et al. 2021, Codex) and mean@k.
`[P, n]` tensors: row p holds the n samples drawn for prompt p."""

from __future__ import annotations

import torch
from torch import Tensor


def _check(x: Tensor, k: int, name: str) -> int:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected [prompts, samples], got shape {tuple(x.shape)}")
    n = x.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"{name}: k={k} must be in [1, n={n}] (draw at least k samples per prompt)")
    return n


def pass_at_k(correct: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per prompt `[P]`, float64: the chance that k of the n samples, drawn without
    replacement, hold at least one correct one: 1 - C(n - c, k) / C(n, k), c = the number correct.
    Computed as 1 - prod_{j<k} (n - c - j) / (n - j), a product of factors in [0, 1] (no binomials that
    overflow); a factor is 0 when n - c < k, so such a prompt gets exactly 1. `correct`: bool or 0/1."""
    n = _check(correct, k, "pass_at_k")
    c = (correct != 0).sum(dim=1, dtype=torch.float64)
    j = torch.arange(k, dtype=torch.float64, device=correct.device)
    fail = ((n - c[:, None] - j).clamp_min(0.0) / (n - j)).prod(dim=1)
    return 1.0 - fail


def mean_at_k(scores: Tensor, k: int) -> Tensor:
    """mean@k per prompt `[P]`, float64: the expected mean score of k samples. Every sample is equally
    likely to be among the k, so the mean over all n >= k samples estimates it without bias (with less
    variance than the first k alone)."""
    _check(scores, k, "mean_at_k")
    return scores.to(torch.float64).mean(dim=1)
