"""Compute floor: how far a measured RL step is from the time the machine needs just for its arithmetic.

1. This machine's fp32 matmul rate with torch, at 1 thread and at all cores (what each role uses with
   placement.<role>.num_threads = the cores, as the benchmarks run it): best of several runs, on the
   shapes an LM layer multiplies.
2. The FLOPs a step must do, from the measured token counts of the step (bench/results/step_breakdown.json,
   and TRL's from bench/results/grpo_vs_trl.json): N = parameters that take part in a matmul (every
   Linear weight, the output head included even when tied to the embeddings); 2·N per token of each
   forward pass, 6·N per token of each training pass (forward + backward):
   - generation: 2·N·(each prompt's tokens once — prefix caching shares them among its samples — plus every
     generated token);
   - reference log-probs 2·N·T, old policy log-probs 2·N·T (only when a separate pass ran: neither side
     computes them for one update per batch), critic values 2·N·T and critic training 6·N·T (GAE only),
   - policy training 6·N·T per PPO epoch; with T = prompt + response tokens of every sample.
   Attention's sequence-length term and the rule reward are left out (small at these lengths).
3. floor = FLOPs / the best rate measured (at any thread count); report step time / floor.

python -m bench.compute_floor            # reads the step-breakdown and TRL results
python -m bench.compute_floor --quick    # measures the matmul rate and a 3-step tiny run (~2-3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, snapshot, spread, write_result


def matmul_rate(threads: int, quick: bool = False) -> dict[str, Any]:
    """fp32 GFLOP/s of `x @ w` at `threads` torch threads: per shape the best of several timed runs (the
    least disturbed by other load), and the median."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = [(256, 576, 1536), (512, 576, 576), (1024, 1024, 1024), (2048, 2048, 2048)]
    if quick:
        shapes = shapes[:3]
    out = {}
    try:
        for m, k, n in shapes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            flops = 2 * m * k * n
            reps = max(3, int(2e9 / flops))  # ~2 GFLOP per timed run
            a @ b  # warm-up
            rates = []
            for _ in range(3 if quick else 7):
                t = time.perf_counter()
                for _ in range(reps):
                    a @ b
                rates.append(flops * reps / (time.perf_counter() - t) / 1e9)
            out[f"{m}x{k}x{n}"] = {"best": max(rates), "median": sorted(rates)[len(rates) // 2]}
    finally:
        torch.set_num_threads(old)
    return {
        "threads": threads,
        "shapes": out,
        "best_gflops": max(v["best"] for v in out.values()),
        "median_gflops": sorted(v["median"] for v in out.values())[len(out) // 2],
    }


def matmul_params(model_dir: str) -> dict[str, int]:
    """Parameters of every Linear layer (N of the FLOP count) and all unique parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    unique = sum(p.numel() for p in model.parameters())
    return {"matmul_params": linear, "unique_params": unique}


def step_flops(
    n: int,
    prompt_tokens: float,
    generated: float,
    samples: float,
    group: int,
    extra_forwards: int,
    train_passes: int,
) -> dict[str, float]:
    """FLOPs of one step from its token counts (see the module docstring)."""
    seq = prompt_tokens + generated  # every sample's prompt + response
    gen = 2 * n * (prompt_tokens / group + generated)
    fwd = 2 * n * seq * extra_forwards
    train = 6 * n * seq * train_passes
    return {"generate": gen, "forwards": fwd, "train": train, "total": gen + fwd + train}


def ours_floor(name: str, wl: dict[str, Any], n: int, rate: float) -> dict[str, Any]:
    s = wl["settings"]
    gae = s["estimator"] == "gae"
    epochs = s.get("ppo_epochs", 1)
    # reference (+ old policy log-probs when a separate pass ran: `time/logprobs` is logged then) (+ values)
    old_pass = any("time/logprobs" in st["metrics"] for st in wl["steps"])
    forwards = 1 + int(old_pass) + int(gae)
    train_passes = epochs * (2 if gae else 1)  # policy (+ critic)
    rows = []
    for st in wl["steps"]:
        f = step_flops(
            n,
            st["prompt_tokens"],
            st["generated_tokens"],
            st["sequences"],
            s["samples_per_prompt"],
            forwards,
            train_passes,
        )
        step_s = st["metrics"]["time/step"]
        floor = f["total"] / (rate * 1e9)
        gen_floor = f["generate"] / (rate * 1e9)
        rows.append(
            {
                "flops": f["total"],
                "floor_s": floor,
                "step_s": step_s,
                "step_over_floor": step_s / floor,
                "generate_over_floor": st["metrics"]["time/generate"] / gen_floor,
                "train_over_floor": st["metrics"]["time/train"] / (f["train"] / (rate * 1e9)),
                "flops_generate": f["generate"],
                "flops_forwards": f["forwards"],
                "flops_train": f["train"],
            }
        )
    return {
        "side": "ours",
        "workload": name,
        "settings": s,
        "summary": {k: spread([r[k] for r in rows]) for k in rows[0]},
    }


def compare_floor(name: str, res: dict[str, Any], n: int, rate: float) -> list[dict[str, Any]]:
    """Both sides of a grpo_vs_trl workload. Forward passes besides generation: the reference only on both
    sides (beta > 0; with one update per batch neither computes old log-probs: ours since
    `algorithm.old_logprobs=auto`). Prompt tokens per sample: as measured on our side (same prompts and
    template)."""
    w = res["spec"]
    ours_runs = [r for r in res["runs"] if r["side"] == "ours"]
    prompt_per_sample = sum(r["prompt_tokens_per_sample"] for r in ours_runs) / max(len(ours_runs), 1)
    out = []
    reference = 1 if w["beta"] > 0 else 0
    for side, forwards in (("ours", reference), ("trl", reference)):
        rows = []
        for run in (r for r in res["runs"] if r["side"] == side):
            samples = w["prompts_per_step"] * w["samples"]
            f = step_flops(
                n,
                prompt_per_sample * samples,
                run["mean_response_len"] * samples,
                samples,
                w["samples"],
                forwards,
                1,
            )
            floor = f["total"] / (rate * 1e9)
            for step_s in run["step_s"]:
                rows.append(
                    {
                        "flops": f["total"],
                        "floor_s": floor,
                        "step_s": step_s,
                        "step_over_floor": step_s / floor,
                    }
                )
        if rows:
            out.append(
                {
                    "side": side,
                    "workload": name,
                    "summary": {k: spread([r[k] for r in rows]) for k in rows[0]},
                }
            )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick matmul rate and a fresh 3-step tiny run")
    p.add_argument("--breakdown", default=str(RESULTS / "step_breakdown.json"))
    p.add_argument("--trl", default=str(RESULTS / "grpo_vs_trl.json"))
    args = p.parse_args(argv)

    before = snapshot()
    cores = os.cpu_count() or 1
    rates = {t: matmul_rate(t, args.quick) for t in sorted({1, cores})}
    after_rate = snapshot()
    # the best rate seen at any thread count: under other load the all-core rate can fall below 1 thread's
    rate_all = max(r["best_gflops"] for r in rates.values())
    result: dict[str, Any] = {
        "machine": machine(),
        "load": {"before_matmul": before, "after_matmul": after_rate},
        "matmul": {str(t): r for t, r in rates.items()},
        "rate_used_gflops": rate_all,
        "rate_note": "best fp32 matmul rate measured at any thread count (1 or all cores): the floor assumes "
        "the machine at that rate all the time",
        "workloads": [],
    }
    if args.quick or not Path(args.breakdown).is_file():
        from bench.step_breakdown import main as breakdown

        breakdown_result = breakdown(["--quick", "--name", "step_breakdown_quick"])
    else:
        breakdown_result = json.loads(Path(args.breakdown).read_text())
    params_cache: dict[str, dict[str, int]] = {}
    for name, wl in breakdown_result["workloads"].items():
        path = wl["settings"]["policy_path"]
        params_cache.setdefault(path, matmul_params(path))
        n = params_cache[path]["matmul_params"]
        entry = ours_floor(name, wl, n, rate_all) | {"params": params_cache[path]}
        result["workloads"].append(entry)
    if not args.quick and Path(args.trl).is_file():
        trl = json.loads(Path(args.trl).read_text())
        for name, res in trl.get("workloads", {}).items():
            path = res["spec"]["model"]
            params_cache.setdefault(path, matmul_params(path))
            for entry in compare_floor(name, res, params_cache[path]["matmul_params"], rate_all):
                result["workloads"].append(entry | {"params": params_cache[path], "source": "grpo_vs_trl"})
    result["load"]["end"] = snapshot()
    print(
        "fp32 matmul GFLOP/s: "
        + ", ".join(
            f"{t} thread(s) best {r['best_gflops']:.1f} median {r['median_gflops']:.1f}"
            for t, r in rates.items()
        )
    )
    print("| workload | side | N (matmul params) | FLOPs/step | floor s | step s | step / floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for e in result["workloads"]:
        s = e["summary"]
        print(
            f"| {e['workload']} | {e['side']} | {e['params']['matmul_params'] / 1e6:.2f}M | "
            f"{s['flops']['median']:.3g} | {s['floor_s']['median']:.3f} | {s['step_s']['median']:.3f} | "
            f"{s['step_over_floor']['median']:.1f}x |"
        )
    path = write_result("compute_floor_quick" if args.quick else "compute_floor", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
