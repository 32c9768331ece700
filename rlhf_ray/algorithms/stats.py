"""Masked statistics over right-padded `[B, T]` batches, and log-probabilities from logits.

`mask` is 1 on the positions that count (response tokens) and 0 elsewhere, float or bool; a float mask
may also carry weights. Positions where the mask is 0 never leak into a result, even when `x` holds inf
or NaN there. With no position selected (an all-zero mask) a statistic is 0, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of logits (rows x vocabulary) handled at once by the chunked log-prob/entropy code: bounds
# the fp32 temporaries to ~64 MiB whatever the batch size.
_CHUNK_ELEMENTS = 1 << 24


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x * mask` over `dim` (all elements when None); masked-out positions contribute exactly 0."""
    m = mask.to(x.dtype)
    xm = torch.where(mask != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all elements when None); 0 where the mask selects nothing."""
    total = masked_sum(x, mask, dim)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased (Bessel-corrected, n - 1) variance of the selected elements; 0 when fewer than 2 are selected."""
    mean = masked_mean(x, mask)
    count = mask.to(x.dtype).sum()
    sq = masked_sum((x - mean) ** 2, mask)
    return torch.where(count > 1, sq / (count - 1).clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) * rsqrt(var + 1e-8) with mean and (unbiased) variance over the selected elements; with
    `shift_mean=False` the mean is added back (only the scale changes). Every position is transformed, the
    masked-out ones included (multiply by the mask to zero them). An all-zero mask gives all zeros."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    if not bool((mask != 0).any()):
        return torch.zeros_like(whitened)
    return whitened


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[..., label]: `logits [..., V]`, `labels [...]` (long) -> `[...]`.

    Computed as logit[label] - logsumexp(logits) over chunks of rows, so no full-vocabulary log_softmax
    copy is ever materialised (bf16/fp16 logits are upcast to fp32 one chunk at a time; the temporaries
    are bounded by `_CHUNK_ELEMENTS`). Exact to fp32: the same arithmetic as `log_softmax(...).gather(...)`
    (they agree to ~1 ulp). The result is fp32 (fp64 for fp64 logits).
    Differentiable with respect to `logits`."""
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1, 1).long()
    step = _rows_per_chunk(vocab)
    parts = []
    for start in range(0, flat_logits.shape[0], step):
        chunk = flat_logits[start : start + step].to(out_dtype)
        # log_softmax's own arithmetic: (z_label - max) - log(sum(exp(z - max)))
        peak = chunk.detach().amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        picked = chunk.gather(-1, flat_labels[start : start + step]) - peak
        parts.append((picked - torch.exp(chunk - peak).sum(dim=-1, keepdim=True).log()).squeeze(-1))
    if not parts:
        return torch.zeros(labels.shape, dtype=out_dtype, device=logits.device)
    return torch.cat(parts).view(labels.shape)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: `[..., V]` -> `[...]`, as logsumexp(z) - sum(softmax(z) z),
    chunked over rows like `logprobs_from_logits`. fp32 (fp64 for fp64 logits); differentiable."""
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    step = _rows_per_chunk(vocab)
    parts = []
    for start in range(0, flat.shape[0], step):
        chunk = flat[start : start + step].to(out_dtype)
        probs = torch.softmax(chunk, dim=-1)
        # p * z with p = 0 (a logit masked to -inf, e.g. by top-k) counts as 0, not NaN, gradient included
        finite = torch.where(probs > 0, chunk, torch.zeros((), dtype=out_dtype, device=chunk.device))
        parts.append(torch.logsumexp(chunk, dim=-1) - (probs * finite).sum(dim=-1))
    if not parts:
        return torch.zeros(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    return torch.cat(parts).view(logits.shape[:-1])
