"""`Batch`: the unit that crosses the Ray object store between roles.

A batch is a set of named per-sample tensors that share the leading dimension B (per-token ones are
`[B, T]`, right-padded), plus per-sample metadata lists (prompt text, group index, ...). Conventions:
- `input_ids[b]` is prompt then response, left-aligned and right-padded; `attention_mask` is 1 on real
  tokens; `response_mask` (the `mask` of `rlhf_ray.algorithms`) is 1 on response tokens only;
- per-token statistics (`logprobs`, `ref_logprobs`, `values`, `advantages`, ...) are aligned with
  `input_ids`: position t scores token t given tokens < t (position 0 holds 0).

Batches pickle their tensors as numpy arrays, which Ray's object store moves without copying.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class Batch:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {k: len(v) for k, v in self.tensors.items()} | {k: len(v) for k, v in self.meta.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch fields disagree on the number of samples: {sizes}")

    # ---- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        for v in self.tensors.values():
            return len(v)
        for v in self.meta.values():
            return len(v)
        return 0

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: Tensor) -> None:
        if self.tensors and len(value) != len(self):
            raise ValueError(f"field {name!r} has {len(value)} samples, the batch has {len(self)}")
        self.tensors[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.meta

    @property
    def seq_len(self) -> int:
        return self.tensors["input_ids"].shape[1]

    def num_tokens(self, name: str = "attention_mask") -> int:
        return int(self.tensors[name].sum())

    # ---- reshaping ----------------------------------------------------------------------------
    def select(self, index: Sequence[int] | Tensor | slice) -> Batch:
        if isinstance(index, slice):
            idx = list(range(len(self)))[index]
        elif isinstance(index, Tensor):
            idx = index.tolist()
        else:
            idx = list(index)
        t_idx = torch.as_tensor(idx, dtype=torch.long)
        return Batch(
            {k: v.index_select(0, t_idx) for k, v in self.tensors.items()},
            {k: [v[i] for i in idx] for k, v in self.meta.items()},
        )

    def split(self, n: int) -> list[Batch]:
        """`n` contiguous shards of (nearly) equal size, in order; used to give each rank its part."""
        bounds = np.linspace(0, len(self), n + 1).round().astype(int)
        return [self.select(slice(a, b)) for a, b in itertools.pairwise(bounds)]

    def chunks(self, size: int) -> Iterator[Batch]:
        for start in range(0, len(self), size):
            yield self.select(slice(start, start + size))

    def trim(self) -> Batch:
        """Drop trailing columns that are padding in every row (after selecting a mini-batch)."""
        if "attention_mask" not in self.tensors or len(self) == 0:
            return self
        used = int(self.tensors["attention_mask"].sum(0).nonzero().max()) + 1
        per_token = {k for k, v in self.tensors.items() if v.dim() >= 2 and v.shape[1] == self.seq_len}
        return Batch(
            {k: (v[:, :used] if k in per_token else v) for k, v in self.tensors.items()}, dict(self.meta)
        )

    @staticmethod
    def concat(batches: Iterable[Batch]) -> Batch:
        """Concatenate along samples, right-padding per-token fields to the longest sequence."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return Batch()
        keys = batches[0].tensors.keys()
        out: dict[str, Tensor] = {}
        for k in keys:
            parts = [b.tensors[k] for b in batches]
            if parts[0].dim() >= 2:
                width = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
            out[k] = torch.cat(parts)
        meta = {k: [x for b in batches for x in b.meta[k]] for k in batches[0].meta}
        return Batch(out, meta)

    def union(self, other: Batch) -> Batch:
        """Fields of both batches (same samples, same order); `other` wins on a name clash."""
        return Batch(self.tensors | other.tensors, self.meta | other.meta)

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, self.meta)

    # ---- transport ----------------------------------------------------------------------------
    def __reduce__(self):
        arrays = {
            k: v.detach().cpu().numpy() if v.dtype != torch.bfloat16 else v.float().numpy()
            for k, v in self.tensors.items()
        }
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in self.tensors.items()}
        return (_rebuild_batch, (arrays, dtypes, self.meta))


REBUILDS = {"count": 0}  # batches deserialised in this process (tests check the driver never does it)


@dataclass
class RankShard:
    """One trainer rank's rows of a batch, cut before the batch travels so that each rank receives only
    its own (`rank_shards`). `max_rows`: the largest shard of any rank (it fixes the passes every rank
    makes in step); `total_rows`: the whole batch's; `stand_in`: the batch's first row, for the zero-weight
    passes of a rank with nothing left (it carries the batch's width and meta marks too)."""

    batch: Batch
    max_rows: int
    total_rows: int
    stand_in: Batch


def rank_shards(batch: Batch, world: int) -> list[RankShard]:
    """`batch` as `world` contiguous `RankShard`s in rank order (`Batch.split`)."""
    shards = batch.split(world)
    stand_in = batch.select([0]) if len(batch) else Batch()
    top = max(len(s) for s in shards)
    return [RankShard(s, top, len(batch), stand_in) for s in shards]


def _rebuild_batch(
    arrays: dict[str, np.ndarray], dtypes: dict[str, str], meta: dict[str, list[Any]]
) -> Batch:
    # Arrays out of the object store are read-only views; copy so that roles may modify their batch.
    REBUILDS["count"] += 1
    tensors = {
        k: torch.from_numpy(np.array(a, copy=True)).to(getattr(torch, dtypes[k])) for k, a in arrays.items()
    }
    return Batch(tensors, meta)
