"""deepspeed_config: the DeepSpeed dict built from TrainerConfig (pure; no DeepSpeed started)."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ConfigError, TrainerConfig
from rlhf_ray.deepspeed_config import (
    deepspeed_config,
    effective_zero_stage,
    optimizer_kind,
    rollout_offload_plan,
    set_learning_rate,
)


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
    assert zero["stage3_param_persistence_threshold"] == 4096  # small models are partitioned too
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_force_ds_cpu_optimizer"] is True  # DeepSpeed's CPU Adam with an offloaded optimizer
    assert optimizer_kind(tc) == "cpu_adam" and optimizer_kind(TrainerConfig()) == "adamw"


def test_persistence_threshold_comes_from_the_config():
    tc = TrainerConfig(zero_stage=3, param_persistence_threshold=123)
    assert (
        deepspeed_config(tc, torch.float32, 1, 1, 2)["zero_optimization"][
            "stage3_param_persistence_threshold"
        ]
        == 123
    )


def _combinations():
    for dtype in (torch.float32, torch.bfloat16):
        for stage in (0, 1, 2, 3):
            for opt in (False, True):
                for params in (False, True):
                    if (opt and stage == 0) or (params and stage != 3):
                        continue  # refused by deepspeed_config (test_offload_needs_a_partitioning_stage)
                    yield dtype, stage, opt, params


@pytest.mark.parametrize(("dtype", "stage", "offload_optimizer", "offload_params"), list(_combinations()))
def test_deepspeed_parses_every_combination(dtype, stage, offload_optimizer, offload_params):
    """DeepSpeed's own parser (the class `deepspeed.initialize` builds from the dict; no process group
    needed: it then takes world size 1, which only scales the derived train_batch_size) accepts every
    precision x stage x offload combination, and reads back what was meant; the optimiser chosen is the
    one DeepSpeed demands (its CPU Adam exactly when the optimiser state is offloaded)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    tc = TrainerConfig(
        zero_stage=stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        param_persistence_threshold=777,
    )
    parsed = DeepSpeedConfig(deepspeed_config(tc, dtype, micro_batch_size=2, grad_accum=3, world=2))
    assert parsed.zero_optimization_stage == stage
    assert parsed.zero_enabled == (stage > 0)
    assert parsed.bfloat16_config.enabled == (dtype == torch.bfloat16)
    assert not parsed.float16_config.enabled
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (2, 3)
    assert parsed.train_batch_size == 2 * 3 * parsed.world_size
    zero = parsed.zero_config
    offloaded_opt = (
        zero.offload_optimizer is not None and zero.offload_optimizer.device == OffloadDeviceEnum.cpu
    )
    offloaded_par = zero.offload_param is not None and zero.offload_param.device == OffloadDeviceEnum.cpu
    assert (offloaded_opt, offloaded_par) == (offload_optimizer, offload_params)
    if stage == 3:
        assert zero.param_persistence_threshold == 777
    assert parsed.zero_force_ds_cpu_optimizer is True and parsed.zero_allow_untested_optimizer is True
    assert optimizer_kind(tc) == ("cpu_adam" if offloaded_opt else "adamw")


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
        (TrainerConfig(zero_stage=3, offload_during_rollout=True), 1, 3),  # DeepSpeed offloads ZeRO states
    ],
)
def test_a_single_rank_runs_stage_0_unless_it_offloads(trainer, world, stage):
    assert effective_zero_stage(trainer, world) == stage
    assert deepspeed_config(trainer, torch.float32, 1, 1, world)["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize(
    ("trainer", "stage", "on_gpu", "engine_states", "adamw"),
    [
        (TrainerConfig(zero_stage=3), 3, False, (), False),  # CPU rank: a recorded no-op
        (TrainerConfig(zero_stage=0), 0, True, (), False),  # no ZeRO optimiser to move
        (TrainerConfig(zero_stage=2), 2, True, ("optim_states", "hp_params", "lp_grads"), False),
        (TrainerConfig(zero_stage=3), 3, True, ("lp_grads", "contiguous_grad_buffer"), True),
        (TrainerConfig(zero_stage=3, offload_optimizer=True), 3, True, ("contiguous_grad_buffer",), False),
        (TrainerConfig(zero_stage=2, offload_optimizer=True), 2, True, ("lp_grads",), False),
        (TrainerConfig(zero_stage=3, offload_params=True), 3, True, (), False),  # DeepSpeed refuses it
    ],
)
def test_rollout_offload_plan(trainer, stage, on_gpu, engine_states, adamw):
    """Every state name is one DeepSpeed 0.19.8 knows, and the plan follows its rules (see the function)."""
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

    plan = rollout_offload_plan(trainer, stage, on_gpu)
    assert plan.engine_states == engine_states and plan.adamw_states is adamw
    assert plan.moves_anything == bool(engine_states or adamw) and plan.note
    for name in plan.engine_states:
        OffloadStateTypeEnum(name)


def _optimiser(lr: float, warmup: int = 4) -> torch.optim.lr_scheduler.LambdaLR:
    """The rank's optimiser and scheduler (two groups, linear warm-up), on a tiny model."""
    model = torch.nn.Linear(2, 2)
    groups = [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def _train(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("new_lr", [1e-3, 5e-4])
def test_a_resumed_rank_trains_at_the_configs_learning_rate(new_lr):
    saved = _optimiser(1e-3)
    _train(saved, 2)  # mid warm-up
    resumed = _optimiser(new_lr)  # built from the new config, then the checkpoint's states loaded
    resumed.optimizer.load_state_dict(saved.optimizer.state_dict())
    resumed.load_state_dict(saved.state_dict())
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [
        1e-3 * (3 / 4)
    ] * 2  # torch restores the saved rate

    assert set_learning_rate(resumed, new_lr) == 1e-3
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [new_lr * (3 / 4)] * 2  # still warming up
    _train(saved, 3)
    _train(resumed, 3)  # warm-up ends after step 4: the full new rate
    assert resumed.base_lrs == [new_lr] * 2
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [new_lr] * 2 == resumed.get_last_lr()
    if new_lr == 1e-3:  # the same rate: the same schedule as the run that never stopped, bit for bit
        assert resumed.state_dict() == saved.state_dict()
        assert resumed.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"]
