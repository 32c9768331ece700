"""What weight sync sends (HF names, tied head dropped, the model's dtype bit-exactly, in buckets), the
bucket layout, the gloo broadcast side group between real processes (no Ray): round trips, one reused
receive buffer, mismatch detection; and both transports end to end from a 2-rank ZeRO-3 policy to a vLLM
engine, gathering one bucket at a time."""

import multiprocessing as mp
import socket

import pytest
import torch
import torch.distributed as dist

from rlhf_ray.weight_transport import (
    BroadcastReceiver,
    BroadcastSender,
    StoreBucket,
    WeightBuckets,
    WeightSyncError,
    bucket_layout,
    manifest_nbytes,
    named_weights,
    store_buckets,
    unpack_bucket,
    weight_manifest,
)


def load_causal_lm(*args, **kwargs):
    # imported lazily: the spawned receivers import this module, and transformers costs them seconds
    from rlhf_ray.models import load_causal_lm as load

    return load(*args, **kwargs)


def stored(model, bucket_bytes: int) -> list[StoreBucket]:
    """The object-store payload without Ray: each bucket copied out of the reused staging buffer (what
    `ray.put` does)."""
    return [StoreBucket(b.bucket, b.data.copy()) for b in store_buckets(WeightBuckets(model, bucket_bytes))]


def unpacked(buckets: list[StoreBucket]) -> dict[str, torch.Tensor]:
    return {name: t for b in buckets for name, t in unpack_bucket(b)}


def test_store_payload_drops_tied_head_and_copies(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, trainable=False)
    weights = unpacked(stored(model, 64 * 2**10))
    state = model.state_dict()
    assert model.config.tie_word_embeddings
    assert set(weights) == set(state) - {"lm_head.weight"}
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name]), name
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(weights["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    manifest = weight_manifest(model)
    assert [n for n, _, _ in manifest] == list(weights)
    assert all(tuple(weights[n].shape) == s and d == "float32" for n, s, d in manifest)
    assert [n for n, _ in named_weights(model)] == list(weights)


def test_store_payload_keeps_bf16_bits_in_buckets(tiny_model_dir):
    """bf16 travels as its own 2 bytes (numpy has no bf16: raw bytes, restored with a dtype view), bit-exactly,
    half the bytes of the fp32 model; one object per bucket of the layout."""
    bucket = 64 * 2**10
    bf16 = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16, trainable=False)
    fp32 = load_causal_lm(tiny_model_dir, trainable=False)
    manifest = weight_manifest(bf16)
    numel = sum(p.numel() for _, p in named_weights(bf16))
    assert numel == 855_424  # the tiny model without its tied head
    payload, payload32 = stored(bf16, bucket), stored(fp32, bucket)
    assert sum(b.data.nbytes for b in payload) == 2 * numel == manifest_nbytes(manifest) == 1_710_848
    assert sum(b.data.nbytes for b in payload32) == 4 * numel  # what bf16 cost before: upcast to fp32
    layout = bucket_layout(manifest, bucket)
    assert [b.bucket for b in payload] == layout
    # per layer [embed or the previous layer's 2 norms + q], [k, v] (64 KiB exactly), [o], [gate], [up],
    # [down] (96 KiB each: alone); then [the last 2 norms + the final norm]
    assert len(payload) == 4 * 6 + 1
    assert all(b.data.dtype.name == "uint8" for b in payload)
    assert all(b.data.nbytes <= bucket for b in payload if len(b.bucket.entries) > 1)
    got = unpacked(payload)
    for name, param in named_weights(bf16):
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name].view(torch.int16), param.detach().view(torch.int16)), name


def test_bucket_layout():
    manifest = [
        ("a", (2, 3), "float32"),  # 24 B
        ("b", (4,), "float32"),  # 16 B
        ("c", (10,), "float32"),  # 40 B: does not fit with a+b in 64 B
        ("d", (3,), "bfloat16"),  # dtype change: new bucket
        ("e", (100,), "bfloat16"),  # larger than a bucket: alone
    ]
    layout = bucket_layout(manifest, bucket_bytes=64)
    assert [(b.dtype, b.numel, b.entries) for b in layout] == [
        (torch.float32, 10, (("a", (2, 3), 0), ("b", (4,), 6))),
        (torch.float32, 10, (("c", (10,), 0),)),
        (torch.bfloat16, 3, (("d", (3,), 0),)),
        (torch.bfloat16, 100, (("e", (100,), 0),)),
    ]


