"""The GPU memory plan of an RL run: for each GPU, what each role placed on it needs (weights, gradients,
optimizer states, activations, vLLM's share) and whether it fits; exits 1 naming the GPU, the roles and the
keys to change when it does not. Reads only the models' config.json (no weights, no Ray, no GPU).

python -m jobs.plan --config jobs/configs/gpu_1x8_colocate.yaml [--gpu-memory-gib 80] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from actors.placement import layout
from jobs.common import config_epilog
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.memory_plan import MemoryPlan, format_plan, model_shapes, plan_memory


def build_plan(cfg: RLHFConfig, gpu_memory_gib: float = 80.0, gpus_per_node: int = 8) -> MemoryPlan:
    """The memory plan of `cfg`'s placement layout, with the shapes read from its model paths."""
    bundles, slots = layout(cfg)
    shapes = model_shapes(cfg, need_critic=bool(slots["critic"]))
    return plan_memory(cfg, bundles, slots, shapes, gpu_memory_gib, gpus_per_node)


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
