"""Our GRPO side by side with TRL's `GRPOTrainer` on the same workload, alternating the two in one run.

Same on both sides: model, prompt file (and chat template), reward function (our rule function, imported
by both), samples per prompt, response length, prompts per optimiser step, one optimiser step per batch
(micro-batches accumulated), KL to a frozen reference (k3 in the loss, coefficient `beta`), clip 0.2,
group-std advantages, token-mean loss, learning rate, fp32 (CPU). Different by design: we generate with
vLLM in a Ray actor and train with DeepSpeed in another; TRL generates with transformers `generate` and
trains in one process. Each side runs in its own process from a cold start; per repeat both sides run,
their order alternating, so that the other load on the machine hits both alike. Throughput = samples per
second over the timed optimisation steps (after `--warmup` untimed ones); start-up is reported apart.

bash bench/setup_trl.sh                                    # once: TRL in bench/.trl-venv
python -m bench.grpo_vs_trl                                # SmolLM2 8x4x64 + tiny, 3 repeats (~40 min)
python -m bench.grpo_vs_trl --quick                        # tiny only, 1 repeat (~3-4 min)

Writes bench/results/grpo_vs_trl.json: top-level keys for the headline workload (`workload`,
`ours_samples_per_s`, `trl_samples_per_s`, `ratio`: min/median/max) and `workloads` with every workload.
PPO: TRL 1.16 ships no PPO trainer any more (trl.trainer has GRPO, RLOO, DPO, KTO, reward, SFT...), so
there is no PPO comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, smollm2_dir, snapshot, spread, tiny_model_dir, write_result
from bench.ours_run import run_ours_subprocess

TRL_PYTHON = ROOT / "bench" / ".trl-venv" / "bin" / "python"


def specs() -> dict[str, dict[str, Any]]:
    """The workloads: the headline (SmolLM2-135M-Instruct, 8 prompts x 4 samples, 64-token responses, KL
    to a reference) and the tiny model, where fixed per-step costs dominate."""
    return {
        "smollm2_8x4x64": {
            "workload": "smollm2",
            "model": str(smollm2_dir()),
            "prompts": str(ROOT / "jobs" / "data" / "chat_prompts.jsonl"),
            "chat": True,
            "reward": "rlhf_ray.rewards_builtin:concise_reward",
            "prompts_per_step": 8,
            "samples": 4,
            "max_new_tokens": 64,
            "micro_batch": 8,
            "beta": 0.05,
            "lr": 1e-6,
        },
        "tiny_8x4x8": {
            "workload": "tiny",
            "model": str(tiny_model_dir()),
            "prompts": str(ROOT / "runs" / "tiny-task" / "prompts.jsonl"),
            "chat": False,
            "reward": "rlhf_ray.data.synthetic:digit_shaped_reward",
            "prompts_per_step": 8,
            "samples": 4,
            "max_new_tokens": 8,
            "micro_batch": 16,
            "beta": 0.01,
            "lr": 2e-3,
        },
    }


def ours_overrides(w: dict[str, Any], threads: int) -> list[str]:
    batch = w["prompts_per_step"] * w["samples"]
    return [
        *(f"placement.{role}.num_threads={threads}" for role in ("policy", "rollout", "reference", "reward")),
        f"model.policy_path={w['model']}",
        f"data.train_path={w['prompts']}",
        f"data.apply_chat_template={str(w['chat']).lower()}",
        "model.dtype=float32",
        "algorithm.estimator=grpo",
        f"run.prompts_per_step={w['prompts_per_step']}",
        f"rollout.samples_per_prompt={w['samples']}",
        f"rollout.max_new_tokens={w['max_new_tokens']}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        f"algorithm.mini_batch_size={batch}",
        "algorithm.ppo_epochs=1",
        f"trainer.micro_batch_size={w['micro_batch']}",
        "trainer.num_ranks=1",
        f"trainer.lr={w['lr']:.6e}",  # '1e-06' is a string to YAML; '1.000000e-06' is a number
        f"algorithm.kl_coef={w['beta']:.6e}",
        "algorithm.kl_estimator=k3",
        "algorithm.kl_in=loss",
        "algorithm.clip_eps=0.2",
        "algorithm.loss_agg=token-mean",
        "algorithm.whiten_advantages=false",  # TRL does not whiten across the batch after group scaling
        "reward.kind=rule",
        f"reward.function={w['reward']}",
    ]


def run_ours(w: dict[str, Any], warmup: int, steps: int, threads: int) -> dict[str, Any]:
    t = time.perf_counter()
    rec = run_ours_subprocess(w["workload"], ours_overrides(w, threads), warmup, steps)
    wall = time.perf_counter() - t
    step_s = [s["metrics"]["time/step"] for s in rec["steps"]]
    samples = [s["sequences"] for s in rec["steps"]]
    return {
        "side": "ours",
        "process_wall_s": wall,
        "startup_s": rec["startup_s"],
        "step_s": step_s,
        "samples_per_s": sum(samples) / sum(step_s),
        "mean_response_len": sum(s["generated_tokens"] for s in rec["steps"]) / sum(samples),
        "prompt_tokens_per_sample": sum(s["prompt_tokens"] for s in rec["steps"]) / sum(samples),
        "phases": {
            k: spread([s["metrics"].get(k, 0.0) for s in rec["steps"]])
            for k in ("time/generate", "time/score", "time/advantages", "time/train", "time/sync")
        },
        "overhead_frac": spread([s["timeline"]["overhead_frac"] for s in rec["steps"]]),
        "load": {"start": rec["before"], "end": rec["after"]},
    }


def run_trl(w: dict[str, Any], warmup: int, steps: int, threads: int) -> dict[str, Any]:
    out = Path(f"/tmp/rlhf_bench_trl_{os.getpid()}_{time.time_ns()}.json")
    cmd = [str(TRL_PYTHON), "-m", "bench.trl_grpo_worker", "--model", w["model"], "--prompts", w["prompts"]]
    cmd += ["--reward", w["reward"], "--prompts-per-step", str(w["prompts_per_step"])]
    cmd += ["--samples", str(w["samples"]), "--max-new-tokens", str(w["max_new_tokens"])]
    cmd += ["--micro-batch", str(w["micro_batch"]), "--beta", str(w["beta"]), "--lr", str(w["lr"])]
    cmd += ["--warmup", str(warmup), "--steps", str(steps), "--out", str(out), "--threads", str(threads)]
    cmd += ["--chat"] if w["chat"] else []
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    start = snapshot()
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if not out.is_file():
        raise RuntimeError(f"TRL run failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    rec = json.loads(out.read_text())
    out.unlink()
    samples = rec["samples_per_step"]
    lengths = [float(lg.get("completions/mean_length", "nan")) for lg in rec["logs"]]
    return {
        "side": "trl",
        "process_wall_s": wall,
        "startup_s": wall - sum(rec["step_s"]) - sum(rec["warmup_step_s"]),
        "step_s": rec["step_s"],
        "samples_per_s": samples * len(rec["step_s"]) / sum(rec["step_s"]),
        "mean_response_len": sum(lengths) / max(len(lengths), 1),
        "threads": rec["threads"],
        "versions": rec["versions"],
        "logs": rec["logs"],
        "load": {"start": start, "end": snapshot()},
    }


def compare(
    name: str,
    w: dict[str, Any],
    repeats: int,
    warmup: int,
    steps: int,
    threads: int,
    earlier: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`repeats` more pairs of runs (order alternating), summarised together with `earlier` runs of the
    same workload (from a previous invocation with --append)."""
    runs: list[dict[str, Any]] = list(earlier or [])
    first = 1 + max((x["repeat"] for x in runs), default=-1)
    for r in range(first, first + repeats):
        order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
        for side in order:
            run = (
                run_ours(w, warmup, steps, threads) if side == "ours" else run_trl(w, warmup, steps, threads)
            )
            run["repeat"] = r
            run["timed_steps"], run["warmup_steps"] = steps, warmup
            runs.append(run)
            print(
                f"{name} repeat {r} {side}: {run['samples_per_s']:.2f} samples/s, steps "
                f"{[round(s, 2) for s in run['step_s']]}, start-up {run['startup_s']:.0f} s, load "
                f"{run['load']['start']['load_avg'][0]}",
                flush=True,
            )
    return summarise(w, runs, threads)


