"""The DeepSpeed configuration of a trainer rank, built from `TrainerConfig`: a pure function, so the dict
a run uses can be read and tested without starting DeepSpeed.

Precision follows the model's dtype (bf16 when the weights are bfloat16, plain fp32 otherwise; fp16 is
never used: DeepSpeed refuses it on CPU and bf16 needs no loss scaling). Gradient accumulation is driven
by the trainer itself (it marks the accumulation boundary and weights each micro-batch's loss), so
`grad_accum` here only keeps DeepSpeed's batch bookkeeping consistent.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ray.config import ConfigError, TrainerConfig


def effective_zero_stage(trainer_cfg: TrainerConfig, world: int) -> int:
    """The ZeRO stage a group of `world` ranks runs. ZeRO partitions optimiser state, gradients and
    parameters ACROSS ranks: one rank has nothing to partition, so stages 1-3 do the same update as stage 0
    with extra bookkeeping (one SmolLM2-135M training pass on CPU: ZeRO-2 25% slower than ZeRO-0, see
    bench/train_step.py). A single rank therefore runs stage 0, unless offloading asks for stage >= 1."""
    if world == 1 and not (trainer_cfg.offload_optimizer or trainer_cfg.offload_params):
        return 0
    return trainer_cfg.zero_stage


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
        zero["stage3_param_persistence_threshold"] = 4096
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": trainer_cfg.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # torch's AdamW is used with optimizer offload too (DeepSpeedCPUAdam would compile an extra op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
