"""The two ends of the weight transports (policy rank 0 sends, the rollout engines receive): the payload
(HF-named parameters) and the broadcast group. The driver side, which picks a transport and runs a sync
between the roles, is `rlhf_ray.trainer.weight_sync`.

Two transports carry the same payload, HF-named parameters of the policy:
- **object store** (default, works everywhere): trainer rank 0 returns
  `[ray.put(named_weights_numpy(model))]` (a list, so Ray does not resolve the ref on the way) and each
  rollout engine `ray.get`s it zero-copy;
- **broadcast group**: a torch.distributed side group (gloo on CPU, NCCL on GPU) from trainer rank 0
  (rank 0 of the group) to the rollout engines (ranks 1..N). It is built on its own `TCPStore` and never
  touches either process's default process group (the trainer ranks already have one).

The broadcast is two-phase and both ends must take part concurrently; the driver does
```python
addr, port = ray.get(trainer.open_broadcast.remote(world_size=1 + n_engines))   # BroadcastSender.open
ray.get([trainer.connect.remote()] + [e.open_broadcast.remote(addr, port, i + 1, ...) for ...])
ray.get([trainer.send.remote()] + [e.receive_broadcast.remote() for e in engines])
```
Both sides agree on the order, names, shapes and dtypes of the tensors through the manifest
(`weight_manifest`): the sender checks, before the payload, that every receiver expects exactly what it
is about to send, so a mismatch fails with a clear error instead of corrupting weights or hanging.
Tensors travel in flat buckets (consecutive tensors of one dtype, up to `bucket_bytes`) whose layout both
ends compute from the manifest.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_ray.runtime import device as runtime_device
from rlhf_ray.runtime import dist_backend

ManifestEntry = tuple[str, tuple[int, ...], str]  # (HF name, shape, dtype name such as 'float32')

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

    Under ZeRO-3 call it inside `deepspeed.zero.GatheredParameters` (or use `named_weights_numpy(...,
    gathered=True)`): outside, partitioned parameters are empty placeholders."""
    model = unwrap(model)
    tied = _ties_head(model)
    for name, param in model.named_parameters():  # de-duplicates shared parameters by default
        if tied and name == TIED_HEAD:
            continue
        yield name, param


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_manifest(model: torch.nn.Module) -> list[ManifestEntry]:
    """`[(name, shape, dtype)]` of what `named_weights` yields, in that order. Works on ZeRO-3 partitioned
    models without gathering (the full shape is read from `ds_shape`)."""
    return [
        (name, tuple(int(s) for s in getattr(p, "ds_shape", p.shape)), _dtype_name(p.dtype))
        for name, p in named_weights(model)
    ]


def _to_numpy(t: Tensor) -> np.ndarray:
    # numpy has no bfloat16: bf16 parameters are sent as float32 (exact; the engine casts to its dtype).
    dtype = torch.float32 if t.dtype == torch.bfloat16 else t.dtype
    return t.detach().to("cpu", dtype, copy=True).numpy()


def named_weights_numpy(model: torch.nn.Module, gathered: bool = False) -> dict[str, np.ndarray]:
    """HF name -> numpy copy of the parameter, for the object-store transport (numpy crosses Ray zero-copy).

    bfloat16 parameters become float32 arrays (numpy lacks bf16; the conversion is exact and the engine
    casts back to its own dtype). The arrays are copies: later training steps do not change them.
    `gathered=True`: the parameters are ZeRO-3 partitioned; gather them first. That is a collective:
    every trainer rank must call it (all ranks get the full dict; send it from rank 0 only)."""
    if not gathered:
        return {name: _to_numpy(p) for name, p in named_weights(model)}
    import deepspeed  # only trainer processes reach this branch

    params = list(unwrap(model).parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: _to_numpy(p) for name, p in named_weights(model)}


def manifest_digest(manifest: Iterable[ManifestEntry]) -> int:
    """A 62-bit fingerprint of a manifest (names, shapes, dtypes, order), checked by both ends."""
    text = json.dumps([[n, list(s), d] for n, s, d in manifest])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


