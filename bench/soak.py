"""Soak benchmark (not a test): a few hundred RL steps on the tiny model, watching for leaks and slow-down.

Every `--sample-every` steps it records the driver's RSS, the summed RSS of the Ray worker processes
(the actors), the object store's usage (plasma bytes and object count, from Ray's memory summary), and
the number of object references the driver holds; every step's wall time comes from the run's own
`time/step` metric. The summary compares the start of the run (after a warm-up) with its end: memory
growth as a fitted slope (MiB per 100 steps) and step time as a ratio of medians.

    python -m bench.soak [--steps 300] [--sample-every 10] [section.key=value ...]

Writes bench/results/soak.json; bench/soak.md holds the command, the machine and the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import machine, snapshot, spread, workload_overrides, write_result

MIB = 1024**2


def driver_rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


def workers_rss_mib() -> float:
    """RSS of the Ray worker processes (actors, tasks) started under this driver's local cluster."""
    total = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("ray::"):
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


def object_store() -> dict[str, float]:
    """Plasma usage from Ray's memory summary ("Plasma memory usage N MiB, K objects, ...")."""
    import ray
    from ray._private.internal_api import memory_summary

    # this run's own cluster: other Ray instances may be running on the machine
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    return {"plasma_mib": float(m.group(1)), "plasma_objects": int(m.group(2))} if m else {}


def driver_refs() -> int:
    """Object references the driver process holds (a leak of refs grows this)."""
    import ray

    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def slope_per_100(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs, per 100 units of x."""
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def summarise(samples: list[dict[str, Any]], step_times: list[float], warmup: int) -> dict[str, Any]:
    steady = [s for s in samples if s["step"] >= warmup]
    xs = [s["step"] for s in steady]
    out: dict[str, Any] = {"warmup_steps": warmup}
    for key in ("driver_rss_mib", "workers_rss_mib", "plasma_mib", "plasma_objects", "driver_refs"):
        ys = [float(s[key]) for s in steady if key in s]
        if ys:
            out[key] = {
                "first": ys[0],
                "last": ys[-1],
                "max": max(ys),
                "slope_per_100_steps": slope_per_100(xs[: len(ys)], ys),
            }
    times = step_times[warmup:]
    window = max(len(times) // 5, 1)
    head, tail = times[:window], times[-window:]
    out["step_time_s"] = spread(times)
    out["step_time_first_window_median_s"] = statistics.median(head) if head else None
    out["step_time_last_window_median_s"] = statistics.median(tail) if tail else None
    out["slowdown_last_over_first"] = statistics.median(tail) / statistics.median(head) if head else None
    out["window_steps"] = window
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the summary")
    parser.add_argument("--out", default="soak", help="result name under bench/results/")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import ray

    from actors.placement import needed_cpus
    from rlhf_ray.config import RLHFConfig
    from rlhf_ray.runtime import runtime_env_vars, setup_process_env
    from rlhf_ray.trainer.ppo import PPOTrainer

    setup_process_env()
    config, common = workload_overrides("tiny")
    run_dir = Path(os.environ.get("BENCH_RUN_DIR", "/tmp/rlhf_soak")) / f"{os.getpid()}_{time.time_ns()}"
    overrides = [
        *common,
        "checkpoint.interval=100",  # the loop's file writes are part of the soak
        "checkpoint.keep_last=1",
        f"run.total_steps={args.steps}",
        f"run.output_dir={run_dir}",
        *args.overrides,
    ]
    cfg = RLHFConfig.from_yaml(config, overrides)
    before = snapshot()
    ray.init(
        address="local",
        num_cpus=int(needed_cpus(cfg) + 0.999),
        object_store_memory=512 * MIB,
        include_dashboard=False,
        runtime_env={"env_vars": runtime_env_vars()},
    )
    samples: list[dict[str, Any]] = []
    step_times: list[float] = []
    t0 = time.perf_counter()

    def on_step(step: int, metrics: dict[str, Any]) -> None:
        step_times.append(float(metrics["time/step"]))
        if step % args.sample_every == 0 or step == 1:
            sample = {
                "step": step,
                "elapsed_s": time.perf_counter() - t0,
                "driver_rss_mib": driver_rss_mib(),
                "workers_rss_mib": workers_rss_mib(),
                "driver_refs": driver_refs(),
                "load_avg_1m": os.getloadavg()[0],
                **object_store(),
            }
            samples.append(sample)
            print(
                f"step {step}: driver {sample['driver_rss_mib']:.0f} MiB, workers {sample['workers_rss_mib']:.0f} "
                f"MiB, plasma {sample.get('plasma_mib')} MiB / {sample.get('plasma_objects')} objects, "
                f"{sample['driver_refs']} refs, step {metrics['time/step']:.2f} s, load {sample['load_avg_1m']:.1f}",
                flush=True,
            )

    trainer = PPOTrainer(cfg)
    try:
        trainer.start()
        startup_s = time.perf_counter() - t0
        summary = trainer.fit(on_step=on_step)
    finally:
        trainer.shutdown()
        ray.shutdown()
    result = {
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": str(config),
        "overrides": overrides,
        "machine": machine(),
        "before": before,
        "after": snapshot(),
        "startup_s": startup_s,
        "total_s": time.perf_counter() - t0,
        "steps": summary["step"],
        "restarts": summary.get("restarts", 0),
        "summary": summarise(samples, step_times, args.warmup),
        "samples": samples,
        "step_times_s": step_times,
    }
    path = write_result(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
