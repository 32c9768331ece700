"""Ray Tune sweeps over any RL config keys (`rlhf_ray.tune.Param`): each trial is a full RL run
(`PPOTrainer`) whose actors live inside the trial's own placement group, reporting every step to Tune;
ASHA stops the weak trials early; an interrupted sweep resumes with `Tuner.restore` (and each trial from
its own newest checkpoint); the end is a results table (the searched values, the reward/KL trade-off, the
ranking metric: by default a held-out evaluation, `rlhf_ray.tune.ranking`) and the best config.

Layout of `sweep.output_dir`:
    tune/<name>/        Tune's experiment state (what `Tuner.restore` reads)
    trials/<trial_id>/  each trial's run.output_dir: metrics.jsonl, checkpoints/, policy/, curves.png
    results.md, results.csv, results.json, best_config.yaml
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from actors.placement import layout
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import PPOTrainer
from rlhf_ray.tune import (
    MISSING_MARK,
    Param,
    Ranking,
    SweepConfig,
    best_row,
    check_params,
    expected_trials,
    is_eval_metric,
    missing_metric_error,
    missing_metric_message,
    ranking,
    sort_rows,
    summarise_trial,
    sweep_params,
    trial_params,
    write_results,
)

log = logging.getLogger(__name__)

PATH_KEYS = [
    ("model", "policy_path"),
    ("model", "reward_path"),
    ("model", "critic_path"),
    ("model", "tokenizer_path"),
    ("data", "train_path"),
    ("data", "eval_path"),
]


def trial_resources(cfg: RLHFConfig, driver_cpus: float = 1.0) -> tune.PlacementGroupFactory:
    """The trial's placement group: bundle 0 for the trial's driver (the RL loop), then exactly the roles'
    bundles of `actors.placement.layout`, which `plan_placement` finds there and fills."""
    bundles, _ = layout(cfg)
    return tune.PlacementGroupFactory([{"CPU": driver_cpus}, *bundles], strategy=cfg.placement.strategy)


def search_space(params: list[Param]) -> dict[str, Any]:
    """Tune's param space, one entry per searched key (its dotted name): every grid value (crossed with the
    other grids, `num_samples` times), or one value per trial drawn by choice / uniform / loguniform."""
    make = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    return {p.key: make[p.kind](p.values) for p in params}


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict `base` with a trial's searched values (`section.key: value`)."""
    d = copy.deepcopy(base)
    for key, value in trial_params(params).items():
        *path, last = key.split(".")
        node = d
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value.item() if hasattr(value, "item") else value  # numpy scalars of Tune's samplers
    return d


def trial_config(base: dict[str, Any], params: dict[str, Any], out_dir: Path) -> RLHFConfig:
    """The base config with the trial's searched values, writing everything under `out_dir`."""
    d = with_params(base, params)
    d.setdefault("run", {})["output_dir"] = str(out_dir)
    d.setdefault("checkpoint", {})["dir"] = None  # <out_dir>/checkpoints: trials must not share one
    # the per-step rows stay in the trial's log; a progress bar there would not
    d.setdefault("logging", {})["progress_bar"] = False
    return RLHFConfig.from_dict(d)


def absolute_paths(cfg: RLHFConfig) -> RLHFConfig:
    """Tune runs each trial in its own working directory: make the config's input paths absolute."""
    d = cfg.to_dict()
    for section, key in PATH_KEYS:
        value = d[section][key]
        if value and not Path(value).is_absolute() and Path(value).exists():
            d[section][key] = str(Path(value).resolve())
    return RLHFConfig.from_dict(d)