# ---- bucket layout ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Bucket:
    dtype: torch.dtype
    numel: int
    entries: tuple[tuple[str, tuple[int, ...], int], ...]  # (name, shape, offset) within the flat buffer


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bucket_layout(manifest: list[ManifestEntry], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[_Bucket]:
    """Group consecutive tensors of one dtype into flat buckets of at most `bucket_bytes` (a tensor larger
    than that gets a bucket of its own). Both ends compute the same layout from the same manifest."""
    buckets: list[_Bucket] = []
    cur: list[tuple[str, tuple[int, ...], int]] = []
    cur_dtype: torch.dtype | None = None
    cur_numel = 0
    for name, shape, dtype_name in manifest:
        dtype = getattr(torch, dtype_name)
        n = _numel(shape)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        cur_bytes = cur_numel * (torch.empty((), dtype=cur_dtype).element_size() if cur_dtype else 0)
        if cur and (dtype != cur_dtype or cur_bytes + nbytes > bucket_bytes):
            buckets.append(_Bucket(cur_dtype, cur_numel, tuple(cur)))
            cur, cur_numel = [], 0
        cur_dtype = dtype
        cur.append((name, tuple(shape), cur_numel))
        cur_numel += n
    if cur:
        buckets.append(_Bucket(cur_dtype, cur_numel, tuple(cur)))
    return buckets


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

    def _handshake(self, digest: int, count: int) -> None:
        """Rank 0 announces (digest, count); every rank reports whether it agrees; all fail together."""
        pg = self._require_pg()
        dev = _buffer_device()
        header = torch.tensor([digest, count], dtype=torch.int64, device=dev)
        pg.broadcast(header, 0).wait()
        agrees = bool(header[0] == digest and header[1] == count)
        ok = torch.tensor([int(agrees)], dtype=torch.int64, device=dev)
        pg.allreduce([ok], dist.ReduceOp.MIN).wait()
        if int(ok.item()) != 1:
            if self.rank == 0:
                where = "a receiver's manifest differs from the tensors sent"
            elif agrees:
                where = "another receiver's manifest differs from the tensors sent"
            else:
                where = (
                    f"{count} tensors expected here (digest {digest}), rank 0 sends {int(header[1])} "
                    f"(digest {int(header[0])})"
                )
            raise WeightSyncError(
                f"weight sync rank {self.rank}: sender and receivers disagree on the weights ({where}: names, "
                "shapes, dtypes or order differ); nothing was sent. Build the receivers' manifest with "
                "weight_manifest() of the model the trainer sends, and send named_weights() in that order"
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

    def send(self, named_tensors: Iterable[tuple[str, Tensor]] | dict[str, Tensor]) -> int:
        """Broadcast the tensors (in the receivers' manifest order); returns the number of bytes sent.
        Under ZeRO-3, call it inside `GatheredParameters` (every rank gathers, only rank 0 sends)."""
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        manifest = [(n, tuple(t.shape), _dtype_name(t.dtype)) for n, t in items]
        self._handshake(manifest_digest(manifest), len(manifest))
        pg = self._require_pg()
        dev = _buffer_device()
        by_name = dict(items)
        sent = 0
        with torch.no_grad():
            for bucket in bucket_layout(manifest, self.bucket_bytes):
                if len(bucket.entries) == 1:
                    flat = by_name[bucket.entries[0][0]].detach().to(dev).contiguous().view(-1)
                else:
                    flat = torch.cat(
                        [by_name[name].detach().to(dev).reshape(-1) for name, _, _ in bucket.entries]
                    )
                pg.broadcast(flat, 0).wait()
                sent += flat.numel() * flat.element_size()
        return sent


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
        self._layout: tuple[int, list[_Bucket], list[Tensor]] | None = None

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
        """Yield (name, tensor) in manifest order as the buckets arrive. The tensors are views of reused
        buffers: copy them (an engine's weight loader does) before the next `receive`."""
        manifest = [(n, tuple(s), d) for n, s, d in manifest]
        digest = manifest_digest(manifest)
        if self._layout is None or self._layout[0] != digest:
            layout = bucket_layout(manifest, self.bucket_bytes)
            dev = _buffer_device()
            buffers = [torch.empty(b.numel, dtype=b.dtype, device=dev) for b in layout]
            self._layout = (digest, layout, buffers)
        _, layout, buffers = self._layout
        self._handshake(digest, len(manifest))
        pg = self._require_pg()
        for bucket, flat in zip(layout, buffers):
            pg.broadcast(flat, 0).wait()
            for name, shape, offset in bucket.entries:
                yield name, flat[offset : offset + _numel(shape)].view(shape)
