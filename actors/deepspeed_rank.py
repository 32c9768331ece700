"""One data-parallel rank holding a DeepSpeed engine (ZeRO 0-3): the shared part of the trainer ranks (policy
and critic; `OfflineRank` for the SFT, reward-model and DPO ranks). Subclasses say which model to load, at
which learning rate, with which `BatchPlan`, and what a micro-batch's loss is.

Batches: every rank receives the SAME batch (one ObjectRef) and takes its own contiguous shard
(`batch.split(world)[rank]`). Every rank runs the same number of forward/backward passes, even when the
shards differ in size by one sequence: ZeRO-2/3 reduce gradients during each backward and ZeRO-3 gathers
parameters during each forward, so a rank that skipped one would hang its peers. A rank with nothing left
for a pass runs it on a stand-in sequence with zero weight.

Mini-batches: `_train` takes `BatchPlan.epochs` passes over the batch in mini-batches of
`BatchPlan.mini_batch_size` sequences (all ranks together), one optimiser step each. The RL ranks' plan is
`algorithm.mini_batch_size` and `algorithm.ppo_epochs`; an offline stage's is its `offline.<stage>.batch_size`
and one pass.

Gradients: a mini-batch is split into micro-batches of at most `trainer.micro_batch_size` sequences; each
micro-batch's loss is weighted by its share of the GLOBAL mini-batch (tokens for a token mean, sequences
for a sequence mean, counted over all ranks with one all-reduce), times the world size because DeepSpeed
averages gradients over ranks. The accumulated gradient is then exactly that of the whole mini-batch's
loss, however it is cut into ranks and micro-batches.

Runs in each rank (a Ray actor process per rank).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch
from torch import Tensor

from rlhf_ray import runtime
from rlhf_ray.batch import Batch, RankShard, rank_shards
from rlhf_ray.config import RLHFConfig
from rlhf_ray.deepspeed_config import OffloadPlan, rollout_offload_plan, set_learning_rate
from rlhf_ray.metrics import extreme

if TYPE_CHECKING:
    from rlhf_ray.weight_transport import WeightBuckets

LOSS_WEIGHT_KINDS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# A micro-batch loss: (micro-batch on the device, its weight in the mini-batch loss) -> (weighted loss to
# back-propagate, stats of the micro-batch as python floats)
MicroLoss = Callable[[Batch, "LossWeights"], tuple[Tensor, dict[str, float]]]


class LossWeights:
    """The factors that turn a micro-batch's mean loss into its share of the global mini-batch's mean loss
    (`world` included: DeepSpeed divides the summed gradients by the number of ranks)."""

    def __init__(self, local: Tensor, total: Tensor, world: int, scale: float):
        # local/total: [response tokens, rows with a response token, rows]
        self._local, self._total, self._world, self._scale = local, total, world, scale

    def __call__(self, agg: str) -> float:
        i = {
            "token-mean": 0,
            "seq-mean-token-mean": 1,
            "seq-mean-token-sum": 2,
            "seq-mean-token-sum-norm": 2,
        }[agg]
        total = float(self._total[i])
        return 0.0 if total == 0 else self._scale * float(self._local[i]) * self._world / total

    @property
    def tokens(self) -> float:
        """Response tokens of the micro-batch that count (0 for a stand-in pass); weights its stats."""
        return self._scale * float(self._local[0])


def _counts(batch: Batch) -> Tensor:
    mask = batch["response_mask"]
    return torch.tensor(
        [float(mask.sum()), float((mask != 0).any(dim=1).sum()), float(len(batch))], dtype=torch.float64
    )


def _pad_to(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _grad_norm(model: torch.nn.Module) -> float | None:
    """The L2 norm of the gradients held in `p.grad` (all-reduced by then under stage 0), before clipping;
    None when none are there."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BatchPlan:
    """How `_train` cuts the batch of one `train` call into optimiser steps."""

    mini_batch_size: int  # sequences (pairs, for preference batches) per optimiser step, all ranks together
    epochs: int = 1  # passes over the batch


