"""The two ends of the weight transports (policy rank 0 sends, the rollout engines receive): the payload
(HF-named parameters, in buckets) and the broadcast group. The driver side, which picks a transport and
runs a sync between the roles, is `rlhf_ray.trainer.weight_sync`.

Both transports carry the same payload, the HF-named parameters of the policy in the model's own dtype
(bf16 stays bf16: 2 bytes a parameter), cut into buckets of at most `rollout.weight_bucket_mb`
(`bucket_layout`: consecutive tensors of one dtype; a larger tensor gets a bucket of its own):
- **object store** (portable: host memory, any node): trainer rank 0 puts one object per bucket
  (`put_weights`, a `StoreBucket`: the bucket's raw bytes as a numpy uint8 array, which crosses Ray
  zero-copy, plus its layout) and hands the list of refs on; each engine `ray.get`s and loads them bucket by
  bucket (`unpack_bucket`);
- **broadcast group**: a torch.distributed side group (gloo on CPU, NCCL on GPU) from trainer rank 0
  (rank 0 of the group) to the rollout engines (ranks 1..N). It is built on its own `TCPStore` and never
  touches either process's default process group (the trainer ranks already have one).

Under ZeRO-3 the sender never holds the whole model: `WeightBuckets` gathers one bucket's parameters at a
time (`deepspeed.zero.GatheredParameters` over that bucket only, a collective every trainer rank enters in
the same order), the bucket is sent (or put), and it is partitioned again before the next is gathered. This
is how OpenRLHF's `broadcast_to_vllm` gathers (one parameter at a time); buckets make fewer, larger calls.

The broadcast is two-phase and both ends must take part concurrently; the driver does
```python
addr, port = ray.get(trainer.open_broadcast.remote(world_size=1 + n_engines))   # BroadcastSender.open
ray.get([trainer.connect.remote()] + [e.open_broadcast.remote(addr, port, i + 1, ...) for ...])
ray.get([trainer.send.remote()] + [e.receive_broadcast.remote() for e in engines])
```
Both sides agree on the order, names, shapes and dtypes of the tensors through the manifest
(`weight_manifest`) and on the bucket size: the sender checks, before the payload, that every receiver
expects exactly what it is about to send, so a mismatch fails with a clear error instead of corrupting
weights or hanging. Buckets travel as raw bytes, in the layout both ends compute from the manifest.

Names are Hugging Face parameter names (what `save_pretrained` writes and what vLLM's loaders expect);
a tied `lm_head.weight` is dropped (it is the input embedding; the engine re-ties it after loading).
Parameters only: Llama-style models have no persistent buffers that an engine needs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import socket
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_ray.runtime import device as runtime_device
from rlhf_ray.runtime import dist_backend

if TYPE_CHECKING:
    import ray

ManifestEntry = tuple[str, tuple[int, ...], str]  # (HF name, shape, dtype name such as 'float32')
# what can be sent: a model (ZeRO-3 partitioned or not), or (name, tensor) pairs / a dict of them
WeightSource = torch.nn.Module | dict[str, Tensor] | Iterable[tuple[str, Tensor]]

DEFAULT_BUCKET_BYTES = 64 * 2**20
TIED_HEAD = "lm_head.weight"


class WeightSyncError(RuntimeError):
    """The two ends of a weight sync disagree, or the side group could not be built."""


# ---- what is sent -----------------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DeepSpeed engine (or DDP) wrapper; the model itself otherwise."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _ties_head(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    return bool(
        getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    )


def named_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(HF name, parameter) pairs in a fixed order; a tied `lm_head.weight` is left out.

    Under ZeRO-3 the parameters are partitioned placeholders: iterate `WeightBuckets(model)` instead, which
    gathers them one bucket at a time."""
    model = unwrap(model)
    tied = _ties_head(model)
    for name, param in model.named_parameters():  # de-duplicates shared parameters by default
        if tied and name == TIED_HEAD:
            continue
        yield name, param


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _full_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(t, "ds_shape", t.shape))  # ZeRO-3: the unpartitioned shape


def weight_manifest(model: torch.nn.Module) -> list[ManifestEntry]:
    """`[(name, shape, dtype)]` of what `named_weights` yields, in that order. Works on ZeRO-3 partitioned
    models without gathering (the full shape is read from `ds_shape`)."""
    return [(name, _full_shape(p), _dtype_name(p.dtype)) for name, p in named_weights(model)]


