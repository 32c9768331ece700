"""The GPU check: one command that shows whether the GPU path works on a machine with GPUs.

SmolLM2-135M-Instruct, GRPO in bf16, a few steps in each layout a user runs: separate placement with
either weight-sync transport, colocated placement with vLLM's sleep mode and the optimizer states
offloaded during generation, ZeRO-2 and ZeRO-3. For each: does it start; do the synced engine's log-probs
match the trainer's; does the reward move; the time of each phase of a step; the peak memory of each GPU
(nvidia-smi, sampled). Writes `bench/results/gpu_check.json` and prints a pass/fail table. A layout that
needs more GPUs than the machine has is reported as skipped, with the count it needs.

`--dry-run` needs no GPU (CI runs it): for every layout it validates the config, places the roles on the
GPUs it declares (`--gpus`, default 8), refuses GPU-less model roles, builds vLLM's engine config from the
engine arguments (`vllm.EngineArgs(...).create_engine_config()`), has DeepSpeed's own parser read the
trainer's config, and checks the memory plan on GPUs of `--gpu-memory-gib`. Model shape: the SmolLM2
config.json shipped in jobs/configs/models (no weights, no download).

python -m bench.gpu_check                      # on a GPU machine: ~1 min per layout
python -m bench.gpu_check --dry-run            # anywhere: plans and validates every layout
python -m bench.gpu_check --only colocate_zero3 --steps 4 --model /path/to/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu_check.json"
CONFIG = ROOT / "jobs" / "configs" / "smollm2_grpo.yaml"
SHAPE = ROOT / "jobs" / "configs" / "models" / "smollm2-135m-shape"
LOGPROB_TOLERANCE = 0.05  # mean |sampler - trainer| log-prob per token; bf16 kernels differ by ~1e-2


@dataclass
class Layout:
    """One row of the check: the overrides on `jobs/configs/smollm2_grpo.yaml` and the GPUs it needs."""

    name: str
    gpus: int
    overrides: list[str]
    what: str = ""


def _roles(policy: float, rollout: float, reference: float) -> list[str]:
    return [
        f"placement.policy.num_gpus={policy}",
        f"placement.rollout.num_gpus={rollout}",
        f"placement.reference.num_gpus={reference}",
    ]


SEPARATE, COLOCATE = "placement.mode=separate", "placement.mode=colocate"
ZERO3_2 = ["trainer.zero_stage=3", "trainer.num_ranks=2"]
OFFLOAD = ["trainer.offload_optimizer=true", "trainer.offload_during_rollout=true"]
LAYOUTS = [
    Layout(
        "separate_store",
        1,
        [
            SEPARATE,
            "rollout.weight_sync=object_store",
            *_roles(0.5, 0.25, 0.25),
            "rollout.gpu_memory_utilization=0.2",
        ],
        "each role its own actor, sharing one GPU by fractions; weights through the object store",
    ),
    Layout(
        "separate_broadcast",
        2,
        [
            SEPARATE,
            "rollout.weight_sync=broadcast",
            *_roles(1, 0.5, 0.5),
            "rollout.gpu_memory_utilization=0.4",
        ],
        "policy on a GPU of its own, engine and reference on another; NCCL broadcast in buckets",
    ),
    Layout(
        "separate_broadcast_zero3",
        3,
        [
            SEPARATE,
            "rollout.weight_sync=broadcast",
            *_roles(1, 0.5, 0.5),
            "rollout.gpu_memory_utilization=0.4",
            *ZERO3_2,
        ],
        "two ZeRO-3 ranks (partitioned load, per-bucket gathers) and an engine on a third GPU",
    ),
    Layout(
        "colocate_zero2",
        1,
        [COLOCATE, "trainer.zero_stage=2", "placement.policy.num_gpus=1", *OFFLOAD],
        "policy, engine and reference on one GPU; engine asleep outside generation, optimizer offloaded",
    ),
    Layout(
        "colocate_zero3",
        1,
        [COLOCATE, "trainer.zero_stage=3", "placement.policy.num_gpus=1", *OFFLOAD],
        "as colocate_zero2 under ZeRO-3 (one rank runs stage 3 when it offloads)",
    ),
]

WORKLOAD = [  # the step the check times: 8 prompts x 4 samples x 32 tokens, bf16
    "model.dtype=bfloat16",
    "run.prompts_per_step=8",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=32",
    "algorithm.mini_batch_size=32",
    "trainer.micro_batch_size=8",
    "trainer.lr=1e-5",  # large enough that a few steps move the reward
    "logging.progress_bar=false",
    "checkpoint.interval=0",
]


def layout_config(layout: Layout, model: str, out: Path, steps: int) -> Any:
    from rlhf_ray.config import RLHFConfig

    return RLHFConfig.from_yaml(
        CONFIG,
        [
            f"model.policy_path={model}",
            f"run.output_dir={out / layout.name}",
            f"run.total_steps={steps}",
            *WORKLOAD,
            *layout.overrides,
        ],
    )


# ---- dry run: everything but CUDA --------------------------------------------------------------------
def dry_run(layout: Layout, gpus: int, gpu_memory_gib: float, out: Path) -> dict[str, Any]:
    """Validate `layout` as a GPU run would, up to the first CUDA call."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from vllm import EngineArgs

    from actors.placement import check_fits, check_model_roles_have_gpus
    from actors.placement import layout as role_layout
    from jobs.plan import build_plan
    from rlhf_ray.deepspeed_config import deepspeed_config, effective_zero_stage, optimizer_kind
    from rlhf_ray.engine_args import engine_args, engines_sleep
    from rlhf_ray.memory_plan import MemoryPlanError
    from rlhf_ray.trainer.weight_sync import weight_sync_kind

    cfg = layout_config(layout, str(SHAPE), out, steps=1)
    bundles, _ = role_layout(cfg)
    check_model_roles_have_gpus(cfg, float(gpus))
    check_fits(
        bundles, {"GPU": float(gpus), "CPU": 1e6, **{k: 1e6 for b in bundles for k in b if k != "GPU"}}
    )
    args = engine_args(cfg, str(SHAPE), gpu=True, rank=0)
    # vLLM refuses sleep mode off CUDA (rlhf_ray.engine_args.sleep_enabled): its value is checked below
    engine = EngineArgs(**{**args, "enable_sleep_mode": False}).create_engine_config()
    world = cfg.trainer.num_ranks
    ds = deepspeed_config(cfg.trainer, torch.bfloat16, cfg.trainer.micro_batch_size, 1, world)
    parsed = DeepSpeedConfig(ds)
    stage = effective_zero_stage(cfg.trainer, world)
    try:
        plan = build_plan(cfg, gpu_memory_gib, gpus_per_node=gpus)
        plan.check()
        peak = max(g.peak()[1] for g in plan.gpus) / 2**30
    except MemoryPlanError as exc:
        raise AssertionError(f"memory plan: {exc}") from exc
    checks = {
        "weight_sync": weight_sync_kind(cfg),
        "sleep": engines_sleep(cfg),
        "enable_sleep_mode": args["enable_sleep_mode"],
        "gpu_memory_utilization": engine.cache_config.gpu_memory_utilization,
        "enforce_eager": engine.model_config.enforce_eager,
        "zero_stage": stage,
        "optimizer": optimizer_kind(cfg.trainer),
        "bf16": parsed.bfloat16_config.enabled,
        "plan_peak_gib": round(peak, 2),
    }
    if cfg.placement.mode == "colocate" and checks["sleep"] is not True:
        raise AssertionError("colocated on GPUs, the engines must run in sleep mode")
    if parsed.zero_optimization_stage != stage or not checks["bf16"]:
        raise AssertionError(f"DeepSpeed read stage {parsed.zero_optimization_stage}, bf16 {checks['bf16']}")
    return checks