class DeepSpeedRank:
    """Base of the trainer ranks (a plain class; `WorkerGroup` makes it a Ray actor)."""

    role = "policy"  # the `placement` entry of these ranks (their resources and threads)

    def __init__(
        self, cfg: RLHFConfig, rank: int, world: int, addr: str | None = None, port: int | None = None
    ):
        runtime.setup_process_env()
        self.num_threads = runtime.set_actor_threads(getattr(cfg.placement, self.role).num_threads)
        if rank == 0 and (addr is None or port is None):
            addr, port = ray.util.get_node_ip_address(), _free_port()
        if addr is None or port is None:
            raise ValueError(
                f"rank {rank}: MASTER_ADDR/MASTER_PORT missing; ask rank 0 for master_address() first"
            )
        self.cfg, self.rank, self.world = cfg, rank, world
        self.plan = self.batch_plan(cfg)
        self.addr, self.port = addr, int(port)
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        self.engine = None
        self.train_calls = 0  # seeds the shuffling; saved in checkpoints
        self._broadcast = None
        self._tokenizer = None
        self._hf_ds_config = None  # ZeRO-3: transformers' HfDeepSpeedConfig, alive while the rank lives
        self._offloaded: OffloadPlan | None = None  # what offload_states moved (reload_states moves it back)

    # ---- to override ---------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def learning_rate(self) -> float:
        return self.cfg.trainer.lr

    @classmethod
    def batch_plan(cls, cfg: RLHFConfig) -> BatchPlan:
        """The RL ranks': `algorithm.mini_batch_size` sequences per optimiser step, `algorithm.ppo_epochs`
        passes."""
        return BatchPlan(cfg.algorithm.mini_batch_size, cfg.algorithm.ppo_epochs)

    # ---- start-up ------------------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        return self.addr, self.port

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def init(self, local_rank: int = 0, local_size: int = 1) -> None:
        """Join the torch.distributed world and build the engine (collective: all ranks at once)."""
        # Not LOCAL_SIZE: with LOCAL_SIZE == world, DeepSpeed's CPU backend maps a 66 MB /dev/shm buffer per
        # rank (for inference all-reduce, unused in training) that outlives a killed actor.
        local_rank = runtime.device_local_rank(runtime.assigned_gpus(), local_rank)
        os.environ.update(LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_size))
        import deepspeed  # after setup_process_env: DS_ACCELERATOR and TORCH_EXTENSIONS_DIR are read on import

        from rlhf_ray.deepspeed_config import deepspeed_config, effective_zero_stage, optimizer_kind
        from rlhf_ray.models import enable_zero3_loading, local_parameter_elements

        deepspeed.init_distributed(dist_backend=runtime.dist_backend(), auto_mpi_discovery=False)
        tcfg = self.cfg.trainer
        self.device = runtime.device()
        self.dtype = runtime.resolve_dtype(self.cfg.model.dtype)
        self.stage = effective_zero_stage(tcfg, self.world)  # 0 for a single rank: nothing to partition
        ds_config = deepspeed_config(
            tcfg, self.dtype, tcfg.micro_batch_size, self.micro_batches_per_step(), self.world
        )
        if self.stage == 3:  # each rank loads only its partition (transformers keeps a weak ref: hold it)
            self._hf_ds_config = enable_zero3_loading(ds_config)
        torch.manual_seed(self.cfg.run.seed)
        model = self.build_model()
        self.loaded_elements = local_parameter_elements(model)  # (held here, whole model): the load's cost
        if tcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [  # no weight decay on norms and biases
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if optimizer_kind(tcfg) == "cpu_adam":  # the update runs on the CPU, on the offloaded state
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=self.learning_rate(), adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.learning_rate())
        warmup = tcfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            # the device index within what this process sees (Ray gives each rank its own GPU set)
            args=SimpleNamespace(device_rank=self.device.index or 0),
        )

    def micro_batches_per_step(self) -> int:
        """Micro-batches per optimiser step when the batch splits evenly (DeepSpeed's bookkeeping only)."""
        per_rank = max(1, self.plan.mini_batch_size // self.world)
        return math.ceil(per_rank / self.cfg.trainer.micro_batch_size)

    def optimiser_steps(self, batch_rows: int) -> int:
        """Optimiser steps `_train` takes on a batch of `batch_rows` sequences (every rank the same)."""
        max_shard = math.ceil(batch_rows / self.world)
        per_rank = max(1, self.plan.mini_batch_size // self.world)
        return self.plan.epochs * math.ceil(max_shard / per_rank)

    # ---- sharding and micro-batching -----------------------------------------------------------
    def own_rows(self, batch: Batch | RankShard) -> RankShard:
        """This rank's part of a batch: as the driver's handle cut it (`TrainerHandle.per_rank`), or cut
        here from a whole batch (one rank, the offline stages, tests)."""
        return batch if isinstance(batch, RankShard) else rank_shards(batch, self.world)[self.rank]

    def _shard(self, batch: Batch | RankShard) -> tuple[Batch, int]:
        """This rank's shard and the largest shard of any rank (what sets the number of passes)."""
        own = self.own_rows(batch)
        return own.batch, own.max_rows

    @torch.no_grad()
    def _infer(self, batch: Batch | RankShard, fn: Callable[[Batch], dict[str, Tensor]]) -> Batch:
        """Per-token outputs of `fn` on this rank's shard, `[len(shard), T]` fp32 on the CPU."""
        own = self.own_rows(batch)
        if own.total_rows == 0:
            return Batch()
        self.engine.eval()
        shard, max_shard = own.batch, own.max_rows
        width = own.stand_in.seq_len
        n_micro = math.ceil(max_shard / self.cfg.trainer.micro_batch_size)
        out: dict[str, list[Tensor]] = defaultdict(list)
        for part in shard.split(n_micro):
            if len(part) == 0:
                if self.stage == 3:  # parameter gathers are collectives: keep in step with the peers
                    fn(own.stand_in.trim().to(self.device))
                continue
            for name, value in fn(part.trim().to(self.device)).items():
                out[name].append(_pad_to(value.detach().float().cpu(), width))
        if not out:
            return Batch()
        return Batch({name: torch.cat(parts) for name, parts in out.items()})

    def _global_counts(self, mini: Batch) -> Tensor:
        local = _counts(mini)
        if self.world == 1:
            return local
        import torch.distributed as dist

        total = local.to(self.device)
        dist.all_reduce(total)
        return total.cpu()

    def _train(self, batch: Batch | RankShard, micro_loss: MicroLoss) -> dict[str, float]:
        """`plan.epochs` passes over this rank's shard in shuffled (seeded) mini-batches of
        `plan.mini_batch_size // world` sequences, one optimiser step each, accumulated over micro-batches.
        Returns token-weighted means of the micro-batch stats (extremes for `*_max`/`*_min`), and the mean
        `grad_norm` and `lr` of the optimiser steps."""
        own = self.own_rows(batch)
        if own.total_rows == 0:
            raise ValueError("train: the batch is empty")
        self.engine.train()
        shard, max_shard = own.batch, own.max_rows
        n_mini = math.ceil(max_shard / max(1, self.plan.mini_batch_size // self.world))
        n_micro = math.ceil(math.ceil(max_shard / n_mini) / self.cfg.trainer.micro_batch_size)
        stand_in = own.stand_in
        sums: dict[str, float] = defaultdict(float)
        peaks: dict[str, float] = {}  # stats named *_max / *_min are extremes, not means (`extreme`)
        weight = 0.0
        step_stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(self.plan.epochs):
            order = np.random.default_rng([self.cfg.run.seed, self.train_calls, epoch, self.rank])
            for mini in shard.select(order.permutation(len(shard)).tolist()).split(n_mini):
                total = self._global_counts(mini)
                fallback_norm = None  # the pre-clip norm, where DeepSpeed keeps none (stage 0, fp32)
                for i, part in enumerate(mini.split(n_micro)):
                    scale = 1.0
                    if len(part) == 0:  # nothing left here: a zero-weight pass keeps the ranks in step
                        part, scale = stand_in, 0.0
                    part = part.trim().to(self.device)
                    weights = LossWeights(_counts(part), total, self.world, scale)
                    boundary = i == n_micro - 1
                    self.engine.set_gradient_accumulation_boundary(boundary)
                    loss, stats = micro_loss(part, weights)
                    self.engine.backward(loss, scale_wrt_gas=False)
                    if boundary:
                        step_stats["lr"].append(float(self.engine.get_lr()[0]))
                        if self.stage == 0:  # DeepSpeed's fp32 stage-0 step clips but keeps no norm
                            fallback_norm = _grad_norm(self.engine.module)
                    self.engine.step()
                    if weights.tokens > 0:
                        for k, v in stats.items():
                            if (pick := extreme(k)) is not None:
                                peaks[k] = pick(peaks.get(k, v), v)
                            else:
                                sums[k] += weights.tokens * v
                        weight += weights.tokens
                norm = self.engine.get_global_grad_norm()
                norm = fallback_norm if norm is None else norm
                step_stats["grad_norm"].append(float(norm) if norm is not None else float("nan"))
        self.train_calls += 1
        out = {k: v / weight for k, v in sums.items()} if weight > 0 else {}
        out.update(peaks)
        out.update({k: float(np.mean(v)) for k, v in step_stats.items()})
        return out

    # ---- parameters ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _full_parameters(self) -> Iterator[torch.nn.Module]:
        """The HF model with whole parameters (ZeRO-3: the WHOLE model gathered on every rank; a collective).
        For saving and tests; weight sync gathers one bucket at a time instead (`_weight_buckets`)."""
        model = self.engine.module
        if self.stage != 3:
            yield model
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield model

    def _weight_buckets(self) -> WeightBuckets:
        """This rank's pass over the weights for one sync, in buckets of `rollout.weight_bucket_mb` (ZeRO-3:
        each bucket gathered alone, when reached). `weight_export_stats` keeps what the pass gathered."""
        from rlhf_ray.weight_transport import WeightBuckets, bucket_bytes

        weights = WeightBuckets(self.engine.module, bucket_bytes(self.cfg.rollout.weight_bucket_mb))
        self.weight_export_stats = weights.stats
        return weights

    def export_weights(self) -> list[ray.ObjectRef] | None:
        """Rank 0: one object-store ref per bucket (`rlhf_ray.weight_transport.put_weights`), in a list so
        Ray passes them on unresolved; the other ranks None. Every rank must call it: under ZeRO-3 each
        bucket's gather is a collective, all ranks pass over the buckets in step."""
        from rlhf_ray.weight_transport import put_weights

        weights = self._weight_buckets()
        try:
            return put_weights(weights) if self.rank == 0 else None
        finally:
            weights.drain()  # the other ranks; and rank 0 after a failed put, so its peers are not stranded

    def weight_manifest(self) -> list[tuple[str, tuple[int, ...], str]]:
        """`[(hf_name, shape, dtype)]` of what `broadcast_weights` sends, for the receivers."""
        from rlhf_ray.weight_transport import weight_manifest

        return weight_manifest(self.engine.module)

    def open_broadcast(self, world_size: int, timeout_s: float = 600.0) -> tuple[str, int] | None:
        """Rank 0: start the broadcast side group's store (sender = group rank 0); returns its (addr, port)."""
        if self.rank != 0:
            return None
        from rlhf_ray.weight_transport import BroadcastSender, bucket_bytes

        self.close_broadcast()
        self._broadcast = BroadcastSender(bucket_bytes(self.cfg.rollout.weight_bucket_mb))
        return self._broadcast.open(world_size, timeout_s)

    def connect_broadcast(self) -> None:
        """Rank 0: join the side group (concurrently with the receivers' connect)."""
        if self.rank == 0:
            self._require_broadcast().connect()

    def broadcast_weights(self) -> int | None:
        """Send the weights to the receivers (concurrently with their receive) bucket by bucket. Every rank
        must call it (under ZeRO-3 each bucket's gather is a collective); rank 0 sends and returns the bytes
        sent."""
        sender = self._require_broadcast() if self.rank == 0 else None
        weights = self._weight_buckets()
        try:
            return sender.send(weights) if sender is not None else None
        finally:
            weights.drain()  # the other ranks; and rank 0 after a failed send, so its peers are not stranded

    def close_broadcast(self) -> None:
        if self._broadcast is not None:
            self._broadcast.close()
            self._broadcast = None

    def _require_broadcast(self):
        if self._broadcast is None:
            raise RuntimeError(
                "broadcast_weights: call open_broadcast() and connect_broadcast() on rank 0 first"
            )
        return self._broadcast

    # ---- files ---------------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """Model, optimiser, scheduler and this rank's training position under `path` (every rank calls)."""
        self.engine.save_checkpoint(str(path), client_state={"train_calls": self.train_calls})

    def load_checkpoint(self, path: str) -> float:
        """Model, optimiser, scheduler and training position from `path`, then the config's learning rate
        (`learning_rate()`) in place of the saved one; returns the rate the checkpoint was saved with."""
        load_path, client = self.engine.load_checkpoint(
            str(path), load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(
                f"rank {self.rank}: no DeepSpeed checkpoint under {str(path)!r} (expected a 'latest' file "
                f"written by save_checkpoint)"
            )
        self.train_calls = int((client or {}).get("train_calls", 0))
        return set_learning_rate(self.scheduler, self.learning_rate())

    def save_pretrained(self, path: str) -> str | None:
        """Rank 0 writes an HF directory (model + tokenizer) atomically; every rank must call it (ZeRO-3
        consolidates the parameters on rank 0 once, one module at a time: DeepSpeed's
        `_zero3_consolidated_16bit_state_dict`, in the model's dtype, never the whole model gathered on every
        rank). A tied `lm_head.weight` is not written (transformers re-ties it)."""
        from rlhf_ray.models import save_pretrained_atomic

        model = self.engine.module
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective; None off rank 0
        elif self.rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.rank != 0:
            return None
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return str(save_pretrained_atomic(_Frozen(model, state), self.tokenizer(), path))

    # ---- colocation: optimiser states out of GPU memory while the engines generate --------------------
    def offload_states(self) -> dict[str, Any]:
        """Move this rank's optimiser states (and gradient buffers) to CPU memory for the rollout, then
        empty the CUDA cache; what moves follows `rlhf_ray.deepspeed_config.rollout_offload_plan` (on a CPU
        rank: nothing, the states already live there). Every rank calls it. Returns what was done, to log:
        {rank, moved, states, note, seconds}."""
        return self._offload_states(on_gpu=self.device.type == "cuda")

    def reload_states(self) -> dict[str, Any]:
        """Move back what `offload_states` moved (a no-op when it moved nothing). Every rank calls it
        (ZeRO-3's reload re-gathers the persistent parameters: a collective). Returns what was done."""
        import time

        start, plan, self._offloaded = time.perf_counter(), self._offloaded, None
        if plan is None or not plan.moves_anything:
            note = plan.note if plan is not None else "nothing offloaded"
            return self._offload_report(False, (), note, start)
        if plan.engine_states:
            self.engine.reload_states()
        if plan.adamw_states:
            self._move_adamw_states(self.device, pin_memory=False)
        self._empty_cache()
        return self._offload_report(True, self._state_names(plan), plan.note, start)

    def _offload_states(self, on_gpu: bool) -> dict[str, Any]:
        """`offload_states` with the plan of a rank on a GPU (`on_gpu`) or not; the tests take the GPU
        plan on a CPU rank to run DeepSpeed's moves (CPU to CPU, unpinned) and check nothing is lost."""
        import time

        start = time.perf_counter()
        if self._offloaded is not None:
            raise RuntimeError(f"rank {self.rank}: offload_states called twice without reload_states")
        plan = self._offloaded = rollout_offload_plan(self.cfg.trainer, self.stage, on_gpu)
        pin = self.device.type == "cuda"  # pinned host memory speeds the copy back; only with a GPU
        if plan.engine_states:
            from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum, OffloadStateTypeEnum

            states = [OffloadStateTypeEnum(s) for s in plan.engine_states]
            self.engine.offload_states(include=states, device=OffloadDeviceEnum.cpu, pin_memory=pin)
        if plan.adamw_states:
            self._move_adamw_states(torch.device("cpu"), pin_memory=pin)
        if on_gpu and self.stage == 3:  # parameters gathered for the last forward, held for reuse
            self.engine.empty_partition_cache()
        self._empty_cache()
        return self._offload_report(plan.moves_anything, self._state_names(plan), plan.note, start)

    def _move_adamw_states(self, device: torch.device, pin_memory: bool) -> None:
        """ZeRO-3 with torch AdamW: its moments and the fp32 master partitions they update, moved in place
        (`.data`, so the optimiser and DeepSpeed keep their tensors). DeepSpeed's stage-3 `offload_states`
        moves these only for its FusedAdam; the scalar `step` stays where it is (on the CPU)."""
        zero = self.engine.optimizer
        tensors = list(zero.fp32_partitioned_groups_flat)
        for state in zero.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
        for t in tensors:
            moved = t.data.to(device)
            t.data = moved.pin_memory() if pin_memory else moved

    @staticmethod
    def _state_names(plan: OffloadPlan) -> tuple[str, ...]:
        return plan.engine_states + (("adamw_states", "hp_params") if plan.adamw_states else ())

    def _offload_report(
        self, moved: bool, states: tuple[str, ...], note: str, start: float
    ) -> dict[str, Any]:
        import time

        return {
            "rank": self.rank,
            "moved": moved,
            "states": list(states),
            "note": note,
            "seconds": time.perf_counter() - start,
        }

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tokenizer(self):
        if self._tokenizer is None:
            from rlhf_ray.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model.tokenizer_path or self.cfg.model.policy_path)
        return self._tokenizer

    def ping(self) -> int:
        return self.rank


class OfflineRank(DeepSpeedRank):
    """Base of the offline stages' ranks (SFT, reward model, DPO): one pass over each batch, one optimiser
    step per `offline.<stage>.batch_size` rows, at `offline.<stage>.lr` (None: `trainer.lr`). The driver
    puts the stage's settings in effect (its flags applied) in that section
    (`rlhf_ray.trainer.offline.rank_config`)."""

    offline_stage: str  # 'sft', 'reward_model' or 'dpo': its `offline` section (`stage` is the ZeRO stage)

    @classmethod
    def batch_plan(cls, cfg: RLHFConfig) -> BatchPlan:
        return BatchPlan(getattr(cfg.offline, cls.offline_stage).batch_size)

    def learning_rate(self) -> float:
        return getattr(self.cfg.offline, self.offline_stage).lr or self.cfg.trainer.lr


class _Frozen:
    """`save_pretrained` of a model with a given state dict (taken while ZeRO-3 parameters were whole)."""

    def __init__(self, model: Any, state: dict[str, Tensor]):
        self._model, self._state = model, state

    def save_pretrained(self, out_dir: str, **kwargs: Any) -> None:
        self._model.save_pretrained(out_dir, state_dict=self._state, **kwargs)
