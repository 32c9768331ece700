"""What every benchmark shares: the machine's state next to each figure (load average, memory), spreads
(min/median/max), the two workloads' configs (tiny model, SmolLM2-135M-Instruct), and JSON results.

The benchmarks run on a shared 2-core machine: every figure is stored with the `uptime` load average and
`free -g` taken right before and after it, so a reader can tell an idle figure from one taken under load.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TINY_TASK = ROOT / "runs" / "tiny-task"
TINY_CONFIG = ROOT / "jobs" / "configs" / "tiny_ppo.yaml"
SMOLLM2_CONFIG = ROOT / "jobs" / "configs" / "smollm2_grpo.yaml"


def snapshot() -> dict[str, Any]:
    """Load average (1/5/15 min, as `uptime` prints it) and memory in GiB (as `free -g` prints it)."""
    load = os.getloadavg()
    mem = {}
    try:
        out = subprocess.run(["free", "-g"], capture_output=True, text=True, check=True).stdout
        head, row = out.splitlines()[0].split(), out.splitlines()[1].split()
        mem = {k: int(v) for k, v in zip(head, row[1:])}
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        pass
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_avg": [round(x, 2) for x in load],
        "mem_gib": {k: mem.get(k) for k in ("total", "used", "available")},
    }


def machine() -> dict[str, Any]:
    """What the figures ran on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "ray", "vllm", "deepspeed", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # a missing package is a fact to record, not an error
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max / mean of a list of measurements (n = how many)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json (indented; rounded floats keep diffs readable)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(_round(data), indent=1) + "\n")
    return path


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    return x


# ---- workloads ------------------------------------------------------------------------------------------
def tiny_model_dir() -> Path:
    """runs/tiny-task/model (written by `python -m jobs.synthetic_task --out runs/tiny-task` if missing)."""
    model = TINY_TASK / "model"
    if not (model / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "jobs.synthetic_task", "--out", str(TINY_TASK)], cwd=ROOT, check=True
        )
    return model


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct (`python -m jobs.convert_smollm2` on first use)."""
    out = subprocess.run(
        [sys.executable, "-m", "jobs.convert_smollm2"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    return Path(out.splitlines()[-1])


def workload_overrides(workload: str) -> tuple[Path, list[str]]:
    """The YAML config and the overrides that make each named workload runnable as a benchmark:
    no evaluation, no checkpoints, no TensorBoard, no resume (every run starts from the initial model)."""
    common = [
        "run.eval_prompts=0",
        "run.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.resume=false",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]
    if workload == "tiny":
        tiny_model_dir()
        return TINY_CONFIG, common
    if workload == "smollm2":
        # one policy rank and a small KV cache: the machine's 24 GiB are shared
        return SMOLLM2_CONFIG, [
            *common,
            f"model.policy_path={smollm2_dir()}",
            "trainer.num_ranks=1",
            "rollout.kv_cache_gib=0.25",
        ]
    raise ValueError(f"unknown workload {workload!r}: use 'tiny' or 'smollm2'")
