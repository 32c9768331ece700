"""The DeepSpeed configuration of a trainer rank, built from `TrainerConfig`: a pure function, so the dict
a run uses can be read and tested without starting DeepSpeed.

Precision follows the model's dtype (bf16 when the weights are bfloat16, plain fp32 otherwise; fp16 is
never used: DeepSpeed refuses it on CPU and bf16 needs no loss scaling). Gradient accumulation is driven
by the trainer itself (it marks the accumulation boundary and weights each micro-batch's loss), so
`grad_accum` here only keeps DeepSpeed's batch bookkeeping consistent.

The optimiser is chosen here too (`optimizer_kind`, built by `make_optimizer` in the rank): DeepSpeed's CPU
Adam when the optimiser state is offloaded (the update then runs on the CPU, where torch's AdamW is several
times slower; DeepSpeed refuses any other optimiser there unless told otherwise, engine.py
`_configure_optimizer`), torch's AdamW otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhf_ray.config import ConfigError, TrainerConfig

OptimizerKind = Literal["cpu_adam", "adamw"]


def effective_zero_stage(trainer_cfg: TrainerConfig, world: int) -> int:
    """The ZeRO stage a group of `world` ranks runs. ZeRO partitions optimiser state, gradients and
    parameters ACROSS ranks: one rank has nothing to partition, so stages 1-3 do the same update as stage 0
    with extra bookkeeping (one SmolLM2-135M training pass on CPU: ZeRO-2 25% slower than ZeRO-0, see
    bench/train_step.py). A single rank therefore runs stage 0, unless offloading asks for stage >= 1:
    offloaded optimiser or parameters, or `offload_during_rollout` (DeepSpeed moves states to CPU memory
    and back only for its ZeRO optimisers: `offload_states` in runtime/zero/stage_1_and_2.py and stage3.py)."""
    offloads = (
        trainer_cfg.offload_optimizer or trainer_cfg.offload_params or trainer_cfg.offload_during_rollout
    )
    if world == 1 and not offloads:
        return 0
    return trainer_cfg.zero_stage


def optimizer_kind(trainer_cfg: TrainerConfig) -> OptimizerKind:
    """The optimiser of the trainer ranks: "cpu_adam" (`deepspeed.ops.adam.DeepSpeedCPUAdam`, AdamW mode)
    when the optimiser state is offloaded to CPU memory, "adamw" (`torch.optim.AdamW`) otherwise. CPU Adam
    JIT-compiles DeepSpeed's cpu_adam op on first use (about 60 s on 2 cores, once; cached under
    TORCH_EXTENSIONS_DIR)."""
    return "cpu_adam" if trainer_cfg.offload_optimizer else "adamw"


def set_learning_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> float:
    """Make `lr` the scheduler's base rate and give each parameter group the rate the schedule sets at its
    current step (`base * factor(last_epoch)`, as `LambdaLR` computes it). A resumed rank calls it after
    loading a checkpoint, whose optimiser and scheduler states carry the rate the run was saved with, so
    that the config's rate (`trainer.lr`, `trainer.critic_lr`) is the one trained at; with the same rate it
    changes nothing, bit for bit. Returns the base rate it replaced (the first group's)."""
    before = scheduler.base_lrs[0]
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return before


def deepspeed_config(
    trainer_cfg: TrainerConfig,
    dtype: torch.dtype,
    micro_batch_size: int,
    grad_accum: int,
    world: int,
) -> dict[str, Any]:
    """The `config` dict for `deepspeed.initialize` of one rank.

    `micro_batch_size` is sequences per rank per forward/backward; `grad_accum` the number of micro-batches
    per optimiser step. The optimiser and scheduler are passed to DeepSpeed as objects, so no `optimizer`
    or `scheduler` section is written (`zero_allow_untested_optimizer` lets ZeRO take torch's AdamW).
    `world` is the number of ranks; the stage is `effective_zero_stage`'s."""
    if micro_batch_size < 1 or grad_accum < 1:
        raise ConfigError(
            f"deepspeed_config: micro_batch_size={micro_batch_size} and grad_accum={grad_accum} must both be "
            f">= 1 (see trainer.micro_batch_size and algorithm.mini_batch_size)"
        )
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(
            f"deepspeed_config: dtype={dtype} is not supported: train in float32 or bfloat16 (model.dtype)"
        )
    stage = effective_zero_stage(trainer_cfg, world)
    if trainer_cfg.offload_params and stage != 3:
        raise ConfigError(
            f"trainer.offload_params=true needs ZeRO stage 3 (trainer.zero_stage={stage}): parameters are only "
            f"partitioned, and so can only be offloaded, under stage 3; set trainer.zero_stage=3 or "
            f"trainer.offload_params=false"
        )
    if trainer_cfg.offload_optimizer and stage == 0:
        raise ConfigError(
            "trainer.offload_optimizer=true needs ZeRO stage 1, 2 or 3 (trainer.zero_stage=0); "
            "set trainer.zero_stage=2 or trainer.offload_optimizer=false"
        )
    zero: dict[str, Any] = {"stage": stage}
    if trainer_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if trainer_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Parameters below this many elements stay whole on every rank (norms, biases); DeepSpeed's default
        # (1e5) would leave every weight of a small model unpartitioned, so ZeRO-3 would change nothing.
        zero["stage3_param_persistence_threshold"] = trainer_cfg.param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": trainer_cfg.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # with the optimiser offloaded, DeepSpeed refuses anything but its CPU Adam (`optimizer_kind`)
        "zero_force_ds_cpu_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@dataclass(frozen=True)
class OffloadPlan:
    """What `offload_states` moves to CPU memory while the engines generate, and why the rest stays.

    `engine_states`: `OffloadStateTypeEnum` values handed to DeepSpeed's `engine.offload_states`;
    `adamw_states`: move torch AdamW's moments and the fp32 master partition with DeepSpeed's own
    `offload_adam_states` (ZeRO-3's `offload_states` asserts DeepSpeed's FusedAdam for those two:
    runtime/zero/stage3.py `offload_states`, and FusedAdam needs a CUDA compiler at run time);
    `note`: one line for the log."""

    engine_states: tuple[str, ...]
    adamw_states: bool
    note: str

    @property
    def moves_anything(self) -> bool:
        return bool(self.engine_states) or self.adamw_states


def rollout_offload_plan(trainer_cfg: TrainerConfig, stage: int, on_gpu: bool) -> OffloadPlan:
    """The `OffloadPlan` of a rank running ZeRO `stage`, on a GPU or not (DeepSpeed 0.19.8's rules)."""
    if not on_gpu:
        return OffloadPlan((), False, "CPU rank: the states already live in CPU memory; nothing moved")
    if stage == 0:
        return OffloadPlan(
            (),
            False,
            "ZeRO stage 0: DeepSpeed moves states only for its ZeRO optimisers; set trainer.zero_stage to 1-3 "
            "to offload during the rollout",
        )
    if trainer_cfg.offload_params:
        # engine.offload_states asserts that parameters are not offloaded; they and (with offload_optimizer)
        # the optimiser state are in CPU memory already, so only the gathered-parameter cache is released
        return OffloadPlan(
            (), False, "offload_params: parameters already in CPU memory; partition cache freed"
        )
    if trainer_cfg.offload_optimizer:  # CPU Adam: optimiser state and fp32 master weights are in CPU memory
        states = ("contiguous_grad_buffer",) if stage == 3 else ("lp_grads",)
        return OffloadPlan(
            states, False, f"offload_optimizer: optimiser state already in CPU memory; moved {states}"
        )
    if stage == 3:
        states = ("lp_grads", "contiguous_grad_buffer")
        return OffloadPlan(states, True, f"moved AdamW moments, fp32 master partition and {states}")
    states = ("optim_states", "hp_params", "lp_grads")
    return OffloadPlan(states, False, f"moved {states}")
