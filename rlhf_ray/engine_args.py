"""The arguments of one vLLM engine, resolved from the config and from whether the engine's own process
has a GPU (`rlhf_ray.runtime.has_gpu()` in the engine actor; passed in here, so this stays pure and a test
can resolve the GPU settings on a machine without one).

What differs between CPU and GPU, and why (vLLM 0.32):
- dtype 'auto': bfloat16 on GPU, float32 on CPU (bf16 matmuls are slow on most CPUs);
- `enforce_eager`: CUDA graphs on GPU (vLLM's and the peers' default); on CPU there is nothing to capture;
- KV cache: on CPU a fixed size out of system memory (`rollout.kv_cache_gib`, 1 GiB when null); on GPU
  vLLM sizes it from `gpu_memory_utilization` unless `rollout.kv_cache_gib` is given;
- `gpu_memory_utilization`: the share of the GPU one engine may take; vLLM demands it free at start-up, so
  an engine sharing its GPU with a trainer rank (placement.mode=colocate) asks for less;
- sleep mode (free weights and KV cache while the trainer works): GPUs only (vLLM: CUDA, ROCm, XPU).

Sampling seeds (`rollout.sampling_seeds`) are resolved here too, since the same reasoning applies: see
`per_sample_seeds`.
"""

from __future__ import annotations

from typing import Any

from rlhf_ray.config import ConfigError, RLHFConfig

CPU_KV_CACHE_GIB = 1.0  # KV cache of a CPU engine when rollout.kv_cache_gib is null
GPU_MEMORY_UTILIZATION = 0.85  # an engine with GPUs of its own
GPU_MEMORY_UTILIZATION_COLOCATED = 0.4  # an engine sharing its GPU with a trainer rank


def engine_dtype(name: str, gpu: bool) -> str:
    """vLLM's `dtype` for `model.dtype` = `name`: 'auto' is bfloat16 on GPU and float32 on CPU (the rule
    of `rlhf_ray.runtime.resolve_dtype`, with the engine's device given rather than detected)."""
    if name == "auto":
        return "bfloat16" if gpu else "float32"
    return name


def sleep_enabled(cfg: RLHFConfig, gpu: bool) -> bool:
    """Whether the engine runs with vLLM's sleep mode (`enable_sleep_mode`), so that it can free its GPU
    memory (`sleep`) while the trainer works and take it back (`wake_up`) to generate.

    `rollout.sleep` when set; null: only when the engine shares GPUs with the trainer (placement.mode=
    colocate), where both cannot hold their memory at once. Never for the transformers engine (sleep mode is
    vLLM's). vLLM 0.32 refuses sleep mode off CUDA/ROCm/XPU (`ModelConfig.__post_init__`: "Sleep mode is not
    supported on current platform"; its CPU worker's sleep would do nothing anyway), so `rollout.sleep=true`
    on an engine without a GPU is a config error.
    """
    r = cfg.rollout
    if r.engine != "vllm":
        return False
    if r.sleep is None:
        return gpu and cfg.placement.mode == "colocate"
    if r.sleep and not gpu:
        raise ConfigError(
            f"rollout.sleep=true: vLLM's sleep mode frees GPU memory and needs a GPU (vLLM refuses it on the "
            f"CPU), but this engine has no GPU (placement.rollout.num_gpus="
            f"{cfg.placement.rollout.num_gpus}); set rollout.sleep=null (it sleeps only when colocated on "
            f"GPUs) or give the engines GPUs (placement.rollout.num_gpus=1)"
        )
    return r.sleep


def engines_sleep(cfg: RLHFConfig) -> bool:
    """`sleep_enabled` decided on the driver, from the GPUs the placement gives the engines: their own,
    or a share of the policy ranks' when colocated."""
    place = cfg.placement
    gpus = place.policy.num_gpus if place.mode == "colocate" else place.rollout.num_gpus
    return sleep_enabled(cfg, gpus > 0)


def per_sample_seeds(cfg: RLHFConfig, gpu: bool) -> bool:
    """Whether each sample of a call gets its own seed (`rollout.sampling_seeds`).

    per_sample: sample i of a call seeded with `seed` draws from f(seed, i), so it is the same however vLLM
    batches the call, at the cost of one generator per request in vLLM's V1 sampler. per_call: the requests
    are unseeded and draw from the engine process's global generators, which the engine seeds with the
    call's seed just before generating, so the same call on the same engine repeats. auto: per_sample on
    CPU (the tests compare samples across calls), per_call on GPU (throughput; the peers seed per engine).
    """
    mode = cfg.rollout.sampling_seeds
    if mode == "auto":
        return not gpu
    return mode == "per_sample"


def gpu_memory_utilization(cfg: RLHFConfig) -> float:
    """The GPU memory share of one engine: `rollout.gpu_memory_utilization`, else 0.85 with GPUs of its
    own and 0.4 when colocated with the trainer (whose weights, gradients and optimizer states need the
    rest; vLLM demands the share free at start-up, even when the KV cache size is given)."""
    value = cfg.rollout.gpu_memory_utilization
    if value is not None:
        return value
    return GPU_MEMORY_UTILIZATION_COLOCATED if cfg.placement.mode == "colocate" else GPU_MEMORY_UTILIZATION


def engine_args(cfg: RLHFConfig, tokenizer_path: str, gpu: bool, rank: int) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` (= `vllm.EngineArgs`) for engine `rank`, whose process has a
    GPU when `gpu`. The engine's seed is `run.seed + rank`, one per engine as OpenRLHF seeds them, so that
    engines differ in every draw that no call seed fixes."""
    r = cfg.rollout
    enforce_eager = r.enforce_eager if r.enforce_eager is not None else not gpu
    args: dict[str, Any] = {
        "model": cfg.model.policy_path,
        "tokenizer": tokenizer_path,
        "dtype": engine_dtype(cfg.model.dtype, gpu),
        "enforce_eager": enforce_eager,
        "max_model_len": cfg.data.max_prompt_len + r.max_new_tokens,
        "enable_prefix_caching": r.enable_prefix_caching,
        "tensor_parallel_size": r.tensor_parallel_size,
        "seed": cfg.run.seed + rank,
        # log-probs of the distribution sampled from (after temperature), as the trainer computes them
        "logprobs_mode": "processed_logprobs",
        "enable_sleep_mode": sleep_enabled(cfg, gpu),
    }
    if gpu:
        args["gpu_memory_utilization"] = gpu_memory_utilization(cfg)
        if r.kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(r.kv_cache_gib * 2**30)
    else:
        args["kv_cache_memory_bytes"] = int((r.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
    if r.max_num_seqs is not None:
        args["max_num_seqs"] = r.max_num_seqs
    if r.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = r.max_num_batched_tokens
    return args
