"""Run our RL trainer (`PPOTrainer`) for a few steps on a private local Ray and report per-step timings:
the trainer's own `time/*` metrics, the roles' compute read from Ray's timeline (`bench.timeline`), and
the rollout engine's pure vLLM generation time. One process per measurement, so every run starts from the
same cold state and frees its memory on exit.

python -m bench.ours_run --workload tiny --warmup 1 --steps 5 --out /tmp/ours.json [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, snapshot, workload_overrides


class OursSession:
    """Our roles on a private local Ray (or on a `ray.cluster_utils.Cluster` of `nodes` simulated nodes),
    one `PPOTrainer` started on them, and timed steps. Use as a context manager; `step()` runs one step
    and returns its record, `annotate(rows)` adds the timeline breakdown to the records afterwards."""

    def __init__(self, config: Path, overrides: list[str], total_steps: int, nodes: int = 1):
        from rlhf_ray.config import RLHFConfig
        from rlhf_ray.runtime import setup_process_env

        setup_process_env()
        out_dir = (
            Path(os.environ.get("BENCH_RUN_DIR", "/tmp/rlhf_bench_run")) / f"{os.getpid()}_{time.time_ns()}"
        )
        self.overrides = overrides
        self.cfg = RLHFConfig.from_yaml(
            config, [*overrides, f"run.total_steps={total_steps}", f"run.output_dir={out_dir}"]
        )
        self.config, self.nodes = config, nodes
        self.cluster = None

    def __enter__(self) -> OursSession:
        import ray

        from actors.placement import needed_cpus
        from rlhf_ray.runtime import runtime_env_vars
        from rlhf_ray.trainer.ppo import PPOTrainer

        needed = int(needed_cpus(self.cfg) + 0.999)
        env = {"env_vars": runtime_env_vars()}
        if self.nodes > 1:
            from ray.cluster_utils import Cluster

            per_node = max(2, -(-needed // self.nodes))
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": per_node, "object_store_memory": 512 * 1024**2},
            )
            for _ in range(self.nodes - 1):
                self.cluster.add_node(num_cpus=per_node, object_store_memory=512 * 1024**2)
            ray.init(address=self.cluster.address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, needed),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                object_store_memory=1024**3,
                runtime_env=env,
                log_to_driver=False,
            )
        self.before = snapshot()
        t = time.perf_counter()
        self.trainer = PPOTrainer(self.cfg)
        self.trainer.start()
        self.startup_s = time.perf_counter() - t
        self.engines = self.trainer.roles.engines
        return self

    def _engine_stats(self) -> dict[str, float]:
        import ray

        stats = ray.get([e.stats.remote() for e in self.engines])
        keys = ("generate_s", "num_generated_tokens", "num_prompt_tokens", "num_sequences")
        out = {k: sum(s[k] for s in stats) for k in keys}
        out["generate_s"] = max(s["generate_s"] for s in stats)  # engines generate in parallel
        return out

    def step(self) -> dict[str, Any]:
        before = self._engine_stats()
        start = time.time()
        metrics = self.trainer.train_step()
        end = time.time()
        self.trainer.step += 1
        after = self._engine_stats()
        return {
            "start": start,
            "end": end,
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
            "vllm_generate_s": after["generate_s"] - before["generate_s"],
            "generated_tokens": after["num_generated_tokens"] - before["num_generated_tokens"],
            "prompt_tokens": after["num_prompt_tokens"] - before["num_prompt_tokens"],
            "sequences": after["num_sequences"] - before["num_sequences"],
        }

    def annotate(self, rows: list[dict[str, Any]]) -> None:
        """Replace each row's start/end with the roles' compute breakdown from Ray's timeline."""
        import ray

        from bench.timeline import step_breakdown

        time.sleep(2.0)  # task events reach the GCS about once a second
        events = ray.timeline()
        for row in rows:
            row["timeline"] = step_breakdown(events, row.pop("start"), row.pop("end"))

    def resolved(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "prompts_per_step": cfg.run.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "estimator": cfg.algorithm.estimator,
            "ppo_epochs": cfg.algorithm.ppo_epochs,
            "mini_batch_size": cfg.algorithm.mini_batch_size,
            "micro_batch_size": cfg.trainer.micro_batch_size,
            "num_ranks": cfg.trainer.num_ranks,
            "num_engines": cfg.rollout.num_engines,
            "nodes": self.nodes,
            "dtype": cfg.model.dtype,
            "weight_sync": cfg.rollout.weight_sync,
            "policy_path": cfg.model.policy_path,
        }

    def __exit__(self, *exc: object) -> None:
        import ray

        try:
            if getattr(self, "trainer", None) is not None:
                self.trainer.shutdown()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()


def run_ours(config: Path, overrides: list[str], warmup: int, steps: int, nodes: int = 1) -> dict[str, Any]:
    """Start the roles, run `warmup` untimed steps, then `steps` timed ones; return per-step records."""
    record: dict[str, Any] = {"config": str(config), "overrides": overrides}
    with OursSession(config, overrides, warmup + steps, nodes) as session:
        record["before"] = session.before
        record["startup_s"] = session.startup_s
        rows = [session.step() for _ in range(warmup + steps)][warmup:]
        session.annotate(rows)
        record["steps"] = rows
        record["resolved"] = session.resolved()
    record["after"] = snapshot()
    return record


def run_ours_subprocess(
    workload: str, extra: list[str], warmup: int, steps: int, nodes: int = 1, timeout_s: float = 3600
) -> dict[str, Any]:
    """`run_ours` in a fresh Python process (own Ray, memory freed after); the record it wrote."""
    out = Path(f"/tmp/rlhf_bench_{os.getpid()}_{time.time_ns()}.json")
    cmd = [sys.executable, "-m", "bench.ours_run", "--workload", workload]
    cmd += ["--warmup", str(warmup), "--steps", str(steps), "--nodes", str(nodes), "--out", str(out), *extra]
    import subprocess

    proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s, capture_output=True, text=True)
    if not out.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    record = json.loads(out.read_text())
    out.unlink()
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=["tiny", "smollm2"], required=True)
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first (vLLM's first call warms up)"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=1, help="simulated nodes (ray.cluster_utils.Cluster)")
    parser.add_argument("--out", required=True, help="JSON file to write the record to")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, after the workload's own")
    args = parser.parse_args(argv)
    config, base = workload_overrides(args.workload)
    record = run_ours(config, [*base, *args.overrides], args.warmup, args.steps, args.nodes)
    record["workload"] = args.workload
    Path(args.out).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
