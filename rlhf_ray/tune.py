"""What a Ray Tune sweep is asked to do (`SweepConfig`, from a YAML file and CLI flags): which RL config
keys it searches (`params`, any `section.key`, with `kl_coef` / `lr` as shorthands) and which reported
metric ranks the trials (`metric`, by default a held-out evaluation when the run has one: the training
reward is what reward hacking inflates); and what it reports at the end: one row per trial with the
searched values, the reward/KL trade-off and the ranking metric as a table, the best trial's config as
YAML. Pure: no Ray here; `rlhf_ray.trainer.sweep` runs the trials.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import itertools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_ray.config import ConfigError, RLHFConfig, config_reference

KINDS = ("grid", "choice", "uniform", "loguniform")  # how a searched key's values are given
SHORTHANDS = {"kl_coef": "algorithm.kl_coef", "lr": "trainer.lr"}  # sweep keys older files and flags use
DEFAULT_SPACE = {"algorithm.kl_coef": [0.01, 0.1], "trainer.lr": [5e-4, 2e-3]}  # when nothing is searched
PER_TRIAL_KEYS = ("run.output_dir", "checkpoint.dir", "logging.progress_bar")  # the sweep sets these itself
MAX_CHECKED_COMBINATIONS = 256  # a grid this small is validated whole, not only value by value


@dataclass
class SweepConfig:
    output_dir: str = (
        "runs/sweep"  # tune/ (experiment state), trials/<id>/ (each run), results.*, best_config.yaml
    )
    name: str = "rl_sweep"  # the Tune experiment's name (tune/<name>)
    search: Literal["grid", "random"] = "grid"  # what a plain list of values means: grid or choice
    # The searched RL config keys, each `section.key: SPEC` with SPEC {grid: [v, ...]} (every value, crossed
    # with the other grids), {choice: [v, ...]} (one drawn per trial), {uniform: [low, high]},
    # {loguniform: [low, high]}, or a plain list (grid under search grid, choice under search random).
    params: dict[str, Any] = field(default_factory=dict)
    kl_coef: list[float] | None = (
        None  # = params algorithm.kl_coef; grid: values, random: log-uniform [low, high]
    )
    lr: list[float] | None = None  # = params trainer.lr; grid: values, random: log-uniform [low, high]
    num_samples: int = 1  # grid: repeats of the whole grid; random: number of trials
    # The reported metric that ranks the trials (the README's sweep section lists them); None: eval/gold
    # when the run evaluates with run.eval_function, else eval/reward when it evaluates, else reward/mean
    metric: str | None = None
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
            if values is None:
                continue
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
        if self.metric is not None and not self.metric.strip():
            raise ConfigError(
                "sweep metric='': name a reported metric, e.g. eval/gold or reward/mean (or leave it out "
                "for the default)"
            )
        sweep_params(self)  # every searched key exists and its values are given in a known form


def load_sweep_config(path: str | Path | None = None, **flags: Any) -> SweepConfig:
    """SweepConfig from a YAML mapping (optional) with `flags` (not None) on top; errors name the key.
    A searched key given by a flag replaces the file's for that key only: `params` flags are merged into
    the file's `params`, and `kl_coef` / `lr` replace the file's algorithm.kl_coef / trainer.lr."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep file {str(path)!r} does not exist (pass --sweep with a YAML file)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"sweep file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    given = {k: v for k, v in flags.items() if v is not None}
    hints = typing.get_type_hints(SweepConfig)
    names = [f.name for f in dataclasses.fields(SweepConfig)]
    for key in [*data, *given]:
        if key not in names:
            raise ConfigError(f"unknown sweep key {key!r}: allowed keys are {', '.join(names)}")
    file_params = dict(_check(hints["params"], data.get("params") or {}, "params"))
    flag_params = dict(_check(hints["params"], given.get("params") or {}, "params"))
    for short, key in SHORTHANDS.items():
        if given.get(short) is not None:  # --kl-coef over the file's params algorithm.kl_coef
            file_params.pop(key, None)
        if key in flag_params:  # --param algorithm.kl_coef=... over the file's kl_coef
            data.pop(short, None)
    data.update(given)
    data["params"] = {**file_params, **flag_params}
    kwargs = {key: _check(hints[key], value, key) for key, value in data.items()}
    sweep = SweepConfig(**kwargs)
    sweep.validate()
    return sweep