def summarise(w: dict[str, Any], runs: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    side = {
        k: sorted((x for x in runs if x["side"] == k), key=lambda x: x["repeat"]) for k in ("ours", "trl")
    }
    ours = [x["samples_per_s"] for x in side["ours"]]
    trl = [x["samples_per_s"] for x in side["trl"]]
    paired = [o / t for o, t in zip(ours, trl)]  # the two runs of one repeat, back to back
    o_med, t_med = spread(ours)["median"], spread(trl)["median"]
    steps = sorted({x.get("timed_steps", len(x["step_s"])) for x in runs})
    return {
        "workload": (
            f"{Path(w['model']).name}: {w['prompts_per_step']} prompts x {w['samples']} samples, "
            f"<= {w['max_new_tokens']} new tokens, KL beta {w['beta']}, fp32, one optimiser step per batch "
            f"(micro-batch {w['micro_batch']}), {'/'.join(map(str, steps))} timed steps per run after a "
            f"warm-up step, {len(paired)} repeats"
        ),
        "spec": w,
        "precision": "float32 on both sides (CPU)",
        "threads": threads,  # per compute process, both sides
        "ours_samples_per_s": spread(ours),
        "trl_samples_per_s": spread(trl),
        "ratio": spread(paired) | {"of_medians": o_med / t_med},
        "ours_startup_s": spread([x["startup_s"] for x in side["ours"]]),
        "trl_startup_s": spread([x["startup_s"] for x in side["trl"]]),
        "ours_mean_response_len": spread([x["mean_response_len"] for x in side["ours"]]),
        "trl_mean_response_len": spread([x["mean_response_len"] for x in side["trl"]]),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=None, help="names from specs(); default: all")
    p.add_argument("--repeats", type=int, default=None, help="runs per side (default 2 SmolLM2, 3 tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 2 SmolLM2, 10 tiny)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny only, 1 repeat, 5 timed steps")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads per compute process on BOTH sides (default: all cores): the TRL process, and "
        "each of our roles (placement.<role>.num_threads; they take turns within a step). Under heavy other "
        "load 1 thread may be faster",
    )
    p.add_argument("--name", default=None, help="result file bench/results/<name>.json")
    p.add_argument(
        "--append",
        action="store_true",
        help="add the new repeats to the runs already in the result file (summaries over all of them)",
    )
    args = p.parse_args(argv)
    if not TRL_PYTHON.is_file():
        sys.exit(f"TRL is not installed in {TRL_PYTHON.parent.parent}: run `bash bench/setup_trl.sh` first")
    all_specs = specs()
    names = args.workloads or (["tiny_8x4x8"] if args.quick else list(all_specs))
    unknown = [n for n in names if n not in all_specs]
    if unknown:
        sys.exit(f"unknown workload(s) {unknown}: choose from {list(all_specs)}")
    out_name = args.name or ("grpo_vs_trl_quick" if args.quick else "grpo_vs_trl")
    result: dict[str, Any] = {"machine": machine(), "load_at_start": snapshot(), "workloads": {}}
    if args.append and (RESULTS / f"{out_name}.json").is_file():
        result = json.loads((RESULTS / f"{out_name}.json").read_text())
    for name in names:
        w = all_specs[name]
        big = w["workload"] == "smollm2"
        steps = args.steps or (5 if args.quick else (2 if big else 10))
        repeats = 1 if args.quick else (args.repeats or (2 if big else 3))
        earlier = result["workloads"].get(name, {}).get("runs", [])
        result["workloads"][name] = compare(name, w, repeats, args.warmup, steps, args.threads, earlier)
        headline = next((n for n in all_specs if n in result["workloads"]), name)  # the first spec measured
        head = result["workloads"][headline]
        result |= {k: head[k] for k in ("workload", "ours_samples_per_s", "trl_samples_per_s", "ratio")}
        result["headline"] = headline
        result["load_at_end"] = snapshot()
        write_result(out_name, result)  # after every workload: a cut-off run keeps what it measured
    for name, res in result["workloads"].items():
        o, t, r = res["ours_samples_per_s"], res["trl_samples_per_s"], res["ratio"]
        print(
            f"{name}: ours {o['median']:.2f} [{o['min']:.2f}-{o['max']:.2f}] samples/s, TRL {t['median']:.2f} "
            f"[{t['min']:.2f}-{t['max']:.2f}], ratio ours/TRL {r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
        )
    print(f"wrote {write_result(out_name, result)}")
    return result


if __name__ == "__main__":
    main()
