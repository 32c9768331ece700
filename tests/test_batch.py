"""Batch: split/concat/select keep samples aligned; pickling goes through numpy and back exactly."""

from __future__ import annotations

import pickle

import pytest
import torch

from rlhf_ray.batch import Batch, rank_shards


def make(n: int, t: int, offset: int = 0) -> Batch:
    ids = torch.arange(offset, offset + n * t).view(n, t)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[:, t - 1] = 0  # last column is padding everywhere
    return Batch(
        {"input_ids": ids, "attention_mask": mask, "scores": torch.arange(n, dtype=torch.float32) + offset},
        {"prompt": [f"p{offset + i}" for i in range(n)]},
    )


def test_len_and_mismatch():
    assert len(make(3, 4)) == 3
    with pytest.raises(ValueError, match="disagree"):
        Batch({"a": torch.zeros(2, 3)}, {"prompt": ["x"]})


def test_split_is_contiguous_and_covers_everything():
    b = make(7, 4)
    parts = b.split(3)
    assert [len(p) for p in parts] == [2, 3, 2]
    assert torch.equal(Batch.concat(parts)["input_ids"], b["input_ids"])
    assert Batch.concat(parts).meta["prompt"] == b.meta["prompt"]


def test_concat_pads_per_token_fields_on_the_right():
    a, b = make(2, 3), make(1, 5, offset=100)
    c = Batch.concat([a, b])
    assert c["input_ids"].shape == (3, 5)
    assert torch.equal(c["input_ids"][0], torch.tensor([0, 1, 2, 0, 0]))
    assert torch.equal(c["attention_mask"][1], torch.tensor([1, 1, 0, 0, 0]))
    assert c["scores"].tolist() == [0.0, 1.0, 100.0]


def test_select_chunks_and_trim():
    b = make(5, 4)
    sel = b.select([4, 0])
    assert sel.meta["prompt"] == ["p4", "p0"]
    assert sel["scores"].tolist() == [4.0, 0.0]
    assert [len(c) for c in b.chunks(2)] == [2, 2, 1]
    trimmed = b.trim()
    assert trimmed["input_ids"].shape == (5, 3)
    assert trimmed["scores"].shape == (5,)


def test_pickle_round_trip_keeps_dtypes_and_values():
    b = make(3, 4)
    b["logprobs"] = torch.randn(3, 4, dtype=torch.float32)
    b["half"] = torch.randn(3, 4).to(torch.bfloat16)
    out = pickle.loads(pickle.dumps(b))
    for k in b.tensors:
        assert out[k].dtype == b[k].dtype, k
        assert torch.equal(out[k], b[k]), k
    assert out.meta == b.meta
    out["logprobs"].add_(1.0)  # writable after transport


def test_rank_shards_carry_what_keeps_the_ranks_in_step():
    b = Batch({"input_ids": torch.arange(10).view(5, 2)}, {"mark": ["x"] * 5})
    shards = rank_shards(b, 2)
    assert [len(s.batch) for s in shards] == [2, 3]  # Batch.split: contiguous, in rank order
    assert [s.max_rows for s in shards] == [3, 3] and [s.total_rows for s in shards] == [5, 5]
    assert torch.equal(shards[1].batch["input_ids"], b["input_ids"][2:])
    assert shards[0].stand_in.meta == {"mark": ["x"]} and len(shards[0].stand_in) == 1
    empty = rank_shards(b.select([0]), 3)
    assert [len(s.batch) for s in empty] == [0, 1, 0] and all(s.max_rows == 1 for s in empty)
