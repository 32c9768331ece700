"""The vLLM engine arguments come from one pure function (`rlhf_ray.engine_args`), resolved from the config
and whether the engine's process has a GPU. Each setting is checked twice: by hand, and by vLLM itself,
which builds its full engine config from the arguments (`EngineArgs(**args).create_engine_config()`: a
renamed or invalid argument fails there). That needs no CUDA: vLLM reads the model's config, not its
weights, and only sleep mode is refused on the CPU platform (see `test_vllm_refuses_sleep_mode_off_cuda`),
so the GPU settings are built here with it turned off and its value checked by hand."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.engine_args import engine_args, per_sample_seeds, sleep_enabled

pytestmark = pytest.mark.timeout(300)

GIB = 2**30


def make_cfg(model_dir: str = "/models/policy", **sections: dict) -> RLHFConfig:
    base: dict = {
        "model": {"policy_path": str(model_dir)},
        "data": {"max_prompt_len": 48},
        "rollout": {"max_new_tokens": 16},
        "run": {"seed": 5},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return RLHFConfig.from_dict(base)


COMMON = {
    "model": "/models/policy",
    "tokenizer": "/models/tok",
    "max_model_len": 64,  # data.max_prompt_len + rollout.max_new_tokens
    "enable_prefix_caching": True,
    "tensor_parallel_size": 1,
    "logprobs_mode": "processed_logprobs",
}


# ---- resolved by hand --------------------------------------------------------------------------------
def test_cpu_defaults():
    for mode in ("separate", "colocate"):  # colocation changes nothing without GPUs
        args = engine_args(make_cfg(placement={"mode": mode}), "/models/tok", gpu=False, rank=2)
        assert args == {
            **COMMON,
            "dtype": "float32",
            "enforce_eager": True,
            "seed": 7,  # run.seed + rank
            "enable_sleep_mode": False,
            "kv_cache_memory_bytes": 1 * GIB,  # no gpu_memory_utilization: vLLM's CPU cache is sized by bytes
        }


def test_gpu_defaults_separate_and_colocated():
    separate = engine_args(make_cfg(), "/models/tok", gpu=True, rank=0)
    assert separate == {
        **COMMON,
        "dtype": "bfloat16",
        "enforce_eager": False,  # CUDA graphs
        "seed": 5,
        "enable_sleep_mode": False,
        "gpu_memory_utilization": 0.85,  # and no KV cache size: vLLM fills what that share leaves
    }
    colocated = engine_args(make_cfg(placement={"mode": "colocate"}), "/models/tok", gpu=True, rank=1)
    assert colocated == {
        **COMMON,
        "dtype": "bfloat16",
        "enforce_eager": False,
        "seed": 6,
        "enable_sleep_mode": True,  # the trainer needs the memory while the engine is idle
        "gpu_memory_utilization": 0.4,
    }


def test_explicit_values_win():
    rollout = {
        "kv_cache_gib": 2.5,
        "gpu_memory_utilization": 0.6,
        "max_num_seqs": 96,
        "max_num_batched_tokens": 4096,
        "enable_prefix_caching": False,
        "sleep": False,
    }
    cfg = make_cfg(
        model={"dtype": "float32"}, rollout={**rollout, "enforce_eager": True}, placement={"mode": "colocate"}
    )
    gpu = engine_args(cfg, "/models/tok", gpu=True, rank=3)
    assert gpu == {
        **COMMON,
        "enable_prefix_caching": False,
        "dtype": "float32",
        "enforce_eager": True,
        "seed": 8,
        "enable_sleep_mode": False,
        "gpu_memory_utilization": 0.6,
        "kv_cache_memory_bytes": int(2.5 * GIB),
        "max_num_seqs": 96,
        "max_num_batched_tokens": 4096,
    }
    cfg = make_cfg(model={"dtype": "bfloat16"}, rollout={**rollout, "enforce_eager": False})
    cpu = engine_args(cfg, "/models/tok", gpu=False, rank=0)
    assert cpu == {
        **COMMON,
        "enable_prefix_caching": False,
        "dtype": "bfloat16",
        "enforce_eager": False,
        "seed": 5,
        "enable_sleep_mode": False,
        "kv_cache_memory_bytes": int(2.5 * GIB),  # gpu_memory_utilization means nothing on the CPU
        "max_num_seqs": 96,
        "max_num_batched_tokens": 4096,
    }


def test_sleep_mode_resolution():
    colocate = {"mode": "colocate"}
    assert sleep_enabled(make_cfg(placement=colocate), gpu=True)
    assert not sleep_enabled(make_cfg(placement=colocate), gpu=False)  # null: nothing to free on the CPU
    assert not sleep_enabled(make_cfg(), gpu=True)  # GPUs of its own: keep the memory
    assert sleep_enabled(make_cfg(rollout={"sleep": True}), gpu=True)
    assert not sleep_enabled(make_cfg(rollout={"sleep": False}, placement=colocate), gpu=True)
    assert not sleep_enabled(make_cfg(rollout={"engine": "hf"}, placement=colocate), gpu=True)  # vLLM's only
    assert not sleep_enabled(make_cfg(rollout={"sleep": False}), gpu=False)


def test_sleep_without_a_gpu_is_a_config_error():
    cfg = make_cfg(rollout={"sleep": True})
    with pytest.raises(ConfigError, match=r"rollout\.sleep=true.*no GPU.*rollout\.sleep=null") as err:
        sleep_enabled(cfg, gpu=False)
    assert "placement.rollout.num_gpus" in str(err.value)
    with pytest.raises(ConfigError, match=r"rollout\.sleep=true"):
        engine_args(cfg, "/models/tok", gpu=False, rank=0)


def test_sampling_seeds_resolution():
    assert per_sample_seeds(make_cfg(), gpu=False)  # auto: per_sample on CPU
    assert not per_sample_seeds(make_cfg(), gpu=True)  # auto: per_call on GPU
    for gpu in (False, True):
        assert per_sample_seeds(make_cfg(rollout={"sampling_seeds": "per_sample"}), gpu=gpu)
        assert not per_sample_seeds(make_cfg(rollout={"sampling_seeds": "per_call"}), gpu=gpu)


# ---- built by vLLM ---------------------------------------------------------------------------------
SETTINGS = {
    "cpu-separate": ({}, False),
    "cpu-colocate": ({"placement": {"mode": "colocate"}}, False),
    "gpu-separate": ({}, True),
    "gpu-colocate": ({"placement": {"mode": "colocate"}}, True),
    "gpu-explicit": (
        {
            "rollout": {
                "kv_cache_gib": 3.0,
                "gpu_memory_utilization": 0.7,
                "enforce_eager": True,
                "max_num_seqs": 64,
                "max_num_batched_tokens": 2048,
            }
        },
        True,
    ),
    "cpu-explicit": (
        {"rollout": {"kv_cache_gib": 0.5, "max_num_seqs": 32, "max_num_batched_tokens": 512}},
        False,
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_vllm_builds_its_engine_config_from_the_arguments(name, tiny_model_dir):
    from vllm import EngineArgs

    sections, gpu = SETTINGS[name]
    cfg = make_cfg(tiny_model_dir, **sections)
    args = engine_args(cfg, str(tiny_model_dir), gpu=gpu, rank=1)
    assert args["enable_sleep_mode"] == (name == "gpu-colocate")
    engine = EngineArgs(**{**args, "enable_sleep_mode": False})  # a renamed or unknown argument: TypeError
    vc = engine.create_engine_config()  # vLLM's own checks of every value
    mc, cc, sc = vc.model_config, vc.cache_config, vc.scheduler_config
    assert mc.model == str(tiny_model_dir) and mc.tokenizer == str(tiny_model_dir)
    assert mc.dtype == (torch.bfloat16 if gpu else torch.float32)
    assert mc.enforce_eager == args["enforce_eager"]
    assert mc.max_model_len == 64
    assert mc.seed == 6
    assert mc.logprobs_mode == "processed_logprobs"
    assert cc.enable_prefix_caching is True
    assert cc.kv_cache_memory_bytes == args.get("kv_cache_memory_bytes")
    if gpu:
        assert cc.gpu_memory_utilization == args["gpu_memory_utilization"]
    assert vc.parallel_config.tensor_parallel_size == 1
    if "max_num_seqs" in args:
        assert sc.max_num_seqs == args["max_num_seqs"]
        assert sc.max_num_batched_tokens == args["max_num_batched_tokens"]


def test_vllm_refuses_sleep_mode_off_cuda(tiny_model_dir):
    """Why `rollout.sleep=true` without a GPU is a config error: vLLM 0.32 refuses sleep mode on any
    platform but CUDA/ROCm/XPU (`ModelConfig.__post_init__`, `Platform.is_sleep_mode_available`). If a
    later vLLM lifts this, the error in `sleep_enabled` should be revisited."""
    from vllm import EngineArgs

    with pytest.raises(ValueError, match="Sleep mode is not supported"):
        EngineArgs(model=str(tiny_model_dir), enable_sleep_mode=True).create_engine_config()
