"""A group of N rank actors that form one torch.distributed world (DeepSpeed data-parallel ranks).

Start-up: rank 0 is created first and picks its node address and a free port; the other ranks are then
created with that (addr, port) as MASTER_ADDR/MASTER_PORT; finally every rank's `init(local_rank,
local_size)` runs concurrently, since joining the process group (and building a DeepSpeed engine) is a
collective. A start that lost its port to another process is tried again (`START_ATTEMPTS`). The
per-rank Ray `.options()` (CPUs, GPUs, custom resources, placement-group strategy) come from the
placement module; by default each rank asks for one CPU.

The group moves references only: `call` returns one `ObjectRef` per rank and never waits.

Runs on the driver (the rank classes it starts are in `actors.deepspeed_rank` and the role modules).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import ray
from ray.actor import ActorClass, ActorHandle

from actors.deadline import DeadlinePassed, as_ready
from actors.glue import glue
from rlhf_ray.metrics import extreme

DEFAULT_RANK_OPTIONS: dict[str, Any] = {"num_cpus": 1}
# Rank 0 picks a free port, then binds it only when the ranks join: another process can take it in between
# (seen once under load as "address already in use"); the group then starts again on a new port.
START_ATTEMPTS = 3
log = logging.getLogger(__name__)


def _port_taken(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "address already in use" in text or "eaddrinuse" in text


def node_local_ranks(nodes: list[str]) -> list[tuple[int, int]]:
    """(place among the ranks on its node, ranks on that node) of each rank, given each rank's node id:
    ranks 0-7 of a node with 8 ranks, whatever the order Ray placed them in."""
    return [(nodes[:r].count(n), nodes.count(n)) for r, n in enumerate(nodes)]


class WorkerGroupError(RuntimeError):
    """A rank failed, or the group did not answer in time."""


def wait_all(
    refs: Sequence[ray.ObjectRef], timeout: float | None = None, what: str = "worker group call"
) -> list:
    """`ray.get` of every ref, failing fast: the first rank that raises aborts the wait (its peers may be
    blocked in a collective forever), and `timeout` (seconds, None = no limit) bounds the whole wait."""
    refs = list(refs)
    try:
        for ref in as_ready(refs, timeout):
            ray.get(ref)  # raises the rank's own error
    except DeadlinePassed as late:
        raise WorkerGroupError(
            f"{what}: {len(late.pending)} of {len(refs)} ranks did not finish within {timeout} s "
            f"(a rank may be stuck in a collective; pass a larger timeout or check the rank logs)"
        ) from None
    return ray.get(refs)


def joined(shards: list[ray.ObjectRef]) -> ray.ObjectRef:
    """One ref to the ranks' shards joined in rank order (on the glue worker, off the driver); a single
    rank's shard as it is."""
    return shards[0] if len(shards) == 1 else glue().concat.remote(*shards)


def as_ref(value: Any) -> ray.ObjectRef:
    """`value` itself when it is already a ref, else a ref to a copy put in the object store."""
    return value if isinstance(value, ray.ObjectRef) else ray.put(value)


