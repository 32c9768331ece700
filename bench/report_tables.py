"""Print the Markdown tables of bench/REPORT.md from the JSON results in bench/results/, so that every
figure in the report comes from a result file (nothing typed by hand).

python -m bench.report_tables [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS
from bench.step_breakdown import PHASES


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mmm(s: dict[str, float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


def breakdown(res: dict[str, Any]) -> list[str]:
    out = []
    for name, wl in res["workloads"].items():
        med = {k: v["median"] for k, v in wl["summary"].items()}
        s = wl["settings"]
        load = wl["load"]
        out += [
            f"**{name}** ({s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples, <= "
            f"{s['max_new_tokens']} new tokens, {s['estimator']}, {s['num_ranks']} policy rank(s), "
            f"{len(wl['steps'])} timed steps, medians; load average at start "
            f"{load['run_start']['load_avg']}, at end {load['run_end']['load_avg']}, "
            f"`free -g` available {load['run_start']['mem_gib']['available']} GiB)",
            "",
            "| phase | wall s | role compute s | share of step |",
            "|---|---:|---:|---:|",
        ]
        step = med["step_s"]
        for label, _, _ in PHASES:
            key = label.strip()
            wall, comp = med[f"wall/{key}"], med[f"compute/{key}"]
            if wall == 0 and comp == 0:
                continue
            out.append(f"| {label} | {wall:.3f} | {comp:.3f} | {wall / step:.0%} |")
        ov = wl["summary"]["overhead_frac"]
        out += [
            f"| **step** | **{step:.3f}** | {med['compute_union_s']:.3f} (union) | 100% |",
            f"| orchestration overhead | {med['overhead_s']:.3f} | | {ov['median']:.1%} "
            f"[{ov['min']:.1%}-{ov['max']:.1%}] |",
            "",
            f"Tokens/s: {med['gen_tokens_per_s']:.0f} generated per second of the generate phase "
            f"({med['vllm_tokens_per_s']:.0f} inside vLLM), {med['step_tokens_per_s']:.0f} per second of "
            f"step; {med['samples_per_s']:.2f} samples/s; mean response {med['mean_response_len']:.1f} "
            f"tokens; start-up {wl['startup_s']:.0f} s.",
            "",
        ]
    return out


def versus(res: dict[str, Any]) -> list[str]:
    out = [
        "| workload | ours samples/s | TRL samples/s | ours/TRL (paired) | ours start-up s | TRL start-up s "
        "| mean response tokens ours / TRL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["workloads"].items():
        out.append(
            f"| {name} | {_mmm(r['ours_samples_per_s'])} | {_mmm(r['trl_samples_per_s'])} | "
            f"{_mmm(r['ratio'])} | {r['ours_startup_s']['median']:.0f} | {r['trl_startup_s']['median']:.0f} | "
            f"{r['ours_mean_response_len']['median']:.1f} / {r['trl_mean_response_len']['median']:.1f} |"
        )
    out += ["", "Runs in order (each a fresh process; load average at the start of each run):", ""]
    out += [
        "| workload | repeat | side | samples/s | step s | start-up s | load avg |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    for name, r in res["workloads"].items():
        for run in r["runs"]:
            out.append(
                f"| {name} | {run['repeat']} | {run['side']} | {run['samples_per_s']:.2f} | "
                f"{', '.join(f'{s:.2f}' for s in run['step_s'])} | {run['startup_s']:.0f} | "
                f"{run['load']['start']['load_avg']} |"
            )
    ours_phases = []
    for name, r in res["workloads"].items():
        runs = [x for x in r["runs"] if x["side"] == "ours"]
        if runs:
            keys = list(runs[0]["phases"])
            med = {k: sorted(x["phases"][k]["median"] for x in runs)[len(runs) // 2] for k in keys}
            ov = sorted(x["overhead_frac"]["median"] for x in runs)[len(runs) // 2]
            ours_phases.append(f"| {name} | " + " | ".join(f"{med[k]:.2f}" for k in keys) + f" | {ov:.1%} |")
    if ours_phases:
        out += [
            "",
            "Our side's phases in these runs (medians, seconds):",
            "",
            "| workload | generate | score | advantages | train | sync | overhead |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *ours_phases,
        ]
    return out


def floor(res: dict[str, Any]) -> list[str]:
    m = res["matmul"]
    out = [
        "fp32 matmul rate (torch, best / median over shapes): "
        + "; ".join(
            f"{t} thread(s): {v['best_gflops']:.1f} / {v['median_gflops']:.1f} GFLOP/s" for t, v in m.items()
        )
        + f". Floor uses {res['rate_used_gflops']:.1f} GFLOP/s. Load average before the matmul runs "
        f"{res['load']['before_matmul']['load_avg']}, after {res['load']['after_matmul']['load_avg']}.",
        "",
        "| workload | side | N (matmul params) | FLOPs/step | floor s | step s | step / floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in res["workloads"]:
        s = e["summary"]
        out.append(
            f"| {e['workload']} | {e['side']} | {e['params']['matmul_params'] / 1e6:.2f}M | "
            f"{s['flops']['median']:.3g} | {s['floor_s']['median']:.3f} | {s['step_s']['median']:.3f} | "
            f"{s['step_over_floor']['median']:.0f}x |"
        )
    return out


def sync(res: dict[str, Any]) -> list[str]:
    out = [
        "| model | parameters sent | transport | wall s per sync | engine reload s | sender s | receiver s | MB/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["workloads"].items():
        for t in ("object_store", "broadcast"):
            x = r[t]
            out.append(
                f"| {name} | {r['bytes'] / 1e6:.1f} MB ({r['tensors']} tensors) | {t} | {_mmm(x['wall_s'], '{:.3f}')} | "
                f"{x['engine_reload_s']['median']:.3f} | {x['sender_task_s']['median']:.3f} | "
                f"{x['receiver_task_s']['median']:.3f} | {x['mb_per_s']:.0f} |"
            )
    return out


def scaling(res: dict[str, Any]) -> list[str]:
    out = [
        "| varied | prompts | samples | max new tokens | mean response | samples/step | step s | samples/s | overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["grid"]:
        out.append(
            f"| {r['axis']} | {r['prompts']} | {r['samples']} | {r['length']} | {r['mean_response_len']:.1f} | "
            f"{r['samples_per_step']} | {_mmm(r['step_s'], '{:.3f}')} | {r['samples_per_s']:.1f} | "
            f"{r['overhead_frac']['median']:.0%} |"
        )
    if res.get("topology"):
        out += [
            "",
            "| rollout engines | policy ranks | simulated nodes | step s | generate s | train s | overhead | start-up s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["topology"]:
            out.append(
                f"| {r['engines']} | {r['ranks']} | {r['nodes']} | {_mmm(r['step_s'], '{:.3f}')} | "
                f"{r['generate_s']['median']:.3f} | {r['train_s']['median']:.3f} | "
                f"{r['overhead_frac']['median']:.0%} | {r['startup_s']:.0f} |"
            )
    return out


def train(res: dict[str, Any]) -> list[str]:
    out = [
        f"Model {Path(res['model']).name}, batch {res['batch']} x {res['tokens_per_sequence']} tokens, micro-batch "
        f"{res['micro_batch']}, {res['threads']} thread; load average at start {res['load'][0]['load_avg']}, "
        f"at end {res['load'][-1]['load_avg']}.",
        "",
        "| variant | training pass s | tokens/s |",
        "|---|---:|---:|",
    ]
    for k, v in res["variants"].items():
        out.append(f"| {k} | {_mmm(v['step_s'])} | {v['tokens_per_s']:.0f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    results = Path(args.results)
    sections = [
        ("Step breakdown", "step_breakdown", breakdown),
        ("GRPO vs TRL", "grpo_vs_trl", versus),
        ("Compute floor", "compute_floor", floor),
        ("Weight sync", "weight_sync", sync),
        ("Scaling", "scaling", scaling),
        ("Training pass", "train_step", train),
    ]
    for title, name, fn in sections:
        res = _load(results, name)
        print(f"## {title} ({name}.json)\n")
        print("\n".join(fn(res)) if res else f"(no {name}.json yet)")
        print()


if __name__ == "__main__":
    main()