def manifest_nbytes(manifest: Iterable[ManifestEntry]) -> int:
    """Bytes of the tensors a manifest describes, in their own dtypes (what one sync moves)."""
    return sum(_numel(shape) * getattr(torch, dtype).itemsize for _, shape, dtype in manifest)


def manifest_digest(manifest: Iterable[ManifestEntry]) -> int:
    """A 62-bit fingerprint of a manifest (names, shapes, dtypes, order), checked by both ends."""
    text = json.dumps([[n, list(s), d] for n, s, d in manifest])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


# ---- bucket layout ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    """Consecutive tensors of one dtype, sent as one flat buffer of `numel` elements."""

    dtype: torch.dtype
    numel: int
    entries: tuple[tuple[str, tuple[int, ...], int], ...]  # (name, shape, offset) within the flat buffer

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bucket_bytes(bucket_mb: float) -> int:
    """`rollout.weight_bucket_mb` in bytes: what sender and receivers both cut the weights with."""
    return max(1, int(bucket_mb * 2**20))


def bucket_layout(manifest: list[ManifestEntry], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Group consecutive tensors of one dtype into flat buckets of at most `bucket_bytes` (a tensor larger
    than that gets a bucket of its own). Both ends compute the same layout from the same manifest."""
    buckets: list[Bucket] = []
    cur: list[tuple[str, tuple[int, ...], int]] = []
    cur_dtype: torch.dtype | None = None
    cur_numel = 0
    for name, shape, dtype_name in manifest:
        dtype = getattr(torch, dtype_name)
        n = _numel(shape)
        cur_bytes = cur_numel * cur_dtype.itemsize if cur_dtype is not None else 0
        if cur and (dtype != cur_dtype or cur_bytes + n * dtype.itemsize > bucket_bytes):
            buckets.append(Bucket(cur_dtype, cur_numel, tuple(cur)))
            cur, cur_numel = [], 0
        cur_dtype = dtype
        cur.append((name, tuple(shape), cur_numel))
        cur_numel += n
    if cur:
        buckets.append(Bucket(cur_dtype, cur_numel, tuple(cur)))
    return buckets


# ---- the sender's side: whole parameters one bucket at a time ----------------------------------------
@dataclass
class GatherStats:
    """What one pass over `WeightBuckets` gathered (ZeRO-3; all zero otherwise). `peak_available_numel`
    is sampled inside every gather: the elements of ALL the model's parameters that were whole on this rank
    at that moment, persistent ones (ZeRO-3 never partitions those) left out; it shows nothing else stayed
    gathered besides the bucket."""

    buckets: int = 0
    gathers: int = 0  # GatheredParameters calls
    peak_gathered_numel: int = 0  # the most non-persistent elements one call gathered
    peak_available_numel: int = 0
    persistent_numel: int = 0  # elements every rank always holds whole (stage3_param_persistence_threshold)
    nbytes: int = 0  # bytes of the buckets passed over (what rank 0 sends)


class WeightBuckets:
    """The weights of `source` as (bucket, whole tensors of the bucket) pairs in `bucket_layout` order.
    One-shot: iterate it once (each trainer rank builds its own per sync).

    A ZeRO-3 partitioned model is gathered one bucket at a time: the tensors yielded are whole only until
    the next pair is asked for (the bucket is partitioned again then). Gathering is a collective: every
    trainer rank must pass over all the buckets, in step, also the ranks that send nothing (`drain`)."""

    def __init__(self, source: WeightSource, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if isinstance(source, torch.nn.Module):
            self._model: torch.nn.Module | None = unwrap(source)
            items = list(named_weights(self._model))
        else:
            self._model = None
            items = list(source.items() if isinstance(source, dict) else source)
        self.manifest: list[ManifestEntry] = [(n, _full_shape(t), _dtype_name(t.dtype)) for n, t in items]
        self.bucket_bytes = bucket_bytes
        self.layout = bucket_layout(self.manifest, bucket_bytes)
        self.stats = GatherStats(buckets=len(self.layout))
        self._tensors = dict(items)
        self._partitioned = any(hasattr(t, "ds_id") for t in self._tensors.values())
        self._iter = self._buckets()

    def __iter__(self) -> Iterator[tuple[Bucket, list[Tensor]]]:
        return self._iter

    def drain(self) -> None:
        """Take part in the gathers of the buckets not yet passed over (the ranks that send nothing, and a
        sender whose send failed: its peers would otherwise wait in the collective until they time out)."""
        for _ in self._iter:
            pass

    def _buckets(self) -> Iterator[tuple[Bucket, list[Tensor]]]:
        if not self._partitioned:
            for bucket in self.layout:
                self.stats.nbytes += bucket.nbytes
                yield bucket, [self._tensors[name] for name, _, _ in bucket.entries]
            return
        import deepspeed  # only trainer processes reach this branch
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        model = self._model
        everything = list(model.parameters()) if model is not None else list(self._tensors.values())
        persistent = [p for p in everything if getattr(p, "ds_persist", False)]
        self.stats.persistent_numel = sum(p.ds_numel for p in persistent)
        for bucket in self.layout:
            tensors = [self._tensors[name] for name, _, _ in bucket.entries]
            # persistent parameters too: they are partitioned between an optimiser step (or a gather's exit)
            # and the next forward; DeepSpeed skips the ones already whole
            with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
                self.stats.gathers += 1
                gathered = sum(t.ds_numel for t in tensors if not getattr(t, "ds_persist", False))
                self.stats.peak_gathered_numel = max(self.stats.peak_gathered_numel, gathered)
                available = sum(
                    p.ds_numel
                    for p in everything
                    if p.ds_status == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False)
                )
                self.stats.peak_available_numel = max(self.stats.peak_available_numel, available)
                self.stats.nbytes += bucket.nbytes
                yield bucket, tensors


def _pack(tensors: list[Tensor], out: Tensor) -> Tensor:
    """The tensors' elements one after the other in `out` (a flat buffer of their dtype); returns `out`."""
    offset = 0
    for t in tensors:
        n = t.numel()
        out[offset : offset + n].copy_(t.detach().reshape(-1))
        offset += n
    return out


# ---- object store -----------------------------------------------------------------------------------
@dataclass
class StoreBucket:
    """One bucket as it travels through the object store: its layout and its raw bytes (a numpy uint8
    array: numpy has no bfloat16, raw bytes carry every dtype bit-exactly and cross Ray zero-copy)."""

    bucket: Bucket
    data: np.ndarray = field(repr=False)


def store_buckets(weights: WeightBuckets) -> Iterator[StoreBucket]:
    """The buckets of `weights` as host bytes. Each one's `data` is a view of ONE reused staging buffer
    (one bucket of host memory, pinned when the weights are on a CUDA device so the device-to-host copies
    run at full speed; pinning needs CUDA): `ray.put` it (which copies) before taking the next."""
    staging: Tensor | None = None
    for bucket, tensors in weights:
        if staging is None or staging.numel() < bucket.nbytes:
            on_cuda = any(t.device.type == "cuda" for t in tensors)
            largest = max(b.nbytes for b in weights.layout)
            staging = torch.empty(largest, dtype=torch.uint8, pin_memory=on_cuda)
        raw = staging[: bucket.nbytes]
        _pack(tensors, raw.view(bucket.dtype))
        yield StoreBucket(bucket, raw.numpy())


def put_weights(
    source: WeightSource | WeightBuckets, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[ray.ObjectRef]:
    """Object-store payload: one `ray.put(StoreBucket)` per bucket, in layout order. Hand the list on
    without fetching it (Ray passes refs nested in a list through unresolved); the engines load it with
    `unpack_bucket`, bucket by bucket."""
    import ray

    weights = source if isinstance(source, WeightBuckets) else WeightBuckets(source, bucket_bytes)
    with torch.no_grad():
        return [ray.put(b) for b in store_buckets(weights)]


def unpack_bucket(stored: StoreBucket) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of one stored bucket: views of its bytes in the bucket's dtype (bf16 restored from its
    bits), shared with the object store and read-only: a loader copies them into its parameters."""
    with warnings.catch_warnings():  # arrays from the object store are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(stored.data).view(stored.bucket.dtype)
    for name, shape, offset in stored.bucket.entries:
        yield name, flat[offset : offset + _numel(shape)].view(shape)


def fetch_weights(refs: list[ray.ObjectRef], timeout: float | None = None) -> dict[str, Tensor]:
    """Every tensor of an object-store payload, copied into a dict (for tests and diagnostics: an engine
    loads the buckets one at a time instead)."""
    import ray

    out: dict[str, Tensor] = {}
    for ref in refs:
        out.update((name, t.clone()) for name, t in unpack_bucket(ray.get(ref, timeout=timeout)))
    return out


# ---- the side group ---------------------------------------------------------------------------------
def node_ip_address() -> str:
    """This node's address as Ray sees it (when Ray is up), else the address of the default route."""
    try:
        import ray  # lazily: this module does not otherwise need Ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover - Ray missing or not started
        pass
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def _side_group(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta):
    """A process group on its own store: not registered with torch.distributed's world, so neither
    process's default group is touched. Use `pg.broadcast(t, root).wait()`, not `dist.broadcast(group=pg)`."""
    if dist_backend() == "nccl":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise WeightSyncError(
                "a GPU is visible but this torch build has no NCCL: install a CUDA build of torch"
            )
        opts = nccl.Options()
        opts._timeout = timeout
        return nccl(store, rank, world_size, opts)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def _buffer_device() -> torch.device:
    return runtime_device() if dist_backend() == "nccl" else torch.device("cpu")


class _Endpoint:
    rank: int
    world_size: int
    timeout: datetime.timedelta
    store: dist.Store | None = None
    pg = None

    def _require_pg(self):
        if self.pg is None:
            raise WeightSyncError(
                f"{type(self).__name__}: call connect() (on every rank, concurrently) first"
            )
        return self.pg

    def _handshake(self, digest: int, count: int, bucket_bytes: int) -> None:
        """Rank 0 announces (digest, count, bucket bytes); every rank reports whether it agrees; all fail
        together, before any payload moves."""
        pg = self._require_pg()
        dev = _buffer_device()
        mine = [digest, count, bucket_bytes]
        header = torch.tensor(mine, dtype=torch.int64, device=dev)
        pg.broadcast(header, 0).wait()
        theirs = [int(v) for v in header.tolist()]
        agrees = theirs == mine
        ok = torch.tensor([int(agrees)], dtype=torch.int64, device=dev)
        pg.allreduce([ok], dist.ReduceOp.MIN).wait()
        if int(ok.item()) != 1:
            if self.rank == 0:
                where = "a receiver's manifest or bucket size differs from what is sent"
            elif agrees:
                where = "another receiver's manifest or bucket size differs from what is sent"
            elif theirs[2] != bucket_bytes:
                where = (
                    f"buckets of {bucket_bytes} bytes expected here, rank 0 sends buckets of {theirs[2]} "
                    "bytes: give both ends the same rollout.weight_bucket_mb"
                )
            else:
                where = (
                    f"{count} tensors expected here (digest {digest}), rank 0 sends {theirs[1]} "
                    f"(digest {theirs[0]})"
                )
            raise WeightSyncError(
                f"weight sync rank {self.rank}: sender and receivers disagree on the weights ({where}: names, "
                "shapes, dtypes, order or bucket size differ); nothing was sent. Build the receivers' "
                "manifest with weight_manifest() of the model the trainer sends, and send named_weights() "
                "in that order"
            )

    def close(self) -> None:
        """Drop the side group and the store (the group's sockets close when it is freed)."""
        pg, self.pg = self.pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            with contextlib.suppress(Exception):  # best effort at teardown
                pg.shutdown()
        self.store = None


class BroadcastSender(_Endpoint):
    """Rank 0 of the side group (trainer rank 0): `open` -> hand (addr, port) to the receivers -> `connect`
    (concurrently with theirs) -> `send` each sync (concurrently with their `receive`)."""

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.bucket_bytes = bucket_bytes
        self.rank = 0
        self._buffer: Tensor | None = None

    def open(self, world_size: int, timeout_s: float = 600.0) -> tuple[str, int]:
        """Start the group's `TCPStore` on a free port (returns at once); returns its (addr, port)."""
        if world_size < 2:
            raise WeightSyncError(
                f"broadcast world_size={world_size}: needs the sender plus at least 1 receiver"
            )
        self.world_size = world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        addr = node_ip_address()
        self.store = dist.TCPStore(addr, 0, world_size, True, timeout=self.timeout, wait_for_workers=False)
        return addr, int(self.store.port)

    def connect(self) -> None:
        """Join the side group; blocks until every receiver has connected (or the timeout)."""
        if self.store is None:
            raise WeightSyncError("BroadcastSender: call open() first")
        self.pg = _side_group(self.store, 0, self.world_size, self.timeout)

    def send(self, weights: WeightSource | WeightBuckets) -> int:
        """Broadcast the weights (in the receivers' manifest order) bucket by bucket; returns the bytes
        sent. Under ZeRO-3 pass `WeightBuckets(model, bucket_bytes)`, which gathers one bucket at a time,
        and have every other trainer rank `drain()` its own `WeightBuckets` meanwhile (the gathers are
        collectives); on failure the caller drains what is left so the other ranks are not stranded."""
        if not isinstance(weights, WeightBuckets):
            weights = WeightBuckets(weights, self.bucket_bytes)
        self._handshake(manifest_digest(weights.manifest), len(weights.manifest), weights.bucket_bytes)
        pg = self._require_pg()
        dev = _buffer_device()
        sent = 0
        with torch.no_grad():
            for bucket, tensors in weights:
                if len(tensors) == 1 and tensors[0].device == dev and tensors[0].is_contiguous():
                    flat = tensors[0].detach().view(-1)  # no staging copy for a bucket of one tensor
                else:
                    flat = _pack(tensors, self._staging(weights, dev)[: bucket.nbytes].view(bucket.dtype))
                pg.broadcast(flat.view(torch.uint8), 0).wait()
                sent += bucket.nbytes
        return sent

    def _staging(self, weights: WeightBuckets, dev: torch.device) -> Tensor:
        """One reused buffer of the largest bucket's bytes, on the group's device."""
        largest = max(b.nbytes for b in weights.layout)
        buf = self._buffer
        if buf is None or buf.numel() < largest or buf.device != dev:
            buf = self._buffer = torch.empty(largest, dtype=torch.uint8, device=dev)
        return buf


class BroadcastReceiver(_Endpoint):
    """A receiving rank (a rollout engine): `connect` (concurrently with the sender's), then `receive`
    each sync. Buffers are allocated on the first `receive` and reused after that."""

    def __init__(
        self,
        addr: str,
        port: int,
        rank: int,
        world_size: int,
        timeout_s: float = 600.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        if not 1 <= rank < world_size:
            raise WeightSyncError(
                f"receiver rank={rank} must be in 1..{world_size - 1} (rank 0 is the sender)"
            )
        self.addr, self.port, self.rank, self.world_size = addr, int(port), rank, world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.bucket_bytes = bucket_bytes
        self._layout: tuple[int, list[Bucket], Tensor] | None = None

    def connect(self) -> None:
        try:
            self.store = dist.TCPStore(self.addr, self.port, self.world_size, False, timeout=self.timeout)
        except Exception as exc:
            raise WeightSyncError(
                f"weight sync rank {self.rank}: cannot reach the sender's store at {self.addr}:{self.port} "
                f"({exc}); is the sender open and the port reachable from this node?"
            ) from exc
        self.pg = _side_group(self.store, self.rank, self.world_size, self.timeout)

    def receive(self, manifest: list[ManifestEntry]) -> Iterator[tuple[str, Tensor]]:
        """Yield (name, tensor) in manifest order as the buckets arrive, receiving the next bucket only when
        the consumer asks for a tensor of it. Every bucket lands in ONE reused buffer (the largest bucket's
        bytes, allocated on the first `receive`), so the engine holds one bucket beyond its own weights,
        never a second copy of the model. The tensors are views of that buffer: valid until the consumer
        asks for the next tensor after the last of their bucket. A consumer that keeps them longer must
        copy them (`RolloutEngine.receive_broadcast` does: vLLM's loader keeps a layer's tensors until all
        of the layer's weights have arrived)."""
        manifest = [(n, tuple(s), d) for n, s, d in manifest]
        digest = manifest_digest(manifest)
        if self._layout is None or self._layout[0] != digest:
            layout = bucket_layout(manifest, self.bucket_bytes)
            largest = max((b.nbytes for b in layout), default=0)
            self._layout = (digest, layout, torch.empty(largest, dtype=torch.uint8, device=_buffer_device()))
        _, layout, buffer = self._layout
        self._handshake(digest, len(manifest), self.bucket_bytes)
        pg = self._require_pg()
        for bucket in layout:
            raw = buffer[: bucket.nbytes]
            pg.broadcast(raw, 0).wait()
            flat = raw.view(bucket.dtype)
            for name, shape, offset in bucket.entries:
                yield name, flat[offset : offset + _numel(shape)].view(shape)
