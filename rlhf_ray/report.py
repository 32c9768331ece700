"""The pipeline's final report: figures from the held-out evaluation and the RL curves, a verdict on
whether RL improved what the labeler prefers or only fooled the reward model, a table a person reads at a
glance, `summary.json` and a PNG of the reward, KL and gold curves. Pure: no Ray, no models.

summary.json is nested (`summary["sft"]["gold"]`, ...):
- `sft`, `rl`: on the held-out prompts, for each policy: `gold`, `reward` (reward-model score), `exact`
  (share of perfect answers), `length` (tokens) of temperature-1 samples; `kl` (nats per answer to the
  SFT reference, sampled); `gold_greedy`, `reward_greedy` when greedy answers were scored;
- `gain`: RL minus SFT paired by prompt: `gold`, `gold_se`, `reward`, `reward_se` (standard errors);
- `verdict`: 'improved' (gold rose clearly: by more than 3 s.e. and `pipeline.min_gold_gain`),
  'reward_hacking' (the reward-model score rose clearly but the gold score did not) or 'no_gain';
  `verdict_text` says it in words;
- `seconds`: each stage's duration when it ran, and `total`; `stages`: each stage's status in this call
  ('ran' or 'skipped') and seconds; `wall_seconds`: this call's wall time;
- `rl_training`: from the RL run's metrics: steps, the last steps' batch reward and KL (k3, per answer),
  the held-out gold at the start, peak and end of training;
- `offline`: what the earlier stages achieved: SFT held-out loss before/after, the number of preference
  pairs, the reward model's held-out pairwise accuracy;
- `examples`: the first few held-out prompts (`logging.num_samples`; the first, not picked) with the SFT
  and the RL policy's sampled answers, each with its `gold` and `reward`, side by side;
- `eval_prompts`, `paths`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

CLEAR_SE = 3.0  # a change counts as clear beyond this many standard errors


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def paired_gain(after: list[float], before: list[float]) -> tuple[float, float]:
    """Mean and standard error of `after - before`, paired by position (the same prompt)."""
    if len(after) != len(before) or not after:
        raise ValueError(
            f"paired_gain: {len(after)} vs {len(before)} values; both policies answer the same prompts"
        )
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), se


def policy_figures(evaluation: dict[str, Any]) -> dict[str, float]:
    """The means of one policy's per-answer stats (see the module docstring for the names)."""
    s = evaluation["sampled"]
    out = {
        "gold": _mean(s["gold"]),
        "reward": _mean(s["reward"]),
        "kl": _mean(s["kl"]),
        "exact": _mean([float(g >= 1.0) for g in s["gold"]]),
        "length": _mean(s["length"]),
    }
    if "greedy" in evaluation:
        out["gold_greedy"] = _mean(evaluation["greedy"]["gold"])
        out["reward_greedy"] = _mean(evaluation["greedy"]["reward"])
    return out


def _in_se(value: float, se: float) -> str:
    """`value` in standard errors; an s.e. of 0 (every prompt changed by the same amount) says so."""
    return "s.e. 0" if se == 0 else f"{value / se:.0f} s.e."


def verdict(gain: dict[str, float], min_gold_gain: float) -> tuple[str, str]:
    """('improved' | 'reward_hacking' | 'no_gain', a sentence saying why)."""
    g, g_se, r, r_se = gain["gold"], gain["gold_se"], gain["reward"], gain["reward_se"]
    gold_clear = g > max(min_gold_gain, CLEAR_SE * g_se)
    reward_clear = r > CLEAR_SE * r_se
    if gold_clear:
        return "improved", (
            f"RL improved the held-out gold score by {g:+.3f} ({_in_se(g, g_se)}): it learned what the "
            f"labeler prefers, not only what the reward model rewards"
        )
    if reward_clear:
        moved = f"fell by {-g:.3f}" if g < 0 else f"rose by only {g:.3f}"
        return "reward_hacking", (
            f"REWARD HACKING: RL raised the reward-model score by {r:+.3f} ({_in_se(r, r_se)}) but the gold "
            f"score {moved} (an improvement needs > {max(min_gold_gain, CLEAR_SE * g_se):.3f}): the policy "
            f"found what the reward model over-rates. Raise algorithm.kl_coef or lower trainer.lr"
        )
    return "no_gain", (
        f"RL changed neither score clearly (gold {g:+.3f}, reward {r:+.3f}); train longer or with a larger "
        f"trainer.lr"
    )


def rl_training_figures(rows: list[dict[str, Any]], last: int = 10) -> dict[str, Any]:
    """Steps, the mean batch reward and KL of the last `last` steps, and the held-out gold curve's start,
    peak and end, from the RL run's metrics rows."""
    steps = [r for r in rows if "reward/mean" in r]
    evals = [(r["step"], r["eval/gold"]) for r in rows if r.get("eval/gold") is not None]
    out: dict[str, Any] = {
        "steps": max((r["step"] for r in steps), default=0),
        "reward_last": _mean([r["reward/mean"] for r in steps[-last:]]),
        "kl_last": _mean([r["kl"] for r in steps[-last:] if r.get("kl") is not None]),
    }
    if evals:
        peak = max(evals, key=lambda e: e[1])
        out |= {
            "gold_start": evals[0][1],
            "gold_end": evals[-1][1],
            "gold_peak": peak[1],
            "gold_peak_step": peak[0],
        }
    return out