def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        return _check(args[0], value, key)
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
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(
                f"sweep {key}={value!r}: expected a mapping of RL config keys to values, e.g. "
                f"{key}: {{algorithm.kl_coef: {{grid: [0.01, 0.1]}}}}"
            )
        return dict(value)
    numeric = tp in (int, float) and not isinstance(value, bool)
    if tp is float and numeric and isinstance(value, int | float):
        return float(value)
    if tp is int and numeric and isinstance(value, int):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"sweep {key}={value!r} has the wrong type: expected {getattr(tp, '__name__', tp)}")


# ---- what is searched -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched RL config key and its values: grid/choice the values, uniform/loguniform [low, high]."""

    key: str
    kind: Literal["grid", "choice", "uniform", "loguniform"]
    values: tuple[Any, ...]

    def describe(self) -> str:
        return f"{self.key} {self.kind} {list(self.values)}"


@functools.cache
def _config_keys() -> dict[str, str]:
    """Every leaf key of the RL config schema with its type, as `--help` lists them."""
    return {key: type_str for key, type_str, _, _ in config_reference()}


def parse_param(key: str, spec: Any, search: str = "grid") -> Param:
    """`key: spec` of the sweep's `params`: {grid|choice: [v, ...]}, {uniform|loguniform: [low, high]}, or
    a plain list (grid under search grid, choice under search random) or a single value. The key must be a
    leaf of the RL config schema; the values are checked against it by `check_params`."""
    keys = _config_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, list(keys), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `python -m jobs.sweep --help` for the keys"
        raise ConfigError(f"sweep params: unknown RL config key {key!r}: {hint}")
    if key in PER_TRIAL_KEYS:
        raise ConfigError(
            f"sweep params: {key} is set by the sweep for each trial (under output_dir/trials/<id>), so it "
            f"cannot be searched"
        )
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(
                f"sweep params {key}={spec!r}: give one of {', '.join(KINDS)} with its values, e.g. "
                f"{key}: {{grid: [a, b]}} or {key}: {{loguniform: [low, high]}}"
            )
        ((kind, values),) = spec.items()
    else:
        kind, values = ("grid" if search == "grid" else "choice"), spec
    values = values if isinstance(values, list | tuple) else [values]
    if not values:
        raise ConfigError(f"sweep params {key}: {kind} []: give at least one value")
    if kind in ("uniform", "loguniform"):
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numbers or not values[0] < values[1]:
            raise ConfigError(
                f"sweep params {key}: {kind} {list(values)}: give two numbers low < high, e.g. "
                f"{key}: {{{kind}: [0.001, 0.1]}}"
            )
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(
                f"sweep params {key}: loguniform {list(values)}: the low end must be > 0 (or use uniform)"
            )
    return Param(key, kind, tuple(values))


