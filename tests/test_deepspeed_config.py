"""deepspeed_config: the DeepSpeed dict built from TrainerConfig (pure; no DeepSpeed started)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ConfigError, TrainerConfig
from rlhf_ray.deepspeed_config import deepspeed_config, effective_zero_stage


def test_defaults_fp32_zero2():
    cfg = deepspeed_config(TrainerConfig(), torch.float32, micro_batch_size=4, grad_accum=2, world=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg  # passed to deepspeed.initialize as objects


def test_bf16_follows_the_dtype():
    assert deepspeed_config(TrainerConfig(), torch.bfloat16, 1, 1, 2)["bf16"] == {"enabled": True}


def test_zero3_with_offload():
    tc = TrainerConfig(zero_stage=3, offload_optimizer=True, offload_params=True, grad_clip=0.5)
    cfg = deepspeed_config(tc, torch.float32, 2, 1, 2)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] < 100_000  # small models are partitioned too
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with an offloaded optimizer


@pytest.mark.parametrize(
    ("trainer", "match"),
    [
        (TrainerConfig(zero_stage=2, offload_params=True), "offload_params=true needs ZeRO stage 3"),
        (TrainerConfig(zero_stage=0, offload_optimizer=True), "offload_optimizer=true needs ZeRO stage"),
    ],
)
def test_offload_needs_a_partitioning_stage(trainer, match):
    with pytest.raises(ConfigError, match=match):
        deepspeed_config(trainer, torch.float32, 1, 1, 2)


def test_bad_sizes_and_dtypes_fail_clearly():
    with pytest.raises(ConfigError, match="micro_batch_size=0"):
        deepspeed_config(TrainerConfig(), torch.float32, 0, 1, 2)
    with pytest.raises(ConfigError, match="float16"):
        deepspeed_config(TrainerConfig(), torch.float16, 1, 1, 2)


@pytest.mark.parametrize(
    ("trainer", "world", "stage"),
    [
        (TrainerConfig(zero_stage=2), 1, 0),  # one rank: nothing to partition
        (TrainerConfig(zero_stage=3), 1, 0),
        (TrainerConfig(zero_stage=2), 2, 2),
        (TrainerConfig(zero_stage=3), 4, 3),
        (TrainerConfig(zero_stage=2, offload_optimizer=True), 1, 2),  # offload needs a partitioning stage
        (TrainerConfig(zero_stage=3, offload_params=True), 1, 3),
    ],
)
def test_a_single_rank_runs_stage_0_unless_it_offloads(trainer, world, stage):
    assert effective_zero_stage(trainer, world) == stage
    assert deepspeed_config(trainer, torch.float32, 1, 1, world)["zero_optimization"]["stage"] == stage
