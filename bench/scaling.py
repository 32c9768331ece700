"""Scaling on the tiny model: step time against prompts per step, samples per prompt and response length
(expected near-linear once fixed per-step costs are paid), and against the number of rollout engines
and trainer ranks on a multi-node `ray.cluster_utils.Cluster`.

Batch-shape variants share one set of roles: between steps the driver's prompts per step, samples per
prompt and the engines' `max_new_tokens` are changed (the trainer takes the whole batch as one optimiser
step: `algorithm.mini_batch_size` is set above the largest batch), and the variants run round-robin, one
step each per round, so that other load on the machine spreads over all of them alike. Topology variants
each need their own roles (a fresh process each). On a 2-core machine more engines or ranks cannot run
faster — there are no more cores to spread onto — so the topology rows measure the cost of more actors
(scheduling, sharding, all-reduce, more processes on the same cores), not a speed-up.

python -m bench.scaling                 # grid + topologies (~25 min under load)
python -m bench.scaling --quick         # a small grid, 2 rounds, no topologies (~2-3 min)
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import machine, snapshot, spread, workload_overrides, write_result
from bench.ours_run import OursSession, run_ours_subprocess

BASE = {"prompts": 8, "samples": 4, "length": 8}


class _LengthProxy:
    """A rollout engine handle whose `generate` asks for `length` new tokens at most; everything else is
    the handle's own (weight sync goes straight through)."""

    def __init__(self, handle: Any, length: int):
        self._handle, self._length = handle, length

    @property
    def generate(self) -> Any:
        handle, length = self._handle, self._length

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                return handle.generate.remote(*args, max_new_tokens=length, **kwargs)

        return _Method()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def variants(quick: bool) -> list[dict[str, int]]:
    prompts = [4, 8, 16] if quick else [4, 8, 16, 32]
    samples = [2, 4, 8] if quick else [2, 4, 8, 16]
    lengths = [4, 8, 16] if quick else [4, 8, 16, 32]
    out = [BASE | {"axis": "prompts", "prompts": p} for p in prompts]
    out += [BASE | {"axis": "samples", "samples": s} for s in samples]
    out += [BASE | {"axis": "length", "length": n} for n in lengths]
    return out


def run_grid(rounds: int, quick: bool) -> list[dict[str, Any]]:
    grid = variants(quick)
    max_len = max(v["length"] for v in grid)
    config, overrides = workload_overrides("tiny")
    overrides = [
        *overrides,
        "trainer.num_ranks=1",
        f"rollout.max_new_tokens={max_len}",  # sizes the engine's context; each variant asks for its own
        # the largest batch of the grid is the config's batch and mini-batch, so that every variant's whole
        # batch is one optimiser step (the ranks split a batch into mini-batches of this size)
        f"run.prompts_per_step={max(v['prompts'] for v in grid)}",
        f"rollout.samples_per_prompt={max(v['samples'] for v in grid)}",
        f"algorithm.mini_batch_size={max(v['prompts'] * v['samples'] for v in grid)}",
    ]
    records: list[dict[str, Any]] = [dict(v, rows=[]) for v in grid]
    with OursSession(config, overrides, (rounds + 1) * len(grid)) as s:
        engines = s.trainer.roles.engines
        for r in range(rounds + 1):  # round 0 warms every variant up and is not counted
            for rec in records:
                s.trainer.cfg.run.prompts_per_step = rec["prompts"]
                s.trainer.group = rec["samples"]
                s.trainer.roles.engines = [_LengthProxy(e, rec["length"]) for e in engines]
                row = s.step()
                if r > 0:
                    rec["rows"].append(row)
        s.trainer.roles.engines = engines
        s.annotate([row for rec in records for row in rec["rows"]])
        startup = s.startup_s
    for rec in records:
        rows = rec.pop("rows")
        rec["startup_s"] = startup
        rec |= summarise(rows)
    return records


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "step_s": spread([r["metrics"]["time/step"] for r in rows]),
        "generate_s": spread([r["metrics"]["time/generate"] for r in rows]),
        "train_s": spread([r["metrics"]["time/train"] for r in rows]),
        "overhead_frac": spread([r["timeline"]["overhead_frac"] for r in rows]),
        "samples_per_step": rows[0]["sequences"],
        "mean_response_len": sum(r["generated_tokens"] for r in rows) / sum(r["sequences"] for r in rows),
        "samples_per_s": sum(r["sequences"] for r in rows) / sum(r["metrics"]["time/step"] for r in rows),
    }


def run_topologies(steps: int) -> list[dict[str, Any]]:
    out = []
    for engines, ranks, nodes in [(1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 2)]:
        extra = [
            f"rollout.num_engines={engines}",
            f"trainer.num_ranks={ranks}",
            "placement.strategy=SPREAD",
            "trainer.micro_batch_size=16",
            "algorithm.mini_batch_size=32",
        ]
        before = snapshot()
        rec = run_ours_subprocess("tiny", extra, warmup=1, steps=steps, nodes=nodes)
        out.append(
            {
                "engines": engines,
                "ranks": ranks,
                "nodes": nodes,
                "startup_s": rec["startup_s"],
                "load": before,
            }
            | summarise(rec["steps"])
        )
        print(
            f"topology engines={engines} ranks={ranks} nodes={nodes}: {out[-1]['step_s']['median']:.3f} s/step"
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default 5; quick 2)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-topology", action="store_true", help="skip the engines/ranks rows")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    result: dict[str, Any] = {"machine": machine(), "load_at_start": snapshot()}
    result["grid"] = run_grid(rounds, args.quick)
    print(
        "| axis | prompts | samples | max new tokens | mean resp len | step s (median [min-max]) | samples/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["grid"]:
        st = r["step_s"]
        print(
            f"| {r['axis']} | {r['prompts']} | {r['samples']} | {r['length']} | {r['mean_response_len']:.1f} | "
            f"{st['median']:.3f} [{st['min']:.3f}-{st['max']:.3f}] | {r['samples_per_s']:.1f} |",
            flush=True,
        )
    if not (args.quick or args.no_topology):
        result["topology"] = run_topologies(rounds)
    result["load_at_end"] = snapshot()
    path = write_result("scaling_quick" if args.quick else "scaling", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
