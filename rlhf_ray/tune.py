"""What a Ray Tune sweep over `algorithm.kl_coef` and `trainer.lr` is asked to do (`SweepConfig`, from a
YAML file and CLI flags) and what it reports at the end: one row per trial and the reward/KL trade-off
as a table, the best trial's config as YAML. Pure: no Ray here; `rlhf_ray.trainer.sweep` runs the trials.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_ray.config import ConfigError, RLHFConfig


@dataclass
class SweepConfig:
    output_dir: str = (
        "runs/sweep"  # tune/ (experiment state), trials/<id>/ (each run), results.*, best_config.yaml
    )
    name: str = "rl_sweep"  # the Tune experiment's name (tune/<name>)
    search: Literal["grid", "random"] = "grid"
    kl_coef: list[float] = field(default_factory=lambda: [0.01, 0.1])  # grid: values; random: [low, high]
    lr: list[float] = field(default_factory=lambda: [5e-4, 2e-3])  # grid: values; random: [low, high]
    num_samples: int = 1  # grid: repeats of the whole grid; random: number of trials
    metric: str = "reward/mean"  # what ASHA compares and the best trial maximises (mode=max)
    mode: Literal["max", "min"] = "max"
    asha: bool = True  # stop trials below the median of their rung early
    grace_period: int = 2  # ASHA: steps every trial runs before it can be stopped
    reduction_factor: float = 2.0  # ASHA: 1/reduction_factor of the trials go on at each rung
    # Each trial runs vLLM, the DeepSpeed ranks, reference and reward actors at once (~2-3 GiB for the tiny
    # model): on a 2-core, 24 GiB machine run 1-2 trials at a time; on a cluster, as many as fit.
    max_concurrent_trials: int = 1
    trial_cpus: float = 1.0  # CPUs of each trial's driver (its RL loop), besides the roles' own
    max_failures: int = 0  # Tune retries of a failed trial (it resumes from its own newest checkpoint)
    window: int = 3  # the table averages the last `window` reported steps (single steps are noisy)
    resume: bool = True  # an interrupted sweep in output_dir/tune/<name> is restored, not started over
    overrides: list[str] = field(default_factory=list)  # dotted overrides of the RL config, for every trial

    def validate(self) -> None:
        for key in ("kl_coef", "lr"):
            values = getattr(self, key)
            if not values:
                raise ConfigError(f"sweep {key}=[]: give at least one value (e.g. {key}: [0.01, 0.1])")
            low = 0.0 if key == "kl_coef" else 1e-300  # kl_coef may be 0 (no penalty); lr may not
            if min(values) < low:
                raise ConfigError(f"sweep {key}={values}: values must be {'>= 0' if low == 0 else '> 0'}")
            if self.search == "random" and (len(values) != 2 or not 0 < values[0] < values[1]):
                raise ConfigError(
                    f"sweep {key}={values}: search 'random' samples log-uniformly from [low, high], so give "
                    f"two values 0 < low < high (e.g. {key}: [0.001, 0.1]), or use search 'grid'"
                )
        for key, ok, want in (
            ("num_samples", self.num_samples >= 1, "an integer >= 1"),
            ("grace_period", self.grace_period >= 1, "an integer >= 1"),
            ("reduction_factor", self.reduction_factor > 1, "a number > 1"),
            ("max_concurrent_trials", self.max_concurrent_trials >= 1, "an integer >= 1"),
            ("trial_cpus", self.trial_cpus > 0, "a number > 0"),
            ("max_failures", self.max_failures >= 0, "an integer >= 0"),
            ("window", self.window >= 1, "an integer >= 1"),
        ):
            if not ok:
                raise ConfigError(f"sweep {key}={getattr(self, key)!r}: expected {want}")
        if not self.metric:
            raise ConfigError("sweep metric='': name a reported metric, e.g. reward/mean or eval/gold")


def load_sweep_config(path: str | Path | None = None, **flags: Any) -> SweepConfig:
    """SweepConfig from a YAML mapping (optional) with `flags` (not None) on top; errors name the key."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep file {str(path)!r} does not exist (pass --sweep with a YAML file)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"sweep file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    data.update({k: v for k, v in flags.items() if v is not None})
    hints = typing.get_type_hints(SweepConfig)
    names = [f.name for f in dataclasses.fields(SweepConfig)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown sweep key {key!r}: allowed keys are {', '.join(names)}")
        kwargs[key] = _check(hints[key], value, key)
    sweep = SweepConfig(**kwargs)
    sweep.validate()
    return sweep


def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"sweep {key}={value!r}: choose one of {', '.join(map(repr, typing.get_args(tp)))}"
            )
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"sweep {key}={value!r}: expected a list, e.g. {key}: [0.01, 0.1]")
        return [_check(item, v, key) for v in value]
    numeric = tp in (int, float) and not isinstance(value, bool)
    if tp is float and numeric and isinstance(value, int | float):
        return float(value)
    if tp is int and numeric and isinstance(value, int):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"sweep {key}={value!r} has the wrong type: expected {getattr(tp, '__name__', tp)}")