def parse_param_flag(text: str) -> dict[str, Any]:
    """`--param KEY=SPEC` as one `params` entry: SPEC is `a,b,c` (a plain list) or `KIND:a,b` with KIND one
    of grid, choice, uniform, loguniform; each value is read as a YAML scalar (`1e-4`, `true`, `hf`)."""
    key, sep, spec = text.partition("=")
    if not sep or not key.strip() or not spec.strip():
        raise ConfigError(
            f"--param {text!r}: expected KEY=SPEC, e.g. --param algorithm.clip_eps=0.1,0.2 or "
            f"--param trainer.lr=loguniform:1e-4,3e-3"
        )
    kind, colon, rest = spec.partition(":")
    kind = kind.strip()
    if colon and kind in KINDS:
        spec = rest
    elif colon and kind.isalpha():
        raise ConfigError(f"--param {text!r}: unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    try:
        values = [yaml.safe_load(v) for v in spec.split(",")]
    except yaml.YAMLError as exc:
        raise ConfigError(f"--param {text!r}: a value is not a YAML scalar ({exc})") from exc
    values = [float(v) if isinstance(v, str) and _is_float(v) else v for v in values]
    return {key.strip(): {kind: values} if colon and kind in KINDS else values}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")


def sweep_params(sweep: SweepConfig) -> list[Param]:
    """The searched keys, in the order given: `params`, then the `kl_coef` / `lr` shorthands (search random
    makes theirs log-uniform in [low, high], as before `params` existed); algorithm.kl_coef x trainer.lr
    on a small grid when nothing is given."""
    found = [parse_param(key, spec, sweep.search) for key, spec in sweep.params.items()]
    for short, key in SHORTHANDS.items():
        values = getattr(sweep, short)
        if values is None:
            continue
        if key in sweep.params:
            raise ConfigError(f"sweep {short}={values} and params {key}: both search {key}; keep one of them")
        kind = "grid" if sweep.search == "grid" else "loguniform"
        found.append(parse_param(key, {kind: list(values)}))
    if not found:
        found = [parse_param(key, {"grid": values}) for key, values in DEFAULT_SPACE.items()]
    return found


def check_params(cfg: RLHFConfig, params: list[Param]) -> list[Param]:
    """Each searched value (the ends of a range) set on the RL config `cfg` must validate, and so must every
    combination of a small grid; returns the params with their values as the config types them (`1e-4`
    given as text becomes a float). A range needs a real-valued key."""
    checked = []
    for p in params:
        values = tuple(_typed_value(cfg, p.key, v) for v in p.values)
        if p.kind in ("uniform", "loguniform") and not all(isinstance(v, float) for v in values):
            raise ConfigError(
                f"sweep params {p.key}: {p.kind} draws real numbers, but {p.key} is "
                f"{_config_keys()[p.key]}: give its values with grid or choice"
            )
        checked.append(Param(p.key, p.kind, values))
    discrete = [[(p.key, v) for v in p.values] for p in checked]
    if math.prod(len(d) for d in discrete) <= MAX_CHECKED_COMBINATIONS:
        for combination in itertools.product(*discrete):
            try:
                RLHFConfig.from_dict(_set_keys(cfg.to_dict(), dict(combination)))
            except ConfigError as exc:
                setting = ", ".join(f"{k}={v!r}" for k, v in combination)
                raise ConfigError(
                    f"sweep params: the trial with {setting} is not a valid run: {exc}"
                ) from exc
    return checked


def _typed_value(cfg: RLHFConfig, key: str, value: Any) -> Any:
    try:
        trial = RLHFConfig.from_dict(_set_keys(cfg.to_dict(), {key: value}))
    except ConfigError as exc:
        raise ConfigError(f"sweep params {key}: the value {value!r} is not valid: {exc}") from exc
    return functools.reduce(getattr, key.split("."), trial)


def _set_keys(d: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`d` (a config dict, changed in place) with each dotted key of `values` set."""
    for key, value in values.items():
        *path, last = key.split(".")
        node = d
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return d


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched values by RL config key (a trial of an older sweep names them `kl_coef`, `lr`)."""
    return {SHORTHANDS.get(k, k): v for k, v in config.items()}


def expected_trials(params: list[Param], num_samples: int) -> int:
    return math.prod(len(p.values) for p in params if p.kind == "grid") * num_samples


# ---- what ranks the trials ----------------------------------------------------------------------------
def default_metric(cfg: RLHFConfig) -> tuple[str, str]:
    """The metric that ranks trials when the sweep names none, and why: a held-out evaluation when the run
    has one (the gold score when run.eval_function gives it), since a policy that games the reward model
    raises reward/mean without getting better; else the training reward."""
    if cfg.data.eval_path and cfg.run.eval_prompts > 0:
        if cfg.run.eval_function:
            return (
                "eval/gold",
                "the default: the gold score of the held-out evaluations, from run.eval_function",
            )
        return "eval/reward", (
            "the default: the reward of the held-out evaluations; run.eval_function would add a gold score"
        )
    return "reward/mean", (
        "the default: the run makes no evaluation; set data.eval_path and run.eval_prompts > 0 to rank "
        "on held-out prompts"
    )


@dataclass(frozen=True)
class Ranking:
    metric: str  # ranks the trials (best_row) at the end
    mode: Literal["max", "min"]
    why: str
    asha_metric: str | None  # what ASHA compares at each rung (None: no ASHA)
    asha_mode: Literal["max", "min"]
    asha_why: str

    def describe(self) -> str:
        text = f"ranked by {self.metric} ({self.mode}; {self.why})"
        if self.asha_metric is not None:
            text += f"; ASHA compares {self.asha_metric} ({self.asha_mode}; {self.asha_why})"
        return text


def is_eval_metric(metric: str) -> bool:
    return metric.startswith("eval/")


def ranking(cfg: RLHFConfig, sweep: SweepConfig) -> Ranking:
    """The ranking metric (sweep.metric, else `default_metric`) and the one ASHA compares.

    ASHA compares trials at rungs (steps grace_period * reduction_factor**k) and needs the metric in every
    report. A trial reports its last evaluation at every step (carried forward), so ASHA can compare an
    eval metric as long as each trial was evaluated since it started training by the first rung:
    run.eval_interval <= grace_period. Otherwise (run.eval_interval=0 evaluates only at step 0 and the
    last step) every trial would carry the same step-0 value to the rungs, and ASHA would stop trials at
    random: it compares reward/mean instead, and only the final ranking uses the eval metric."""
    metric, why = (sweep.metric, "set by the sweep") if sweep.metric else default_metric(cfg)
    if not sweep.asha:
        return Ranking(metric, sweep.mode, why, None, sweep.mode, "")
    interval, grace = cfg.run.eval_interval, min(sweep.grace_period, max(cfg.run.total_steps, 1))
    if not is_eval_metric(metric):
        return Ranking(metric, sweep.mode, why, metric, sweep.mode, "reported every step")
    if interval and interval <= grace:
        asha_why = f"evaluated every {interval} steps, so before the first rung at step {grace}"
        return Ranking(metric, sweep.mode, why, metric, sweep.mode, asha_why)
    asha_why = (
        f"{metric} comes from evaluations every run.eval_interval={interval} steps (0: only the first and "
        f"the last), rarer than grace_period={grace}; set run.eval_interval <= {grace} for ASHA on {metric}"
    )
    return Ranking(metric, sweep.mode, why, "reward/mean", "max", asha_why)


MISSING_MARK = "is not among the metrics a trial reports"


def missing_metric_error(metric: str, reported: list[str]) -> ConfigError:
    """The error of a trial whose reports lack the sweep's metric (`run_sweep` raises it again)."""
    return ConfigError(
        f"sweep metric {metric!r} {MISSING_MARK}: {', '.join(sorted(reported))}. Choose one of those with "
        f"--metric (or `metric:` in the sweep file) and run the sweep with --restart (a resumed sweep keeps "
        f"its first scheduler)"
    )


def missing_metric_message(error_text: str) -> str:
    """A trial's `missing_metric_error` out of the text of the error Tune hands back (Ray's traceback)."""
    line = next(line for line in error_text.splitlines() if MISSING_MARK in line)
    return line[line.find("sweep metric") :] if "sweep metric" in line else line


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
    reported again after a resume counts once, with its newest values): the trial's searched values (by RL
    config key), mean of the last `window` steps of the reward and the KL, the last evaluation, and the
    ranking `metric`: for an `eval/*` metric the last evaluation's value (`metric_step`: its step, from
    the reports' `eval/step`), for any other the mean of its last `window` steps. `tune_status` is Tune's
    (TERMINATED, ERROR, PENDING, RUNNING, PAUSED): a trial neither TERMINATED nor ERROR was interrupted."""
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
    if is_eval_metric(metric):
        last = [r for r in rows if _finite(r.get(metric))]
        value = float(last[-1][metric]) if last else math.nan
        # reports of a sweep from before `eval/step` existed: the evaluation's step is unknown
        at = last[-1].get("eval/step", last[-1]["step"]) if last else 0
        metric_step = int(at) if _finite(at) else 0
    else:
        value, metric_step = _tail_mean(rows, metric, window), steps
    return {
        "trial": trial_id or (str(rows[-1].get("trial_id", "")) if rows else ""),
        **trial_params(config),
        "steps": steps,
        "status": status,
        "reward": _tail_mean(rows, "reward/mean", window),
        "kl": _tail_mean(rows, "kl", window),
        "gold": gold[-1] if gold else math.nan,
        "metric": value,
        "metric_step": metric_step,
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
    """The trial with the best `metric` among the finished ones that did not fail. A value measured at
    step 0 (an evaluation of the initial policy, which every trial shares, carried by a trial that ASHA
    stopped before its next evaluation) says nothing about the trial's settings and does not compete."""
    ok = [
        r
        for r in rows
        if r["finished"] and not r["error"] and _finite(r["metric"]) and r.get("metric_step", 1) > 0
    ]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r["metric"])


