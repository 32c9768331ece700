"""Does our GRPO improve a real model as much as TRL's, and in less time? SmolLM2-135M-Instruct on the
arithmetic word problems (`jobs.arithmetic_task`), ours (`jobs.ppo` on jobs/configs/smollm2_arithmetic.yaml)
and TRL's `GRPOTrainer` (bench/trl_grpo_worker.py in bench/.trl-venv) with the same settings, per seed.

Same on both sides: the base model, the training problems, prompts per step, samples per prompt, max new
tokens, temperature 1 (top_p 1, no top_k), learning rate (constant, AdamW), KL beta to the frozen base (k3,
in the loss), clip 0.2, group-std advantages, token-mean loss, one optimiser step per batch, fp32 (CPU),
2 torch threads per compute process, and the training reward (`arithmetic_format_reward`: 1 for the right
final number, plus 0.2 for a short answer ending on a number as the prompt asks; each side gets the
record's `answer` field).
Then one evaluator (`bench.heldout_eval`, transformers `generate`) scores the base model and every trained
policy on the first 100 held-out problems with the strict score (final number right), greedy and sampled.

bash bench/setup_trl.sh                              # once: TRL in bench/.trl-venv
python -m bench.learning_vs_trl                      # 2 seeds per side, 60 steps (~1 h 40 min on 2 cores)
python -m bench.learning_vs_trl --seeds 0 --sides ours   # one run; runs are kept and summarised together

Each run is kept in bench/results/learning_vs_trl_runs/<side>_seed<N>.json (per-step reward, wall time,
held-out scores), so a long comparison can be made in parts; every invocation rewrites the summary
bench/results/learning_vs_trl.json and the plot docs/img/learning_vs_trl.png from all kept runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, smollm2_dir, snapshot, spread, write_result

TRL_PYTHON = ROOT / "bench" / ".trl-venv" / "bin" / "python"
RUNS = RESULTS / "learning_vs_trl_runs"
PLOT = ROOT / "docs" / "img" / "learning_vs_trl.png"
CONFIG = ROOT / "jobs" / "configs" / "smollm2_arithmetic.yaml"
TRAIN = ROOT / "jobs" / "data" / "arithmetic_train.jsonl"
REWARD = "rlhf_ray.rewards_builtin:arithmetic_format_reward"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": str(smollm2_dir()),
        "train": str(TRAIN),
        "reward": args.reward,
        "prompts_per_step": args.prompts_per_step,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "micro_batch": args.micro_batch,
        "lr": args.lr,
        "beta": args.beta,
        "steps": args.steps,
        "threads": args.threads,
        "eval_prompts": args.eval_prompts,
        "eval_samples": args.eval_samples,
    }


def run_ours(s: dict[str, Any], seed: int, work: Path) -> dict[str, Any]:
    """`jobs.ppo` in its own process, saving the policy to <work>/policy; per-step reward from its
    metrics.jsonl."""
    batch = s["prompts_per_step"] * s["samples"]
    overrides = [
        *(f"placement.{r}.num_threads={s['threads']}" for r in ("policy", "rollout", "reference", "reward")),
        f"model.policy_path={s['model']}",
        "model.dtype=float32",
        f"run.output_dir={work}",
        f"run.seed={seed}",
        f"run.total_steps={s['steps']}",
        f"run.prompts_per_step={s['prompts_per_step']}",
        "run.eval_prompts=0",  # the common evaluator scores every side afterwards
        f"rollout.samples_per_prompt={s['samples']}",
        f"rollout.max_new_tokens={s['max_new_tokens']}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        f"algorithm.mini_batch_size={batch}",
        "algorithm.ppo_epochs=1",
        f"algorithm.kl_coef={s['beta']:.6e}",
        "algorithm.kl_estimator=k3",
        "algorithm.kl_in=loss",
        "algorithm.clip_eps=0.2",
        "algorithm.loss_agg=token-mean",
        "algorithm.whiten_advantages=false",  # TRL does not whiten across the batch after group scaling
        f"trainer.micro_batch_size={s['micro_batch']}",
        f"trainer.lr={s['lr']:.6e}",  # '1e-05' is a string to YAML; '1.000000e-05' a number
        f"reward.function={s['reward']}",
        f"checkpoint.interval={s['steps'] + 1}",  # one checkpoint, at the end, as TRL saves once
        "checkpoint.interval_minutes=0",
    ]
    cmd = [sys.executable, "-m", "jobs.ppo", "--config", str(CONFIG), *overrides]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=4 * 3600)
    wall = time.perf_counter() - t
    metrics = work / "metrics.jsonl"
    if proc.returncode != 0 or not (work / "policy").is_dir():
        raise RuntimeError(f"our run failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "reward/mean" in r]
    return {
        "side": "ours",
        "seed": seed,
        "process_wall_s": wall,
        "train_s": sum(r["time/step"] for r in rows),
        "reward": [r["reward/mean"] for r in rows],
        "kl": [r.get("kl") for r in rows],
        "response_length": [r.get("response_length/mean") for r in rows],
        "policy": str(work / "policy"),
        "command": " ".join(cmd[1:]),
    }


def run_trl(s: dict[str, Any], seed: int, work: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer in bench/.trl-venv, saving the policy to <work>/policy."""
    out = work / "trl.json"
    cmd = [str(TRL_PYTHON), "-m", "bench.trl_grpo_worker", "--model", s["model"], "--prompts", s["train"]]
    cmd += ["--chat", "--reward", s["reward"], "--prompts-per-step", str(s["prompts_per_step"])]
    cmd += ["--samples", str(s["samples"]), "--max-new-tokens", str(s["max_new_tokens"])]
    cmd += ["--micro-batch", str(s["micro_batch"]), "--beta", str(s["beta"]), "--lr", str(s["lr"])]
    cmd += ["--warmup", "0", "--steps", str(s["steps"]), "--seed", str(seed), "--threads", str(s["threads"])]
    cmd += ["--save", str(work / "policy"), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(s["threads"]), HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=4 * 3600)
    wall = time.perf_counter() - t
    if not out.is_file():
        raise RuntimeError(f"TRL run failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    rec = json.loads(out.read_text())
    return {
        "side": "trl",
        "seed": seed,
        "process_wall_s": wall,
        "train_s": rec["train_s"],
        "reward": [lg["reward"] for lg in rec["logs"] if "reward" in lg],
        "kl": [lg.get("kl") for lg in rec["logs"] if "reward" in lg],
        "response_length": [lg.get("completions/mean_length") for lg in rec["logs"] if "reward" in lg],
        "policy": str(work / "policy"),
        "versions": rec["versions"],
        "command": " ".join(cmd[1:]),
    }


def heldout(models: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """`bench.heldout_eval` in its own process (frees the models' memory after)."""
    out = Path(f"/tmp/rlhf_heldout_{os.getpid()}_{time.time_ns()}.json")
    cmd = [sys.executable, "-m", "bench.heldout_eval", "--models", *models, "--out", str(out)]
    cmd += ["--prompts", str(args.eval_prompts), "--samples", str(args.eval_samples)]
    cmd += ["--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if not out.is_file():
        raise RuntimeError(f"held-out evaluation failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def mean_se(values: list[float]) -> dict[str, float]:
    """Mean and its standard error (0 with one value: no spread to estimate)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"n": n, "mean": mean, "se": math.sqrt(var / n)}


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy `p` measured on `n` independent answers."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def summarise(s: dict[str, Any], base: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per side: held-out scores after training (mean over seeds), gains over the shared base model, wall
    times and the reward curve's ends. Standard errors: over seeds when a side has two or more; with one
    seed, the evaluation's own binomial error (100 greedy answers, 100 x samples sampled ones), which is
    all the uncertainty one run can show (it leaves out the seed-to-seed spread, so it is a lower bound)."""
    n_eval = {
        "greedy": s.get("eval_prompts", 100),
        "sampled": s.get("eval_prompts", 100) * s.get("eval_samples", 2),
    }
    sides: dict[str, Any] = {}
    for side in ("ours", "trl"):
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        d: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for mode in ("greedy", "sampled"):
            after = mean_se([r["heldout"][mode] for r in mine])
            if after["n"] < 2:
                after |= {"se": binomial_se(after["mean"], n_eval[mode]), "se_kind": "binomial (one seed)"}
            else:
                after["se_kind"] = "over seeds"
            d[f"{mode}_after"] = after
            d[f"{mode}_gain"] = after["mean"] - base[mode]
        d |= {
            "train_s": spread([r["train_s"] for r in mine]),
            "process_wall_s": spread([r["process_wall_s"] for r in mine]),
            "reward_first10": mean_se([sum(r["reward"][:10]) / 10 for r in mine]),
            "reward_last10": mean_se([sum(r["reward"][-10:]) / 10 for r in mine]),
        }
        sides[side] = d
    verdict: dict[str, Any] = {}
    if "ours" in sides and "trl" in sides:
        o, t = sides["ours"], sides["trl"]
        for mode in ("greedy", "sampled"):
            # both sides start from the same base model, so comparing gains = comparing after-scores
            se = math.sqrt(o[f"{mode}_after"]["se"] ** 2 + t[f"{mode}_after"]["se"] ** 2)
            diff = o[f"{mode}_gain"] - t[f"{mode}_gain"]
            verdict[f"{mode}_gain_minus_trl"] = {"diff": diff, "se": se}
            verdict[f"{mode}_gain_at_least_trl_within_2se"] = diff >= -2 * se
        verdict["less_wall_time"] = o["process_wall_s"]["median"] < t["process_wall_s"]["median"]
        verdict["seeds_per_side"] = {"ours": len(o["seeds"]), "trl": len(t["seeds"])}
    return {"settings": s, "base": base, "sides": sides, "verdict": verdict}


def plot(summary: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    colours = {"ours": "tab:blue", "trl": "tab:orange"}
    for r in runs:
        y = r["reward"]
        k = 5  # a running mean over 5 steps: one step's 16 samples are noisy
        smooth = [
            sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))
        ]
        ax.plot(range(1, len(y) + 1), y, color=colours[r["side"]], alpha=0.18, lw=0.8)
        ax.plot(
            range(1, len(y) + 1),
            smooth,
            color=colours[r["side"]],
            lw=1.6,
            label=f"{r['side']} seed {r['seed']}",
        )
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training reward (mean per step; 5-step running mean)")
    ax.set_title("GRPO on SmolLM2-135M-Instruct, arithmetic problems")
    ax.legend(fontsize=8)
    base = summary["base"]
    labels, greedy, sampled, gerr, serr = ["base"], [base["greedy"]], [base["sampled"]], [0.0], [0.0]
    for side, d in summary["sides"].items():
        labels.append(side)
        greedy.append(d["greedy_after"]["mean"])
        sampled.append(d["sampled_after"]["mean"])
        gerr.append(d["greedy_after"]["se"])
        serr.append(d["sampled_after"]["se"])
    x = range(len(labels))
    bx.bar([i - 0.2 for i in x], greedy, 0.4, yerr=gerr, label="greedy", color="tab:green")
    bx.bar([i + 0.2 for i in x], sampled, 0.4, yerr=serr, label="sampled (T=1)", color="tab:gray")
    bx.set_xticks(list(x), labels)
    bx.set_ylabel("held-out accuracy (strict, 100 problems)")
    bx.set_title("held-out score (±1 s.e.; over seeds, or binomial for one)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--reward", default=REWARD, help="training reward, module:function (rule protocol)")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument(
        "--summarise-only", action="store_true", help="no new runs: summary and plot from kept runs"
    )
    args = p.parse_args(argv)
    s = settings(args)
    RUNS.mkdir(parents=True, exist_ok=True)
    base_path = RUNS / "base.json"
    if not base_path.is_file() and not args.summarise_only:
        base_path.write_text(json.dumps(heldout([s["model"]], args)[0], indent=1))
        print(f"base: {json.loads(base_path.read_text())['greedy']:.3f} greedy", flush=True)
    if not args.summarise_only:
        if not TRL_PYTHON.exists() and "trl" in args.sides:
            sys.exit("TRL is not installed for the benchmark: run `bash bench/setup_trl.sh` first")
        for seed in args.seeds:
            for side in args.sides:
                work = Path(f"/tmp/rlhf_learning_{side}_{seed}_{os.getpid()}")
                shutil.rmtree(work, ignore_errors=True)
                start = snapshot()
                run = (run_ours if side == "ours" else run_trl)(s, seed, work)
                run["settings"], run["load"] = s, {"start": start, "end": snapshot()}
                run["heldout"] = heldout([run["policy"]], args)[0]
                (RUNS / f"{side}_seed{seed}.json").write_text(json.dumps(run, indent=1))
                print(
                    f"{side} seed {seed}: reward first 10 {sum(run['reward'][:10]) / 10:.3f} -> last 10 "
                    f"{sum(run['reward'][-10:]) / 10:.3f}; held-out greedy {run['heldout']['greedy']:.3f}, "
                    f"sampled {run['heldout']['sampled']:.3f}; {run['process_wall_s']:.0f} s",
                    flush=True,
                )
                shutil.rmtree(work, ignore_errors=True)
    runs = [json.loads(f.read_text()) for f in sorted(RUNS.glob("*_seed*.json"))]
    summary = summarise(s, json.loads(base_path.read_text()), runs)
    summary["machine"] = machine()
    summary["command"] = "python -m bench.learning_vs_trl --seeds " + " ".join(
        str(r["seed"]) for r in runs if r["side"] == "ours"
    )
    write_result("learning_vs_trl", summary)
    plot(summary, runs)
    print(
        json.dumps({k: summary[k] for k in ("base", "verdict")} | {"sides": summary["sides"]}, indent=1)[
            :3000
        ]
    )
    return summary


if __name__ == "__main__":
    main()