def combine_rank_stats(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """One dict from the ranks' stats dicts: the max of keys named `*_max`, the min of `*_min`, the mean
    of the rest (a key missing on a rank is taken over the ranks that have it)."""
    out = {}
    for k in sorted({k for s in stats for k in s}):
        values = [s[k] for s in stats if k in s]
        pick = extreme(k)
        out[k] = pick(values) if pick is not None else sum(values) / len(values)
    return out


class WorkerGroup:
    """`num_ranks` actors of `actor_cls`, constructed as `actor_cls(cfg, rank, world, addr, port)`, joined
    into one torch.distributed world by their `init(local_rank, local_size)`.

    `actor_cls` is a plain class (made a Ray actor here) or an `ActorClass`; it must provide
    `master_address() -> (addr, port)` (rank 0), `node_id() -> str` and `init(local_rank, local_size)`,
    as `actors.deepspeed_rank.DeepSpeedRank` does."""

    def __init__(
        self,
        actor_cls: type | ActorClass,
        cfg: Any,
        num_ranks: int,
        options_per_rank: list[dict[str, Any]] | None = None,
        init_timeout: float | None = 1800.0,
    ):
        if num_ranks < 1:
            raise WorkerGroupError(f"num_ranks={num_ranks}: a worker group needs at least one rank")
        if options_per_rank is None:
            options_per_rank = [dict(DEFAULT_RANK_OPTIONS) for _ in range(num_ranks)]
        if len(options_per_rank) != num_ranks:
            raise WorkerGroupError(
                f"options_per_rank has {len(options_per_rank)} entries for num_ranks={num_ranks}: give one "
                f"Ray .options() dict per rank"
            )
        if not isinstance(actor_cls, ActorClass):
            actor_cls = ray.remote(actor_cls)
        self.world_size = num_ranks
        self.actors: list[ActorHandle] = []
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start(actor_cls, cfg, options_per_rank, init_timeout)
                return
            except Exception as exc:
                self.kill()
                if attempt == START_ATTEMPTS or not _port_taken(exc):
                    raise
                log.warning(
                    "worker group start %d/%d: the rendezvous port was taken by another process; starting "
                    "again on a new port",
                    attempt,
                    START_ATTEMPTS,
                )
            except BaseException:
                self.kill()
                raise

    def _start(
        self,
        actor_cls: ActorClass,
        cfg: Any,
        options_per_rank: list[dict[str, Any]],
        init_timeout: float | None,
    ) -> None:
        num_ranks = self.world_size
        rank0 = actor_cls.options(**options_per_rank[0]).remote(cfg, 0, num_ranks, None, None)
        self.actors.append(rank0)
        addr, port = wait_all([rank0.master_address.remote()], init_timeout, "starting rank 0")[0]
        for rank in range(1, num_ranks):
            opts = options_per_rank[rank]
            self.actors.append(actor_cls.options(**opts).remote(cfg, rank, num_ranks, addr, port))
        nodes = wait_all(self.call("node_id"), init_timeout, "starting the ranks")
        local = node_local_ranks(nodes)
        refs = [a.init.remote(lr, ls) for a, (lr, ls) in zip(self.actors, local)]
        wait_all(refs, init_timeout, "initialising torch.distributed and the DeepSpeed engines")

    def __len__(self) -> int:
        return self.world_size

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every rank; one ref per rank, in rank order."""
        if not self.actors:
            raise WorkerGroupError(f"call({method!r}): the worker group was killed")
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, per_rank: Sequence[Any], *args: Any) -> list[ray.ObjectRef]:
        """Call `method(per_rank[r], *args)` on each rank r; one ref per rank, in rank order."""
        if not self.actors:
            raise WorkerGroupError(f"call_each({method!r}): the worker group was killed")
        return [getattr(a, method).remote(own, *args) for a, own in zip(self.actors, per_rank, strict=True)]

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        if not self.actors:
            raise WorkerGroupError(f"call_rank0({method!r}): the worker group was killed")
        return getattr(self.actors[0], method).remote(*args, **kwargs)

    def kill(self) -> None:
        """End every rank's process (their resources return to Ray shortly after)."""
        actors, self.actors = self.actors, []
        for a in actors:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(a, no_restart=True)


class TrainerHandle:
    """Driver-side handle on a worker group of `DeepSpeedRank`s (`rank_cls`): what the policy and the
    critic have in common. Blocking methods take `timeout` (seconds, None = no limit)."""

    rank_cls: type

    def __init__(
        self,
        cfg: Any,
        options_per_rank: list[dict[str, Any]] | None = None,
        init_timeout: float | None = 1800.0,
    ):
        self.cfg = cfg
        self.group = WorkerGroup(self.rank_cls, cfg, cfg.trainer.num_ranks, options_per_rank, init_timeout)

    def per_rank(self, batch_ref: ray.ObjectRef | Any) -> list[ray.ObjectRef]:
        """What each rank is handed of a batch: with one rank the batch's ref as it is; else each rank's
        own `RankShard`, cut on the glue worker, so that no rank pulls the rows of the others."""
        ref, world = as_ref(batch_ref), len(self.group)
        if world == 1:
            return [ref]
        return glue().shards.options(num_returns=world).remote(ref, world)

    def export_weights(self, timeout: float | None = None) -> list[ray.ObjectRef]:
        """Rank 0's object-store weight sync payload, one ref per bucket (`rlhf_ray.weight_transport.
        put_weights`; tied lm_head left out), passed on to the rollout engines without being fetched here
        (`fetch_weights` turns it into a dict, for tests)."""
        return wait_all(self.group.call("export_weights"), timeout, "export_weights")[0]

    def save_checkpoint(self, path: str, timeout: float | None = None) -> None:
        """DeepSpeed checkpoint (model, optimiser, scheduler, data position) under `path`, all ranks."""
        wait_all(self.group.call("save_checkpoint", str(path)), timeout, "save_checkpoint")

    def load_checkpoint(self, path: str, timeout: float | None = None) -> float:
        """Every rank loads its part of the checkpoint under `path` and then trains at the config's learning
        rate; returns the rate the checkpoint was saved with (rank 0's)."""
        return wait_all(self.group.call("load_checkpoint", str(path)), timeout, "load_checkpoint")[0]

    def save_pretrained(self, path: str, timeout: float | None = None) -> str:
        """An HF directory (model + tokenizer) written by rank 0; returns its path."""
        return wait_all(self.group.call("save_pretrained", str(path)), timeout, "save_pretrained")[0]

    def offload_states(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every rank moves its optimiser states to CPU memory while the engines generate (colocated on
        GPUs; a recorded no-op on CPU ranks): `DeepSpeedRank.offload_states`. One report per rank, to log."""
        return wait_all(self.group.call("offload_states"), timeout, "offload_states")

    def reload_states(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every rank moves back what `offload_states` moved, before the update. One report per rank."""
        return wait_all(self.group.call("reload_states"), timeout, "reload_states")

    def kill(self) -> None:
        self.group.kill()