# ---- the real check -------------------------------------------------------------------------------------
class GpuMemorySampler:
    """Peak memory used on each GPU (nvidia-smi, every `period_s`), over all processes."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.peak_mib = period_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                for line in text.strip().splitlines():
                    index, used = (int(x) for x in line.split(","))
                    self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def run_layout(layout: Layout, model: str, out: Path, steps: int) -> dict[str, Any]:
    """Run `steps` GRPO steps of `layout` in this driver's Ray; the checks and figures of one row."""
    from rlhf_ray.metrics import read_metrics
    from rlhf_ray.trainer.ppo import PPOTrainer

    cfg = layout_config(layout, model, out, steps)
    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg)
    with GpuMemorySampler() as memory:
        try:
            trainer.start()
            started = time.perf_counter() - t0
            trainer.fit()
        finally:
            trainer.shutdown()
    rows = [r for r in read_metrics(out / layout.name / "metrics.jsonl") if "time/step" in r]
    if len(rows) != steps:
        raise AssertionError(f"{len(rows)} of {steps} steps logged")
    gaps = [r["rollout_vs_trainer_logprob_diff"] for r in rows if "rollout_vs_trainer_logprob_diff" in r]
    rewards = [r["reward/mean"] for r in rows]
    half = max(1, len(rewards) // 2)
    moved = abs(sum(rewards[-half:]) / half - sum(rewards[:half]) / half)
    phases = ("generate", "score", "train", "sync", "step")
    later = rows[1:] or rows  # the first step pays for CUDA graphs and allocator warm-up
    result = {
        "start_s": round(started, 1),
        "logprob_gap_max": max(gaps) if gaps else None,
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_moved": moved,
        "time_s": {p: round(sum(r[f"time/{p}"] for r in later) / len(later), 3) for p in phases},
        "peak_gpu_mib": memory.peak_mib,
    }
    finite = all(math.isfinite(r[k]) for r in rows for k in ("kl", "policy/policy_loss", "reward/mean"))
    result["checks"] = {
        "finite": finite,
        "logprobs_match": bool(gaps) and max(gaps) < LOGPROB_TOLERANCE,
        "reward_moves": moved > 0,
    }
    return result


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no CUDA build: no GPUs
        return 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="plan and validate every layout, no CUDA")
    parser.add_argument("--gpus", type=int, default=8, help="--dry-run: GPUs the planned machine has")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="--dry-run: memory of each GPU")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per layout (default 6)")
    parser.add_argument("--only", nargs="*", default=None, help="layout names to run (default: all)")
    parser.add_argument("--model", default=None, help="SmolLM2 HF directory (default: converted from PyPI)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="run directories")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON report goes")
    args = parser.parse_args(argv)
    unknown = set(args.only or []) - {lay.name for lay in LAYOUTS}
    if unknown:
        parser.error(f"unknown layouts {sorted(unknown)}; choose from {[lay.name for lay in LAYOUTS]}")
    layouts = [lay for lay in LAYOUTS if args.only is None or lay.name in args.only]
    out = Path(args.out)

    from rlhf_ray.runtime import setup_process_env

    setup_process_env()
    gpus = args.gpus if args.dry_run else _gpu_count()
    if not args.dry_run and gpus == 0:
        parser.error("no CUDA GPU is visible here: run on a GPU machine, or use --dry-run")
    rows: dict[str, dict[str, Any]] = {}
    if not args.dry_run:
        import ray

        from rlhf_ray import pretrained
        from rlhf_ray.runtime import runtime_env_vars

        model = args.model or str(pretrained.smollm2_dir())
        ray.init(runtime_env={"env_vars": runtime_env_vars()})
    try:
        for layout in layouts:
            row: dict[str, Any] = {"gpus": layout.gpus, "what": layout.what}
            if layout.gpus > gpus:
                row["status"] = f"skipped: needs {layout.gpus} GPUs, {gpus} here"
            else:
                try:
                    if args.dry_run:
                        row |= dry_run(layout, gpus, args.gpu_memory_gib, out)
                        row["status"] = "pass"
                    else:
                        row |= run_layout(layout, model, out, args.steps)
                        row["status"] = "pass" if all(row["checks"].values()) else "FAIL"
                except Exception as exc:  # one layout failing is a row of the report
                    row["status"] = f"FAIL: {type(exc).__name__}: {str(exc)[:400]}"
            rows[layout.name] = row
            print(f"{layout.name:<26} {row['status']}", flush=True)
    finally:
        if not args.dry_run:
            ray.shutdown()
    report = {"dry_run": args.dry_run, "gpus": gpus, "layouts": rows}
    if not args.dry_run:
        import torch

        report["device"] = torch.cuda.get_device_name(0)
        report["steps"] = args.steps
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'layout':<26} {'GPUs':>4}  status / figures")
    for name, row in report["layouts"].items():
        figures = ""
        if "time_s" in row:
            t = row["time_s"]
            peak = max(row["peak_gpu_mib"].values(), default=0) / 1024
            figures = (
                f"  step {t['step']:.2f} s (gen {t['generate']:.2f}, score {t['score']:.2f}, train "
                f"{t['train']:.2f}, sync {t['sync']:.2f}), logprob gap {row['logprob_gap_max']:.3g}, "
                f"reward {row['reward_first']:.3f}->{row['reward_last']:.3f}, peak {peak:.1f} GiB"
            )
        elif "plan_peak_gib" in row:
            figures = (
                f"  sync {row['weight_sync']}, ZeRO-{row['zero_stage']}, {row['optimizer']}, sleep "
                f"{row['sleep']}, planned peak {row['plan_peak_gib']} GiB/GPU"
            )
        print(f"{name:<26} {row['gpus']:>4}  {row['status']}{figures}")


if __name__ == "__main__":
    report = main()
    sys.exit(
        0
        if all(r["status"] == "pass" or r["status"].startswith("skipped") for r in report["layouts"].values())
        else 1
    )
