"""Numerical parity of the deterministic stages with TRL (issue 12): SFT, the reward model (Bradley-Terry)
and DPO (sigmoid), each for N optimiser steps on both sides from the same SmolLM2-135M-Instruct weights,
on the same rows in the same order, compared step by step.

Our side runs the stage ranks that the jobs run (`actors.sft_trainer.SFTRank`, `RewardRank`, `DPORank`:
their DeepSpeed engine, micro-batching and loss weighting, `rlhf_ray.algorithms` losses, the data
encoders `encode_sft` / `encode_preferences`), one rank IN THIS PROCESS, the way the tests build ranks,
not through Ray: the Ray actor only moves the same call to another process, and 3 stages x 20 steps on 2
cores leave no room for its start-up. The driver's own shuffling (`fit_epochs`) is not used: both sides
take the rows in file order, `--batch` rows per optimiser step. TRL's side is bench/trl_parity_worker.py
in bench/.trl-venv (`bash bench/setup_trl.sh`); its docstring lists the settings aligned there.

Settings on both sides: fp32, no dropout, no gradient checkpointing, torch AdamW (betas 0.9/0.999, eps
1e-8, weight decay `--weight-decay` on matrices only), constant learning rate without warm-up, gradient
clip 1.0, plain text (no chat template), EOS after every answer. Our micro-batch is half the batch (two
micro-batches accumulated per step), TRL's the whole batch: the loss weighting must make that the same.

Compared per step: the loss (before the update); DPO: rewards/chosen, rewards/rejected, the margin and
the reward accuracy; reward model: the pair accuracy and the margin. Bars: relative difference of the
loss <= 1e-4 at step 1 and <= 1e-3 through the last step. Known differences that are definitions, not
errors, are stated in the result's `notes` (accuracy of tied pairs).

bash bench/setup_trl.sh                     # once: TRL in bench/.trl-venv
python -m bench.parity_vs_trl               # 20 steps per stage, batch 8 (~15-25 min on 2 cores)
python -m bench.parity_vs_trl --quick       # 3 steps per stage (parity_vs_trl_quick.json, no plot)

Writes bench/results/parity_vs_trl.json and docs/img/parity_vs_trl.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, machine, smollm2_dir, snapshot

TRL_PYTHON = ROOT / "bench" / ".trl-venv" / "bin" / "python"
DATA = ROOT / "jobs" / "data" / "arithmetic_train.jsonl"
PLOT = ROOT / "docs" / "img" / "parity_vs_trl.png"
STAGES = ("sft", "reward_model", "dpo")
BAR_STEP1, BAR_ALL = 1e-4, 1e-3

# (our stat, TRL's metric) compared per stage besides the loss
COMPARED = {
    "sft": [],
    "reward_model": [("accuracy", "accuracy"), ("margin", "margin")],
    "dpo": [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
    ],
}


# ---- data ---------------------------------------------------------------------------------------------
def parity_records(n: int) -> list[dict[str, str]]:
    """`n` rows from the arithmetic task (jobs/data/arithmetic_train.jsonl, the first ones, in file order):
    prompt = the question and a newline; response = chosen = "The answer is <answer>."; rejected = a wrong
    number, worded in one of two ways so that the two sides differ in length. Plain text: the prompt ends
    in a newline so that tokenising prompt + answer together (TRL) splits where tokenising them apart (ours)
    does; the run checks that both sides train on the same token ids."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    out = []
    for i, r in enumerate(rows):
        answer = int(r["answer"])
        wrong = answer + 1 + i % 7
        rejected = f"The answer is {wrong}." if i % 2 else f"I think it is {wrong}, more or less."
        right = f"The answer is {answer}."
        out.append({"prompt": r["prompt"] + "\n", "response": right, "chosen": right, "rejected": rejected})
    if len(out) < n:
        raise SystemExit(f"{DATA} has {len(out)} rows; {n} are needed")
    return out