def run_trial(
    params: dict[str, Any], base: dict[str, Any], trials_dir: str, required: tuple[str, ...] = ()
) -> None:
    """One Tune trial: an RL run reporting each step's numeric metrics, plus the last evaluation carried
    forward with its step (`eval/step`), so every report holds an eval metric ASHA may compare and the
    ranking knows how fresh it is. Its first report must hold each metric of `required` (the ranking's
    and ASHA's), else the trial fails with the names it does report. Runs in the trial's placement group."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, Path(trials_dir) / trial_id)
    carried: dict[str, float] = {}
    reported: list[int] = []  # the steps reported to Tune by this run of the trial

    def on_step(step: int, metrics: dict[str, Any]) -> None:
        if not reported:  # the step-0 evaluation (or the last one before a resume) is only in the log
            carried.update(last_evaluation(Path(cfg.run.output_dir) / "metrics.jsonl"))
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        evaluated = {k: v for k, v in numbers.items() if is_eval_metric(k)}
        if evaluated:
            carried.update(evaluated | {"eval/step": float(step)})
        report = {**numbers, **carried, "step": step}
        missing = [m for m in required if m not in report]
        if missing:  # before Tune sees it: Tune's own check would end the whole sweep with less to go on
            raise missing_metric_error(missing[0], list(report))
        tune.report({**report, "output_dir": str(cfg.run.output_dir)})
        reported.append(step)

    trainer = PPOTrainer(cfg)
    try:
        trainer.start()
        plan = trainer.roles.plan
        current = ray.util.get_current_placement_group()
        # 1.0 when the roles went into this trial's own placement group (what Tune reserved for it)
        in_trial_group = float(
            not plan.owned and current is not None and plan.placement_group.id == current.id
        )
        carried["placement/in_trial_group"] = in_trial_group
        trainer.fit(on_step=on_step)
        if not reported:  # resumed from a checkpoint of its last step: tell Tune where the run ended
            last = [r for r in read_metrics(Path(cfg.run.output_dir) / "metrics.jsonl") if "step" in r]
            if last:
                on_step(int(last[-1]["step"]), last[-1])
    finally:
        trainer.shutdown()


def last_evaluation(metrics_file: Path) -> dict[str, float]:
    """The newest value of every `eval/*` metric in a run's metrics.jsonl, and the step of the newest
    evaluation as `eval/step` (empty when there is none)."""
    found: dict[str, float] = {}
    if metrics_file.is_file():
        for row in read_metrics(metrics_file):
            evaluated = {
                k: float(v) for k, v in row.items() if is_eval_metric(k) and isinstance(v, int | float)
            }
            if evaluated:
                found.update(evaluated | {"eval/step": float(row.get("step", 0))})
    return found


def make_tuner(
    cfg: RLHFConfig, sweep: SweepConfig, params: list[Param], rank: Ranking
) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the interrupted experiment restored (unfinished and errored trials go on)."""
    out = Path(sweep.output_dir).resolve()
    storage, exp = out / "tune", out / "tune" / sweep.name
    required = tuple(dict.fromkeys(m for m in (rank.metric, rank.asha_metric) if m))
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=cfg.to_dict(), trials_dir=str(out / "trials"), required=required
        ),
        trial_resources(cfg, sweep.trial_cpus),
    )
    if sweep.resume and tune.Tuner.can_restore(str(exp)):
        log.warning(
            "resuming the sweep in %s with its saved search space and scheduler (this call's search "
            "settings are not used; --restart or a new --out/--name starts a new sweep)",
            exp,
        )
        return tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True), True
    scheduler = None
    if sweep.asha:
        # max_t one past the last step: a trial that gets there finishes itself (saving its policy) rather
        # than being stopped by the scheduler at its final report.
        # ASHA compares rank.asha_metric: the ranking metric, or reward/mean when that is an evaluation
        # too rare for the rungs (`rlhf_ray.tune.ranking` says why). Tune itself is given no metric: the
        # ranking at the end is `best_row`'s, over the whole table.
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="step",
            metric=rank.asha_metric,
            mode=rank.asha_mode,
            max_t=cfg.run.total_steps + 1,
            grace_period=min(sweep.grace_period, max(cfg.run.total_steps, 1)),
            reduction_factor=sweep.reduction_factor,
        )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(params),
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            # the concurrency cap lives in the generator (TuneConfig.max_concurrent_trials ignores it)
            search_alg=tune.search.BasicVariantGenerator(
                random_state=cfg.run.seed, max_concurrent=sweep.max_concurrent_trials
            ),
            num_samples=sweep.num_samples,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(storage),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        ),
    )
    return tuner, False


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]  # one per trial, sorted by its searched values (see rlhf_ray.tune)
    best: dict[str, Any] | None
    params: list[Param]  # what was searched
    ranking: Ranking  # what ranked the trials, and what ASHA compared
    table: str  # the markdown table printed at the end
    paths: dict[str, str] = field(default_factory=dict)  # results_md, results_csv, best_config, tune
    restored: bool = False  # resumed an earlier, interrupted run of the same sweep
    finished: bool = True  # False: interrupted with trials left; the same call again resumes them


