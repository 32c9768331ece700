"""Step breakdown: where the time of one RL step goes, per phase, for the tiny config and SmolLM2-135M.

For every phase two numbers: the driver's wall time of the phase (PPOTrainer's `time/*` metrics) and the
role's own compute inside it (its `task:execute` time in Ray's timeline, `bench.timeline`). Orchestration
overhead = step wall time - time during which at least one role was computing. Plus tokens/s
(generated tokens over generation time, and over the whole step) and samples/s.

python -m bench.step_breakdown                  # tiny + SmolLM2 (as shipped) + SmolLM2 8x4x64 (~20 min)
python -m bench.step_breakdown --quick          # tiny only, 3 timed steps (~2-3 min)
python -m bench.step_breakdown --workloads tiny --steps 10

Writes bench/results/step_breakdown.json and prints a Markdown table per workload.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench.common import machine, snapshot, spread, write_result
from bench.ours_run import run_ours_subprocess

# name -> (workload of bench.common, extra overrides); SmolLM2 always with one policy rank (shared memory)
WORKLOADS: dict[str, tuple[str, list[str]]] = {
    "tiny": ("tiny", []),
    "smollm2": ("smollm2", []),
    "smollm2_8x4x64": (
        "smollm2",
        [
            "run.prompts_per_step=8",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=64",
            "algorithm.mini_batch_size=32",
            "trainer.micro_batch_size=8",
        ],
    ),
}

# (row label, driver wall-time metric, timeline compute keys whose max is the role compute of the phase)
PHASES = [
    ("generate", "time/generate", ["compute/generate"]),
    (
        "score (parallel)",
        "time/score",
        ["compute/reference", "compute/reward", "compute/logprobs", "compute/critic"],
    ),
    ("  reference", "time/reference", ["compute/reference"]),
    ("  reward", "time/reward", ["compute/reward"]),
    ("  policy log-probs", "time/logprobs", ["compute/logprobs"]),
    ("  critic values", "time/critic", ["compute/critic"]),
    ("advantages", "time/advantages", ["compute/advantages"]),
    ("train", "time/train", ["compute/train_policy", "compute/train_critic"]),
    ("weight sync", "time/sync", ["compute/sync_send", "compute/sync_receive"]),
]


def step_row(step: dict[str, Any]) -> dict[str, float]:
    """The figures of one timed step."""
    m, tl = step["metrics"], step["timeline"]
    row = {f"wall/{label.strip()}": m.get(key, 0.0) for label, key, _ in PHASES}
    for label, _, keys in PHASES:
        values = [tl.get(k, 0.0) for k in keys]
        # sync: send then receive (object store: sequential; broadcast: concurrent, so this is an upper bound)
        row[f"compute/{label.strip()}"] = sum(values) if label == "weight sync" else max(values)
    step_s = m["time/step"]
    samples = step["sequences"]
    row |= {
        "step_s": step_s,
        "compute_union_s": tl["compute/union"],
        "overhead_s": tl["overhead"],
        "overhead_frac": tl["overhead_frac"],
        "fetch_args_s": tl["transfer/fetch_args"],
        "store_outputs_s": tl["transfer/store_outputs"],
        "vllm_generate_s": step["vllm_generate_s"],
        "generated_tokens": step["generated_tokens"],
        "prompt_tokens": step["prompt_tokens"],
        "samples": samples,
        "gen_tokens_per_s": step["generated_tokens"] / max(m["time/generate"], 1e-9),
        "vllm_tokens_per_s": step["generated_tokens"] / max(step["vllm_generate_s"], 1e-9),
        "step_tokens_per_s": step["generated_tokens"] / step_s,
        "samples_per_s": samples / step_s,
        "mean_response_len": step["generated_tokens"] / max(samples, 1),
    }
    return row


def summarise(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = [step_row(s) for s in record["steps"]]
    return {k: spread([r[k] for r in rows]) for k in rows[0]}


def markdown(name: str, record: dict[str, Any], summary: dict[str, dict[str, float]]) -> str:
    med = {k: v["median"] for k, v in summary.items()}
    step = med["step_s"]
    r = record["resolved"]
    lines = [
        f"### {name}: {r['prompts_per_step']} prompts x {r['samples_per_prompt']} samples, "
        f"<= {r['max_new_tokens']} new tokens, {r['estimator']}, {r['num_ranks']} policy rank(s), "
        f"{len(record['steps'])} timed steps (medians)",
        "",
        "| phase | wall s | role compute s | share of step |",
        "|---|---:|---:|---:|",
    ]
    for label, _, _ in PHASES:
        key = label.strip()
        wall, comp = med[f"wall/{key}"], med[f"compute/{key}"]
        if wall == 0 and comp == 0:
            continue
        lines.append(f"| {label} | {wall:.3f} | {comp:.3f} | {wall / step:.0%} |")
    lines += [
        f"| **step** | **{step:.3f}** | {med['compute_union_s']:.3f} (union) | 100% |",
        f"| orchestration overhead | {med['overhead_s']:.3f} | | {med['overhead_frac']:.1%} |",
        "",
        f"Generated tokens/s: {med['gen_tokens_per_s']:.0f} over the generate phase, "
        f"{med['vllm_tokens_per_s']:.0f} inside vLLM, {med['step_tokens_per_s']:.0f} over the whole step; "
        f"{med['samples_per_s']:.2f} samples/s; mean response {med['mean_response_len']:.1f} tokens. "
        f"Start-up (roles up, before step 1): {record['startup_s']:.0f} s. "
        f"Load average before/after: {record['before']['load_avg']} / {record['after']['load_avg']}; "
        f"free -g available before: {record['before']['mem_gib']['available']} GiB.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per workload")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny only, 3 timed steps")
    p.add_argument("--name", default=None, help="result file bench/results/<name>.json")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads of every role (placement.<role>.num_threads; default: all cores, the roles "
        "take turns within a step), as in bench.grpo_vs_trl",
    )
    args = p.parse_args(argv)
    threads = [
        f"placement.{r}.num_threads={args.threads}" for r in ("policy", "rollout", "reference", "reward")
    ]
    names = args.workloads or (["tiny"] if args.quick else list(WORKLOADS))
    result: dict[str, Any] = {"machine": machine(), "workloads": {}}
    text = []
    for name in names:
        workload, extra = WORKLOADS[name]
        steps = args.steps or (3 if args.quick else (10 if workload == "tiny" else 3))
        before = snapshot()
        record = run_ours_subprocess(workload, [*extra, *threads], args.warmup, steps)
        summary = summarise(record)
        result["workloads"][name] = {
            "settings": record["resolved"],
            "overrides": record["overrides"],
            "startup_s": record["startup_s"],
            "load": {"before": before, "run_start": record["before"], "run_end": record["after"]},
            "summary": summary,
            "steps": record["steps"],
        }
        text.append(markdown(name, record, summary))
        print(text[-1], flush=True)
    path = write_result(args.name or ("step_breakdown_quick" if args.quick else "step_breakdown"), result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