# ---- our side -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def our_config(stage: str, model: str, args: argparse.Namespace, lr: float):
    """The config our stage ranks get (what `rlhf_ray.trainer.offline.rank_config` would hand them)."""
    from rlhf_ray.config import RLHFConfig

    section = {"epochs": 1, "batch_size": args.batch, "lr": lr, "beta": args.beta, "loss_type": "sigmoid"}
    return RLHFConfig.from_dict(
        {
            "model": {"policy_path": model, "reward_path": model, "dtype": "float32"},
            "data": {"max_prompt_len": 256, "max_response_len": 64},
            "trainer": {
                "num_ranks": 1,
                "lr": lr,
                "weight_decay": args.weight_decay,
                "warmup_steps": 0,
                "grad_clip": 1.0,
                "micro_batch_size": max(1, args.batch // 2),
            },
            "offline": {stage: section},
            "run": {"seed": 0},
        }
    )


def run_ours(stage: str, records: list[dict[str, str]], model: str, args: argparse.Namespace, lr: float):
    """`args.steps` optimiser steps of our `stage` rank, in this process. Returns (per-step stats, the
    encoded batch, seconds)."""
    import torch

    from actors.dpo_trainer import DPORank
    from actors.reward_trainer import RewardRank
    from actors.sft_trainer import SFTRank
    from rlhf_ray.data import encode_preferences, encode_sft
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.trainer.offline import trim_batch

    cfg = our_config(stage, model, args, lr)
    tok = load_tokenizer(model)
    encode = encode_sft if stage == "sft" else encode_preferences
    data = encode(records, tok, cfg.data)
    rank_cls = {"sft": SFTRank, "reward_model": RewardRank, "dpo": DPORank}[stage]
    rank = rank_cls(cfg, 0, 1, "127.0.0.1", _free_port())
    rank.init()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    steps = []
    start = time.perf_counter()
    for i in range(args.steps):
        mini = trim_batch(data.select(list(range(i * args.batch, (i + 1) * args.batch))))
        stats = rank.train(mini, args.beta, "sigmoid") if stage == "dpo" else rank.train(mini)
        steps.append(stats)
        print(f"  ours {stage} step {i + 1}: loss {stats['loss']:.6f}", flush=True)
    seconds = time.perf_counter() - start
    del rank
    gc.collect()
    return steps, data, seconds


# ---- TRL's side ---------------------------------------------------------------------------------------
def run_trl(stage: str, data_file: Path, model: str, args: argparse.Namespace, lr: float) -> dict[str, Any]:
    """bench/trl_parity_worker.py for `stage` in TRL's venv; its JSON record."""
    if not TRL_PYTHON.exists():
        raise SystemExit(f"{TRL_PYTHON} is missing: run `bash bench/setup_trl.sh` first")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        cmd = [str(TRL_PYTHON), "-m", "bench.trl_parity_worker", "--stage", stage, "--model", model]
        cmd += ["--data", str(data_file), "--batch", str(args.batch), "--steps", str(args.steps)]
        cmd += ["--lr", str(lr), "--weight-decay", str(args.weight_decay), "--beta", str(args.beta)]
        cmd += ["--out", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
        # not ours: the venv, and the torch.distributed variables our in-process ranks set (accelerate
        # would start a process group on our port)
        dropped = ("PYTHONPATH", "VIRTUAL_ENV", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
        dropped += ("LOCAL_RANK", "LOCAL_WORLD_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        record = json.loads(out.read_text())
    record["seconds"] = time.perf_counter() - start
    return record


# ---- comparison ---------------------------------------------------------------------------------------
def rel_diff(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|); 0 when both are 0."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def same_tokens(stage: str, data, trl_tokens: dict[str, list[list[int]]], n: int) -> dict[str, Any]:
    """Whether TRL trained on our token ids and masks, row by row (the first `n` rows)."""
    bad: list[int] = []
    first: dict[str, Any] = {}
    for i in range(n):
        if stage == "sft":
            length = int(data["attention_mask"][i].sum())
            ours = data["input_ids"][i, :length].tolist()
            ours_mask = data["response_mask"][i, :length].long().tolist()
            ok = trl_tokens["input_ids"][i] == ours and trl_tokens["completion_mask"][i] == ours_mask
        else:
            ok = True
            for side in ("chosen", "rejected"):
                length = int(data[f"{side}_attention_mask"][i].sum())
                ours = data[f"{side}_input_ids"][i, :length].tolist()
                start = int(data[f"{side}_response_mask"][i].nonzero()[0])
                if stage == "dpo":
                    prompt = trl_tokens["prompt_ids"][i]
                    ok &= prompt == ours[:start] and trl_tokens[f"{side}_ids"][i] == ours[start:]
                else:
                    ok &= trl_tokens[f"{side}_ids"][i] == ours
        if not ok:
            bad.append(i)
            first = first or {"row": i, "trl": {k: v[i] for k, v in trl_tokens.items()}, "ours": ours}
    return {"rows_checked": n, "rows_differing": bad[:20], "identical": not bad, "first_difference": first}


def compare(stage: str, ours: list[dict[str, float]], trl: list[dict[str, float]]) -> dict[str, Any]:
    """Per-step values of both sides and their differences, for the loss and the stage's metrics."""
    n = min(len(ours), len(trl))
    out: dict[str, Any] = {}
    for our_key, trl_key in [("loss", "loss"), *COMPARED[stage]]:
        a = [float(s.get(our_key, float("nan"))) for s in ours[:n]]
        b = [float(s.get(trl_key, float("nan"))) for s in trl[:n]]
        rel = [rel_diff(x, y) for x, y in zip(a, b)]
        out[our_key] = {
            "ours": a,
            "trl": b,
            "abs_diff": [abs(x - y) for x, y in zip(a, b)],
            "rel_diff": rel,
            "step1_rel_diff": rel[0] if rel else None,
            "max_rel_diff": max(rel) if rel else None,
            "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)) if n else None,
        }
    loss = out["loss"]
    loss["passes"] = bool(n) and loss["step1_rel_diff"] <= BAR_STEP1 and loss["max_rel_diff"] <= BAR_ALL
    return out


def _significant(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _significant(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_significant(v) for v in x]
    return x


def write_precise(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>.json with 7 significant digits (`bench.common.write_result` rounds to 5
    decimals, which would turn the relative differences this compares into 0)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(_significant(data), indent=1) + "\n")
    return path


def plot(result: dict[str, Any], path: Path) -> None:
    """Loss curves of both sides per stage (top) and their relative difference per step (bottom, log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if s in result["stages"]]
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 6.2), squeeze=False)
    titles = {"sft": "SFT", "reward_model": "Reward model (Bradley-Terry)", "dpo": "DPO (sigmoid)"}
    for j, stage in enumerate(stages):
        loss = result["stages"][stage]["compare"]["loss"]
        steps = list(range(1, len(loss["ours"]) + 1))
        top, bottom = axes[0][j], axes[1][j]
        top.plot(steps, loss["ours"], "o-", label="rlhf_ray", ms=4)
        top.plot(steps, loss["trl"], "x--", label="TRL", ms=6)
        top.set_title(titles[stage])
        top.set_ylabel("loss")
        top.legend()
        rel = [max(r, 1e-12) for r in loss["rel_diff"]]
        bottom.semilogy(steps, rel, "o-", ms=4, color="tab:red")
        bottom.axhline(BAR_ALL, ls=":", color="gray", label="1e-3")
        bottom.axhline(BAR_STEP1, ls="--", color="gray", label="1e-4 (step 1)")
        bottom.set_xlabel("optimiser step")
        bottom.set_ylabel("|ours - TRL| / |TRL|")
        bottom.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, fp32 CPU: per-step loss, rlhf_ray vs TRL")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 steps per stage; no plot")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=1e-5)
    p.add_argument("--rm-lr", type=float, default=1e-5)
    p.add_argument("--dpo-lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 3
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_ray.runtime import setup_process_env

    setup_process_env()
    model = str(smollm2_dir())
    records = parity_records(args.steps * args.batch)
    lrs = {"sft": args.sft_lr, "reward_model": args.rm_lr, "dpo": args.dpo_lr}
    result: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "settings": {
            "steps": args.steps,
            "batch": args.batch,
            "our_micro_batch": max(1, args.batch // 2),
            "trl_micro_batch": args.batch,
            "lr": lrs,
            "dpo_beta": args.beta,
            "dpo_loss_type": "sigmoid",
            "weight_decay": args.weight_decay,
            "adam_betas": [0.9, 0.999],
            "adam_eps": 1e-8,
            "grad_clip": 1.0,
            "warmup_steps": 0,
            "lr_schedule": "constant",
            "dtype": "float32",
            "data": f"{DATA.relative_to(ROOT)}: first {len(records)} rows, file order, plain text",
            "our_side": "stage ranks (SFTRank/RewardRank/DPORank, DeepSpeed ZeRO-0, 1 rank) in-process",
        },
        "bars": {"step1_rel": BAR_STEP1, "all_steps_rel": BAR_ALL},
        "machine": machine(),
        "load_before": snapshot(),
        "stages": {},
        "notes": {
            "accuracy_ties": (
                "a pair whose two rewards are equal counts 0.5 in our accuracy and 0 in TRL's (strict >); "
                "at step 1 every pair ties on both sides (DPO: policy = reference; reward model: the head "
                "starts at zero), so step 1 reads 0.5 vs 0.0"
            ),
            "ipo": (
                "not compared: TRL's IPO divides each side's log-ratio by its completion length (a per-token "
                "mean, as its source comment says, agreed with the IPO authors); ours uses the summed "
                "log-ratio of the IPO paper's equation 17, so the two losses are different functions"
            ),
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "parity.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        for stage in [s for s in args.stages.split(",") if s]:
            print(f"== {stage}: TRL", flush=True)
            trl = run_trl(stage, data_file, model, args, lrs[stage])
            print(f"== {stage}: ours", flush=True)
            ours, data, seconds = run_ours(stage, records, model, args, lrs[stage])
            result["stages"][stage] = {
                "compare": compare(stage, ours, trl["steps"]),
                "same_tokens": same_tokens(stage, data, trl["tokens"], len(records)),
                "ours_stats": ours,
                "trl_stats": trl["steps"],
                "ours_seconds": seconds,
                "trl_seconds": trl["seconds"],
                "trl_optimizer": {"class": trl["optimizer"], "param_groups": trl["param_groups"]},
                "trl_versions": trl["versions"],
            }
    result["load_after"] = snapshot()
    path = write_precise("parity_vs_trl_quick" if args.quick else "parity_vs_trl", result)
    if not args.quick:
        plot(result, PLOT)
    print(f"\nwrote {path}\n")
    print("| stage | metric | step 1 rel. diff | max rel. diff | max abs. diff | same tokens |")
    print("|---|---|---|---|---|---|")
    for stage, r in result["stages"].items():
        for key, c in r["compare"].items():
            print(
                f"| {stage} | {key} | {c['step1_rel_diff']:.2e} | {c['max_rel_diff']:.2e} | "
                f"{c['max_abs_diff']:.2e} | {r['same_tokens']['identical']} |"
            )
    return result


if __name__ == "__main__":
    main()