def _tensors(scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(scale * 10))
    return {
        "w1": torch.randn(33, 7, generator=gen) * scale,
        "w2": (torch.randn(130, generator=gen) * scale).to(torch.bfloat16),
        "w3": torch.randn(5, 5, generator=gen) * scale,
    }


def _manifest(tensors):
    return [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()]


def _receiver(addr, port, rank, world, queue, corrupt_round_2):
    try:
        recv = BroadcastReceiver(addr, port, rank, world, timeout_s=60, bucket_bytes=256)
        recv.connect()
        manifest = _manifest(_tensors(1.0))
        buffers = set()
        for round_ in range(4):  # 0, 1: good; 2: rank 2 expects a tensor less; 3: the sender's buckets differ
            expected = manifest[:-1] if round_ == 2 and corrupt_round_2 else manifest
            try:
                got = {}
                for name, t in recv.receive(expected):
                    buffers.add(t.untyped_storage().data_ptr())
                    got[name] = t.clone()
                queue.put((rank, round_, got, len(buffers)))
            except WeightSyncError as exc:
                queue.put((rank, round_, str(exc), len(buffers)))
        queue.put((rank, "default", dist.is_initialized(), 0))
        recv.close()
    except Exception as exc:  # pragma: no cover - surfaced by the parent
        queue.put((rank, "crash", repr(exc), 0))


@pytest.mark.slow  # spawns two torch processes (10-20 s on 2 busy cores)
def test_broadcast_round_trip_between_processes():
    ctx = mp.get_context("spawn")
    sender = BroadcastSender(bucket_bytes=256)
    addr, port = sender.open(3, timeout_s=60)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(addr, port, r, 3, queue, r == 2)) for r in (1, 2)]
    for p in procs:
        p.start()
    # the same tensors are sent twice, changed in place in between (as an optimizer step changes the
    # parameters): the second round must carry the new values, not the first round's again
    weights = _tensors(1.0)
    expected = []
    try:
        sender.connect()
        for round_ in range(2):
            if round_:
                with torch.no_grad():
                    for t in weights.values():
                        t.add_(1.0)
            expected.append({n: t.clone() for n, t in weights.items()})
            sent = sender.send(weights)
            assert sent == 33 * 7 * 4 + 130 * 2 + 25 * 4
        with pytest.raises(WeightSyncError, match="a receiver's manifest or bucket size differs"):
            sender.send(_tensors(3.0))
        with pytest.raises(WeightSyncError, match="a receiver's manifest or bucket size differs"):
            sender.send(WeightBuckets(weights, bucket_bytes=128))  # receivers cut with 256
        results = [queue.get(timeout=60) for _ in range(10)]
    finally:
        for p in procs:
            p.join(timeout=30)
        sender.close()
    by_key = {(r, k): (v, n) for r, k, v, n in results}
    assert not [v for (r, k), (v, _) in by_key.items() if k == "crash"], by_key
    for name in weights:  # every element changed between the rounds
        assert not (expected[0][name] == expected[1][name]).any(), name
    for rank in (1, 2):
        for round_ in range(2):
            got, n_buffers = by_key[(rank, round_)]
            want = expected[round_]
            assert set(got) == set(want)
            for name in want:
                assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name])
            # three buckets (w1, w2 bf16, w3) all land in one buffer, reused in round 2: the receiver
            # never holds more than one bucket
            assert n_buffers == 1
        assert by_key[(rank, "default")][0] is False
    # a mismatch anywhere fails every rank, before any payload moves, and each says who disagreed
    assert "another receiver's manifest or bucket size differs" in by_key[(1, 2)][0]
    assert "2 tensors expected here" in by_key[(2, 2)][0] and "rank 0 sends 3" in by_key[(2, 2)][0]
    for rank in (1, 2):
        assert "buckets of 256 bytes expected here, rank 0 sends buckets of 128" in by_key[(rank, 3)][0]
    assert not dist.is_initialized()


def test_receiver_without_sender_fails_clearly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightSyncError, match=rf"cannot reach the sender's store at 127.0.0.1:{port}"):
        BroadcastReceiver("127.0.0.1", port, 1, 2, timeout_s=1).connect()
    with pytest.raises(WeightSyncError, match="rank=0 must be in 1..1"):
        BroadcastReceiver("127.0.0.1", port, 0, 2)
    with pytest.raises(WeightSyncError, match="call open"):
        BroadcastSender().connect()
