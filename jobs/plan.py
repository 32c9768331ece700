"""The GPU memory plan of an RL run: for each GPU, what each role placed on it needs (weights, gradients,
optimizer states, activations, vLLM's share) and whether it fits; exits 1 naming the GPU, the roles and the
keys to change when it does not. Reads only the models' config.json (no weights, no Ray, no GPU).

python -m jobs.plan --config jobs/configs/gpu_1x8_colocate.yaml [--gpu-memory-gib 80] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from actors.placement import layout
from jobs.common import config_epilog
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.memory_plan import MemoryPlan, format_plan, model_shapes, plan_memory

log = logging.getLogger(__name__)


def build_plan(cfg: RLHFConfig, gpu_memory_gib: float = 80.0, gpus_per_node: int = 8) -> MemoryPlan:
    """The memory plan of `cfg`'s placement layout, with the shapes read from its model paths."""
    bundles, slots = layout(cfg)
    shapes = model_shapes(cfg, need_critic=bool(slots["critic"]))
    return plan_memory(cfg, bundles, slots, shapes, gpu_memory_gib, gpus_per_node)


def gpu_memory_of_cluster(timeout_s: float = 60.0) -> float | None:
    """GiB of one GPU of the connected Ray cluster, read by a task given a sliver of a GPU; None when the
    cluster has no GPU, when CUDA cannot report it (Ray's simulated GPUs) or when no GPU is free."""
    import ray

    if ray.cluster_resources().get("GPU", 0) <= 0:
        return None

    @ray.remote(num_gpus=0.01, num_cpus=0)
    def total_memory() -> int | None:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None

    ref = total_memory.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    total = ray.get(ref)
    return None if total is None else total / 2**30


def check_at_start(cfg: RLHFConfig, gpu_memory_gib: float | None = None) -> MemoryPlan | None:
    """The memory plan, checked when an RL job starts on a cluster with GPUs (before any role starts):
    a layout that cannot fit fails here, naming the GPU, the roles and the keys, instead of as an
    out-of-memory error minutes into the run. GPU memory is measured unless given; GPUs per node are the
    most any node has. Nothing to check without GPUs."""
    import ray

    gpus_per_node = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if gpus_per_node <= 0:
        return None
    gib = gpu_memory_gib or gpu_memory_of_cluster()
    if gib is None:
        log.warning("memory plan skipped: the size of the cluster's GPUs could not be read")
        return None
    plan = build_plan(cfg, gib, int(gpus_per_node))
    plan.check()
    return plan


def main(argv: list[str] | None = None) -> MemoryPlan:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/gpu_*.yaml)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of each GPU (default 80)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of each node (default 8)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.zero_stage=3")
    args = parser.parse_args(argv)
    if args.gpu_memory_gib <= 0 or args.gpus_per_node < 1:
        parser.error("--gpu-memory-gib must be > 0 and --gpus-per-node >= 1")
    try:
        cfg = RLHFConfig.from_yaml(args.config, args.overrides)
        plan = build_plan(cfg, args.gpu_memory_gib, args.gpus_per_node)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    print(format_plan(plan))
    if not plan.gpus:
        print("no role asks for a GPU (placement.<role>.num_gpus): nothing to plan")
    try:
        plan.check()
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    return plan


if __name__ == "__main__":
    main()