def sort_rows(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Rows in the order of their searched values (numbers before text, None first)."""

    def order(v: Any) -> tuple[int, Any]:
        if v is None:
            return (0, 0)
        return (1, v) if isinstance(v, int | float) else (2, str(v))

    return sorted(rows, key=lambda r: tuple(order(r.get(k)) for k in keys))


def metric_header(metric: str, window: int) -> str:
    return f"{metric} ({'last evaluation @ step' if is_eval_metric(metric) else f'last {window}'})"


def format_table(rows: list[dict[str, Any]], keys: list[str], metric: str, window: int) -> str:
    """The markdown table: one row per trial, a column per searched key, the reward/KL of the last `window`
    steps, the last evaluation's gold score, the ranking metric, `*` on the reward/KL front, the status."""
    front = pareto_front(rows)
    head = ["trial", *keys, "steps", f"reward (last {window})", f"kl (last {window})", "eval gold"]
    head += [f"rank: {metric_header(metric, window)}", "front", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        ranked = _fmt(r["metric"])
        if is_eval_metric(metric) and _finite(r["metric"]):
            ranked += f" @ {r['metric_step']}"
        cells = [r["trial"], *(_value(r.get(k)) for k in keys), str(r["steps"])]
        cells += [_fmt(r["reward"]), _fmt(r["kl"]), _fmt(r["gold"]), ranked]
        cells += ["*" if i in front else "", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if _finite(v) else "-"


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_results(
    out: Path,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    best_cfg: RLHFConfig | None,
    sweep: SweepConfig,
    params: list[Param],
    rank: Ranking,
) -> tuple[str, dict[str, str]]:
    """results.md (what was searched, what ranked, the table with the front marked *, the best trial),
    results.csv (the rows), results.json (all of it), best_config.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    keys = [p.key for p in params]
    table = format_table(rows, keys, rank.metric, sweep.window)
    how = "its last evaluation" if is_eval_metric(rank.metric) else f"mean of its last {sweep.window} steps"
    verdict = "no trial finished without an error"
    if best is not None:
        setting = " ".join(f"{k}={_value(best.get(k))}" for k in keys)
        verdict = f"best by {rank.metric} ({rank.mode}, {how}): trial {best['trial']} {setting} -> {best['metric']:.4f}"
    searched = "searched: " + "; ".join(p.describe() for p in params) + f" (x{sweep.num_samples} samples)"
    text = (
        f"{searched}\n{rank.describe()}\n\n{table}\n\n"
        f"* = on the reward/KL front (no trial has more reward at less KL)\n{verdict}\n"
    )
    paths = {
        "results_md": str(out / "results.md"),
        "results_csv": str(out / "results.csv"),
        "results_json": str(out / "results.json"),
    }
    (out / "results.md").write_text(text)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "params": [dataclasses.asdict(p) for p in params],
        "ranking": dataclasses.asdict(rank),
        "best": best,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if best_cfg is not None and best is not None:
        lines = "".join(f"#   {k}: {_value(best.get(k))}\n" for k in keys)
        header = (
            f"# Best trial of the sweep {sweep.name!r}, {rank.describe()}:\n# {verdict}\n"
            f"# Its searched values:\n{lines}"
            f"# Its run: {best['output_dir']}\n# Rerun it: python -m jobs.ppo --config THIS_FILE\n"
        )
        body = yaml.safe_dump(best_cfg.to_dict(), sort_keys=False)
        (out / "best_config.yaml").write_text(header + body)
        paths["best_config"] = str(out / "best_config.yaml")
    return text, paths