def offline_figures(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What the SFT, preference and reward-model stages achieved, from their records' results."""
    sft = records.get("sft", {}).get("result", {})
    pairs = records.get("preferences", {}).get("result", {})
    rm = records.get("reward_model", {}).get("result", {})
    picks = {
        "sft_eval_loss_initial": sft.get("eval/loss_initial"),
        "sft_eval_loss": sft.get("eval/loss"),
        "preference_pairs": pairs.get("num_pairs"),
        "reward_model_eval_accuracy": rm.get("eval/accuracy"),
    }
    return {k: v for k, v in picks.items() if v is not None}


def examples(evaluation: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The first `n` held-out prompts with both policies' sampled answers and their gold and reward scores
    (the first, not the most telling: no picking). None when the evaluation kept no texts (a record
    written before it did)."""
    sft, rl = evaluation["sft"]["sampled"], evaluation["rl"]["sampled"]
    if "response" not in sft or "response" not in rl:
        return []

    def answer(s: dict[str, Any], i: int) -> dict[str, Any]:
        return {"response": s["response"][i], "gold": s["gold"][i], "reward": s["reward"][i]}

    return [
        {"prompt": sft["prompt"][i], "sft": answer(sft, i), "rl": answer(rl, i)}
        for i in range(min(n, len(sft["response"])))
    ]


def build_summary(
    evaluation: dict[str, Any],
    records: dict[str, dict[str, Any]],
    rl_rows: list[dict[str, Any]],
    min_gold_gain: float,
    wall_seconds: float,
    paths: dict[str, str],
    n_examples: int = 4,
) -> dict[str, Any]:
    """summary.json's content (see the module docstring). `records`: each stage's record with `status`."""
    sft, rl = evaluation["sft"], evaluation["rl"]
    gold, gold_se = paired_gain(rl["sampled"]["gold"], sft["sampled"]["gold"])
    reward, reward_se = paired_gain(rl["sampled"]["reward"], sft["sampled"]["reward"])
    gain = {"gold": gold, "gold_se": gold_se, "reward": reward, "reward_se": reward_se}
    kind, text = verdict(gain, min_gold_gain)
    return {
        "sft": policy_figures(sft),
        "rl": policy_figures(rl),
        "gain": gain,
        "verdict": kind,
        "verdict_text": text,
        **stage_figures(records, rl_rows, wall_seconds, paths),
        "examples": examples(evaluation, n_examples),
        "eval_prompts": len(sft["sampled"]["gold"]),
    }


def stage_figures(
    records: dict[str, dict[str, Any]],
    rl_rows: list[dict[str, Any]],
    wall_seconds: float,
    paths: dict[str, Any],
) -> dict[str, Any]:
    """The part of summary.json every pipeline run has, with or without a held-out comparison: each stage's
    status and seconds, the wall time, the RL run's and the offline stages' figures, the paths."""
    seconds = {stage: rec["seconds"] for stage, rec in records.items()}
    return {
        "seconds": seconds | {"total": round(sum(seconds.values()), 2)},
        "stages": {s: {"status": rec["status"], "seconds": rec["seconds"]} for s, rec in records.items()},
        "wall_seconds": round(wall_seconds, 2),
        "rl_training": rl_training_figures(rl_rows),
        "offline": offline_figures(records),
        "paths": paths,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The report as plain text: the two policies side by side, the verdict, the time per stage."""
    sft, rl, gain = summary["sft"], summary["rl"], summary["gain"]
    rows = [
        ("gold score, sampled (T=1)", "gold", f"{gain['gold']:+.3f} ± {gain['gold_se']:.3f}"),
        ("reward-model score, sampled", "reward", f"{gain['reward']:+.3f} ± {gain['reward_se']:.3f}"),
        ("exact answers, sampled", "exact", f"{rl['exact'] - sft['exact']:+.3f}"),
        ("KL to SFT (nats/answer)", "kl", ""),
        ("answer length (tokens)", "length", ""),
    ]
    if "gold_greedy" in sft:
        rows += [
            ("gold score, greedy", "gold_greedy", f"{rl['gold_greedy'] - sft['gold_greedy']:+.3f}"),
            ("reward-model score, greedy", "reward_greedy", ""),
        ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"held-out prompts: {summary['eval_prompts']} (the same for both policies)",
        "",
        f"{'':<{width}}{'SFT policy':>12}{'RL policy':>12}   RL - SFT (± s.e.)",
    ]
    lines += [f"{label:<{width}}{sft[k]:>12.3f}{rl[k]:>12.3f}   {change}" for label, k, change in rows]
    lines += ["", f"verdict: {summary['verdict']}: {summary['verdict_text']}"]
    o = summary.get("offline", {})
    if {"sft_eval_loss", "preference_pairs", "reward_model_eval_accuracy"} <= set(o):
        lines.append(
            f"earlier stages: SFT held-out loss {o.get('sft_eval_loss_initial', float('nan')):.2f} -> "
            f"{o['sft_eval_loss']:.2f}; {o['preference_pairs']} preference pairs; reward model held-out "
            f"pair accuracy {o['reward_model_eval_accuracy']:.3f}"
        )
    t = summary.get("rl_training", {})
    if "gold_peak" in t:
        lines.append(
            f"RL training: {t['steps']} steps; held-out gold {t['gold_start']:.3f} -> {t['gold_end']:.3f} "
            f"(peak {t['gold_peak']:.3f} at step {t['gold_peak_step']}); last steps' KL (k3) {t['kl_last']:.3f}"
        )
    lines += format_examples(summary.get("examples", []))
    lines += ["", f"{'stage':<14}{'this call':<11}{'seconds':>9}"]
    for stage, s in summary["stages"].items():
        status = "ran" if s["status"] == "ran" else "skipped*"
        lines.append(f"{stage:<14}{status:<11}{s['seconds']:>9.1f}")
    lines.append(f"{'total':<25}{summary['seconds']['total']:>9.1f}")
    if any(s["status"] != "ran" for s in summary["stages"].values()):
        lines.append("* done in an earlier call with the same settings; its time is from then")
    lines.append(f"this call took {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)


def format_examples(rows: list[dict[str, Any]], width: int = 100) -> list[str]:
    """Report lines for `examples`: each prompt, then the SFT and the RL answer under it with their scores,
    on one line each (line breaks shown as ⏎, long answers cut at `width` characters)."""

    def one_line(text: str) -> str:
        text = text.replace("\r", "").replace("\n", "⏎")
        return text if len(text) <= width else text[:width] + "…"

    if not rows:
        return []
    lines = ["", "examples (the first held-out prompts; temperature-1 samples):"]
    for row in rows:
        lines.append(f"  prompt: {one_line(row['prompt'])}")
        for name, label in (("sft", "SFT"), ("rl", "RL ")):
            a = row[name]
            lines.append(
                f"    {label} gold {a['gold']:.2f} reward {a['reward']:+.2f} | {one_line(a['response'])}"
            )
    return lines


def plot_curves(rows: list[dict[str, Any]], summary: dict[str, Any], out_png: str | Path) -> Path:
    """Three panels against the RL step: the reward-model score (training batches and held-out), the KL
    to the SFT reference, the held-out gold score; dashed lines mark the SFT policy's held-out level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(3, 1, figsize=(7.5, 7.5), sharex=True)
    panels = [
        ("reward-model score", [("reward/mean", "training batches", "-"), ("eval/reward", "held-out", "o-")]),
        ("KL to SFT (nats/answer)", [("kl", "training batches (k3)", "-")]),
        ("gold score", [("eval/gold", "held-out", "o-")]),
    ]
    for ax, (title, lines) in zip(axes, panels):
        for key, label, style in lines:
            x, y = series(key)
            if x:
                ax.plot(x, y, style, label=label, markersize=3)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    last = max((r["step"] for r in rows), default=0)
    final = f"final evaluation ({summary['eval_prompts']} prompts)"
    for ax, key in zip(axes, ("reward", "kl", "gold")):
        ax.plot([0, last], [summary["sft"][key], summary["rl"][key]], "s", c="red", label=final, markersize=6)
        ax.legend(loc="best", fontsize=8)
    axes[2].axhline(summary["sft"]["gold"], ls="--", c="gray", lw=1)
    axes[-1].set_xlabel("RL step")
    fig.suptitle(
        f"verdict: {summary['verdict']}   (temperature-1 samples; dashed: the SFT policy's gold score)",
        fontsize=10,
    )
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_summary(summary: dict[str, Any], path: str | Path) -> Path:
    """Atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(path)
    return path


def eval_before_after(rows: list[dict[str, Any]]) -> str:
    """The held-out evaluation of a run's first and last evaluations side by side (`eval/*` keys of
    metrics.jsonl rows: step 0 is the policy before RL), as the RL job prints it at the end; '' when the run
    evaluated at most once."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if len(evals) < 2:
        return ""
    first, last = evals[0], evals[-1]
    keys = [k for k in first if k.startswith("eval/") and k in last]
    head = (
        f"{'held-out':<24}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}{'change':>10}"
    )
    lines = [head, "-" * len(head)]
    for k in keys:
        lines.append(f"{k:<24}{first[k]:>12.4g}{last[k]:>12.4g}{last[k] - first[k]:>+10.4g}")
    return "\n".join(lines)
