"""Where code runs: device, dtype, torch.distributed backend and thread counts, chosen from the
resources a process was given. One code path for CPU and GPU: callers ask here instead of branching."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROJECT_CACHE_ENV = "RLHF_RAY_CACHE"


def assigned_gpus() -> list[int] | None:
    """The GPU ids Ray gave this process when it is a Ray actor (empty: it asked for none), None otherwise
    (a driver, a test, a script outside Ray: those use what the machine shows)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return [int(g) for g in ray.get_gpu_ids()]


def has_gpu() -> bool:
    """Whether this process computes on a GPU: a Ray actor only with GPUs of its own (a role given
    `num_gpus=0` runs on the CPU even on a GPU node), anything else when CUDA is available."""
    return choose_device(assigned_gpus(), torch.cuda.is_available(), 0, 1).type == "cuda"


def choose_device(
    gpu_ids: list[int] | None, cuda_available: bool, local_rank: int, visible: int
) -> torch.device:
    """The device of a process from what it was given: the CPU without CUDA or when Ray gave it no GPU;
    else CUDA device `local_rank` among the `visible` ones (Ray sets CUDA_VISIBLE_DEVICES to the actor's
    own GPUs, so a rank with one GPU is always cuda:0 in its process)."""
    if not cuda_available or gpu_ids == [] or visible < 1:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % visible)


def device_local_rank(gpu_ids: list[int] | None, node_local_rank: int) -> int:
    """The `LOCAL_RANK` a trainer rank's process must carry: DeepSpeed takes it as a CUDA device index
    (`zero.Init` places parameters on `cuda:LOCAL_RANK`). Ray shows a GPU actor only its own GPUs
    (CUDA_VISIBLE_DEVICES), so there the index is 0, whatever the rank's place on its node; a process
    outside Ray, or on the CPU, keeps its place on the node (as OpenRLHF does)."""
    return 0 if gpu_ids else node_local_rank


def device() -> torch.device:
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return choose_device(assigned_gpus(), cuda, local_rank, torch.cuda.device_count() if cuda else 0)


def dist_backend() -> str:
    return "nccl" if has_gpu() else "gloo"


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 on GPU and float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if has_gpu() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def set_threads(num_cpus: float | None) -> int:
    """Size torch's intra-op pool to the CPUs this process was given (oversubscribing 2 cores is slow)."""
    n = max(1, int(num_cpus or os.cpu_count() or 1))
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def set_actor_threads(requested: int | None = None) -> int:
    """Size a Ray actor's torch pool: `requested` (`placement.<role>.num_threads`), else the CPUs Ray
    assigned the actor, else the machine's cores."""
    cpus = None
    if requested is None:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return set_threads(requested or cpus)


def setup_process_env() -> None:
    """Environment every rlhf_ray process (driver and actors) needs before importing DeepSpeed/vLLM:
    caches inside the project cache dir, no hub access, DeepSpeed's accelerator matching the device."""
    cache = Path(os.environ.get(PROJECT_CACHE_ENV, Path.cwd() / ".cache")).resolve()
    os.environ.setdefault(PROJECT_CACHE_ENV, str(cache))
    defaults = {
        "HF_HOME": cache / "hf",
        "TORCH_EXTENSIONS_DIR": cache / "torch_extensions",
        "VLLM_CACHE_ROOT": cache / "vllm",
        "TRITON_CACHE_DIR": cache / "triton",
        "MPLCONFIGDIR": cache / "matplotlib",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, str(value))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in the actor's own process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs every weight reload at INFO
    accelerator = ds_accelerator(has_gpu(), os.environ.get("DS_ACCELERATOR"))
    if accelerator is None:
        os.environ.pop("DS_ACCELERATOR", None)
    else:
        os.environ["DS_ACCELERATOR"] = accelerator
    clear_stale_extension_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))


def ds_accelerator(gpu: bool, current: str | None) -> str | None:
    """DeepSpeed's accelerator (`DS_ACCELERATOR`) for a process with or without a GPU of its own: 'cpu'
    without one; with one, whatever the user set, except an inherited 'cpu' (None: DeepSpeed detects
    CUDA). It follows the process's own resources, never another process's: a driver on a CPU-only head
    must not turn GPU ranks into CPU ranks, so `runtime_env_vars` never forwards it."""
    if not gpu:
        return "cpu"
    return None if current == "cpu" else current


def clear_stale_extension_locks(extensions_dir: Path, min_age_s: float = 120.0) -> list[Path]:
    """Remove the build lock of a torch extension that is already built. A process killed while holding
    the lock (torch's FileBaton) leaves it behind, and every later DeepSpeed start waits on it forever;
    once the extension's .so exists and the lock is older than `min_age_s`, no build can own it."""
    removed = []
    for lock in extensions_dir.glob("*/lock") if extensions_dir.is_dir() else ():
        try:
            built = any(lock.parent.glob("*.so"))
            if built and time.time() - lock.stat().st_mtime > min_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            pass  # another process cleared it first
    return removed


def runtime_env_vars() -> dict[str, str]:
    """The variables of `setup_process_env` to hand to Ray actors and jobs (`runtime_env={'env_vars':...}`)."""
    setup_process_env()
    keys = [
        PROJECT_CACHE_ENV,
        "HF_HOME",
        "TORCH_EXTENSIONS_DIR",
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "MPLCONFIGDIR",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "RAY_USAGE_STATS_ENABLED",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
        "VLLM_LOGGING_LEVEL",
    ]
    return {k: os.environ[k] for k in keys if k in os.environ}