def run_sweep(cfg: RLHFConfig, sweep: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray cluster and write the results table and the best
    config. Fails before any trial starts when the cluster cannot hold one trial."""
    if not ray.is_initialized():
        raise RuntimeError("run_sweep needs a Ray cluster: call ray.init() (jobs.sweep does) first")
    cfg = absolute_paths(cfg)
    params = check_params(cfg, sweep_params(sweep))
    rank = ranking(cfg, sweep)
    check_trial_fits(cfg, sweep, rank)
    log.info("sweep %s: %s", sweep.name, rank.describe())
    tuner, restored = make_tuner(cfg, sweep, params, rank)
    grid = tuner.fit()  # returns (does not raise) when interrupted: Ctrl-C, `ray job stop`
    out = Path(sweep.output_dir).resolve()
    exp = out / "tune" / sweep.name
    results = {Path(r.path).name: r for r in grid if r.path}
    rows = []
    for trial in tune.ExperimentAnalysis(str(exp)).trials:  # every trial Tune made, with its status
        result = results.get(Path(trial.path).name)
        if result is not None and result.error is not None and MISSING_MARK in str(result.error):
            raise ConfigError(missing_metric_message(str(result.error)))
        rows.append(
            summarise_trial(
                trial.config,
                None if result is None else result.metrics_dataframe,
                None if result is None else result.error,
                tune_status=trial.status,
                total_steps=cfg.run.total_steps,
                metric=rank.metric,
                window=sweep.window,
                trial_id=trial.trial_id,
            )
        )
    reported = reported_metrics(results.values())
    if reported and rank.metric not in reported:  # e.g. a finished sweep restored with another --metric
        raise missing_metric_error(rank.metric, sorted(reported))
    keys = [p.key for p in params]
    rows = sort_rows(rows, keys)
    best = best_row(rows, rank.metric, rank.mode)
    best_cfg = None
    if best is not None:
        # a restored sweep's trials have the keys it was started with (this call's params are not used)
        best_cfg = RLHFConfig.from_dict(with_params(cfg.to_dict(), {k: best[k] for k in keys if k in best}))
    table, paths = write_results(out, rows, best, best_cfg, sweep, params, rank)
    paths["tune"] = str(exp)
    finished = len(rows) == expected_trials(params, sweep.num_samples) and all(r["finished"] for r in rows)
    return SweepResult(
        rows=rows,
        best=best,
        params=params,
        ranking=rank,
        table=table,
        paths=paths,
        restored=restored,
        finished=finished,
    )


def reported_metrics(results: Any) -> set[str]:
    """The metric names the trials reported (Tune's own columns and the trials' configs left out)."""
    from ray.tune.result import AUTO_RESULT_KEYS

    skip = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "step", "output_dir"}
    names: set[str] = set()
    for result in results:
        df = result.metrics_dataframe
        if df is not None:
            names |= {c for c in df.columns if c not in skip and not c.startswith("config/")}
    return names


def check_trial_fits(cfg: RLHFConfig, sweep: SweepConfig, rank: Ranking) -> None:
    """One trial's bundles against the cluster's total: otherwise Tune would wait forever. An `eval/*`
    metric needs evaluation data."""
    if is_eval_metric(rank.metric) and not (cfg.data.eval_path and cfg.run.eval_prompts):
        raise ConfigError(
            f"sweep metric={rank.metric!r} comes from evaluations, but this run makes none: set "
            f"data.eval_path and run.eval_prompts > 0 (and run.eval_interval for more than one), or "
            f"use a per-step metric such as reward/mean"
        )
    pgf = trial_resources(cfg, sweep.trial_cpus)
    need = pgf.required_resources
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {v:g}, cluster has {have.get(k, 0.0):g}" for k, v in short.items())
        raise ConfigError(
            f"one sweep trial needs more than the whole cluster ({detail}): lower trainer.num_ranks or "
            f"placement.<role>.num_cpus, or start Ray with more CPUs (--num-cpus); each trial also takes "
            f"{sweep.trial_cpus:g} CPU for its driver (sweep trial_cpus)"
        )
    per_trial_cpu = need.get("CPU", 0.0)
    fit = math.floor(have.get("CPU", 0.0) / per_trial_cpu) if per_trial_cpu else sweep.max_concurrent_trials
    if fit < sweep.max_concurrent_trials:
        log.warning(
            "max_concurrent_trials=%d but the cluster's CPUs hold %d trial(s) of %g CPUs at once",
            sweep.max_concurrent_trials,
            fit,
            per_trial_cpu,
        )