# ---- the results ----------------------------------------------------------------------------------
def _tail_mean(rows: list[dict[str, Any]], key: str, window: int) -> float:
    values = [r[key] for r in rows if _finite(r.get(key))]
    return float(sum(values[-window:]) / len(values[-window:])) if values else math.nan


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def summarise_trial(
    config: dict[str, Any],
    reports: Any,
    error: BaseException | None,
    *,
    tune_status: str,
    total_steps: int,
    metric: str,
    window: int,
    trial_id: str = "",
) -> dict[str, Any]:
    """One table row from a trial's reports (a pandas DataFrame or a list of dicts, one per step; a step
    reported again after a resume counts once, with its newest values): mean of the last `window` steps
    of the reward, the KL and the metric, the last evaluation. `tune_status` is Tune's (TERMINATED, ERROR,
    PENDING, RUNNING, PAUSED): a trial neither TERMINATED nor ERROR was interrupted."""
    if reports is None:
        reports = []
    records = reports.to_dict("records") if hasattr(reports, "to_dict") else list(reports)
    by_step = {int(r["step"]): r for r in records if _finite(r.get("step"))}
    rows = [by_step[k] for k in sorted(by_step)]
    steps = max(by_step, default=0)
    finished = tune_status in ("TERMINATED", "ERROR") or error is not None
    if error is not None or tune_status == "ERROR":
        first = str(error).strip().splitlines()[0][:80] if error is not None and str(error).strip() else ""
        status = f"error: {type(error).__name__ if error is not None else 'failed'}: {first}"
    elif not finished:
        status = f"interrupted at step {steps} (run the sweep again to resume)"
    elif steps >= total_steps:
        status = "completed"
    else:
        status = "stopped early (ASHA)"
    gold = [r["eval/gold"] for r in rows if _finite(r.get("eval/gold"))]
    return {
        "trial": trial_id or (str(rows[-1].get("trial_id", "")) if rows else ""),
        "kl_coef": float(config["kl_coef"]),
        "lr": float(config["lr"]),
        "steps": steps,
        "status": status,
        "reward": _tail_mean(rows, "reward/mean", window),
        "kl": _tail_mean(rows, "kl", window),
        "gold": gold[-1] if gold else math.nan,
        "metric": _tail_mean(rows, metric, window),
        "output_dir": str(rows[-1].get("output_dir", "")) if rows else "",
        "error": status.startswith("error"),
        "finished": finished,
    }


def pareto_front(rows: list[dict[str, Any]]) -> set[int]:
    """Indices of the trials no other trial beats on both counts (reward at least as high and KL at
    least as low, one of them strictly): the reward/KL trade-off curve."""
    ok = [i for i, r in enumerate(rows) if not r["error"] and _finite(r["reward"]) and _finite(r["kl"])]

    def beaten(i: int) -> bool:
        a = rows[i]
        return any(
            rows[j]["reward"] >= a["reward"]
            and rows[j]["kl"] <= a["kl"]
            and (rows[j]["reward"] > a["reward"] or rows[j]["kl"] < a["kl"])
            for j in ok
            if j != i
        )

    return {i for i in ok if not beaten(i)}


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial with the best `metric` (mean of its last steps) among the finished ones that did not fail."""
    ok = [r for r in rows if r["finished"] and not r["error"] and _finite(r["metric"])]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r["metric"])


def format_table(rows: list[dict[str, Any]], metric: str, window: int) -> str:
    front = pareto_front(rows)
    extra = metric not in ("reward/mean", "kl", "eval/gold")
    head = ["trial", "kl_coef", "lr", "steps", f"reward (last {window})", f"kl (last {window})", "eval gold"]
    head += [f"{metric} (last {window})"] if extra else []
    head += ["front", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [r["trial"], f"{r['kl_coef']:g}", f"{r['lr']:g}", str(r["steps"])]
        cells += [_fmt(r["reward"]), _fmt(r["kl"]), _fmt(r["gold"])]
        cells += [_fmt(r["metric"])] if extra else []
        cells += ["*" if i in front else "", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if _finite(v) else "-"


def write_results(
    out: Path,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    best_cfg: RLHFConfig | None,
    sweep: SweepConfig,
) -> tuple[str, dict[str, str]]:
    """results.md (the table, the front marked *, the best trial), results.csv, best_config.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, sweep.metric, sweep.window)
    verdict = "no trial finished without an error"
    if best is not None:
        verdict = (
            f"best by {sweep.metric} ({sweep.mode}, mean of the last {sweep.window} steps): trial {best['trial']} "
            f"kl_coef={best['kl_coef']:g} lr={best['lr']:g} -> {best['metric']:.4f}"
        )
    text = f"{table}\n\n* = on the reward/KL front (no trial has more reward at less KL)\n{verdict}\n"
    paths = {"results_md": str(out / "results.md"), "results_csv": str(out / "results.csv")}
    (out / "results.md").write_text(text)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    if best_cfg is not None:
        header = (
            f"# Best trial of the sweep {sweep.name!r} ({verdict}).\n"
            f"# Its run: {best['output_dir']}\n# Rerun it: python -m jobs.ppo --config THIS_FILE\n"
        )
        body = yaml.safe_dump(best_cfg.to_dict(), sort_keys=False)
        (out / "best_config.yaml").write_text(header + body)
        paths["best_config"] = str(out / "best_config.yaml")
    return text, paths
