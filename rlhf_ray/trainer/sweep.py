"""Ray Tune sweeps over the KL coefficient and the learning rate: each trial is a full RL run
(`PPOTrainer`) whose actors live inside the trial's own placement group, reporting every step to Tune;
ASHA stops the weak trials early; an interrupted sweep resumes with `Tuner.restore` (and each trial from
its own newest checkpoint); the end is a results table of the reward/KL trade-off and the best config.

Layout of `sweep.output_dir`:
    tune/<name>/        Tune's experiment state (what `Tuner.restore` reads)
    trials/<trial_id>/  each trial's run.output_dir: metrics.jsonl, checkpoints/, policy/, curves.png
    results.md, results.csv, best_config.yaml
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
from rlhf_ray.tune import SweepConfig, best_row, summarise_trial, write_results

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


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """grid: every (kl_coef, lr) pair (`num_samples` times); random: log-uniform in [low, high]."""
    if sweep.search == "grid":
        return {"kl_coef": tune.grid_search(sweep.kl_coef), "lr": tune.grid_search(sweep.lr)}
    return {"kl_coef": tune.loguniform(*sweep.kl_coef), "lr": tune.loguniform(*sweep.lr)}


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict `base` with a trial's `kl_coef` and `lr`."""
    d = copy.deepcopy(base)
    d.setdefault("algorithm", {})["kl_coef"] = float(params["kl_coef"])
    d.setdefault("trainer", {})["lr"] = float(params["lr"])
    return d


def trial_config(base: dict[str, Any], params: dict[str, Any], out_dir: Path) -> RLHFConfig:
    """The base config with the trial's kl_coef and lr, writing everything under `out_dir`."""
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


def run_trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str) -> None:
    """One Tune trial: an RL run reporting each step's numeric metrics (plus the last evaluation, carried
    forward so every report holds the ASHA metric). Runs in the trial's placement group."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, Path(trials_dir) / trial_id)
    carried: dict[str, float] = {}
    reported: list[int] = []  # the steps reported to Tune by this run of the trial

    def on_step(step: int, metrics: dict[str, Any]) -> None:
        if not reported:  # the step-0 evaluation (or the last one before a resume) is only in the log
            carried.update(last_evaluation(Path(cfg.run.output_dir) / "metrics.jsonl"))
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        carried.update({k: v for k, v in numbers.items() if k.startswith("eval/")})
        tune.report({**numbers, **carried, "step": step, "output_dir": str(cfg.run.output_dir)})
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
    """The newest value of every `eval/*` metric in a run's metrics.jsonl (empty when there is none)."""
    found: dict[str, float] = {}
    if metrics_file.is_file():
        for row in read_metrics(metrics_file):
            found.update(
                {k: float(v) for k, v in row.items() if k.startswith("eval/") and isinstance(v, int | float)}
            )
    return found


def make_tuner(cfg: RLHFConfig, sweep: SweepConfig) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the interrupted experiment restored (unfinished and errored trials go on)."""
    out = Path(sweep.output_dir).resolve()
    storage, exp = out / "tune", out / "tune" / sweep.name
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), trials_dir=str(out / "trials")),
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
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="step",
            max_t=cfg.run.total_steps + 1,
            grace_period=min(sweep.grace_period, max(cfg.run.total_steps, 1)),
            reduction_factor=sweep.reduction_factor,
        )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
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
    rows: list[dict[str, Any]]  # one per trial, sorted by kl_coef then lr (see rlhf_ray.tune)
    best: dict[str, Any] | None
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
    check_trial_fits(cfg, sweep)
    tuner, restored = make_tuner(cfg, sweep)
    grid = tuner.fit()  # returns (does not raise) when interrupted: Ctrl-C, `ray job stop`
    out = Path(sweep.output_dir).resolve()
    exp = out / "tune" / sweep.name
    results = {Path(r.path).name: r for r in grid if r.path}
    rows = []
    for trial in tune.ExperimentAnalysis(str(exp)).trials:  # every trial Tune made, with its status
        result = results.get(Path(trial.path).name)
        rows.append(
            summarise_trial(
                trial.config,
                None if result is None else result.metrics_dataframe,
                None if result is None else result.error,
                tune_status=trial.status,
                total_steps=cfg.run.total_steps,
                metric=sweep.metric,
                window=sweep.window,
                trial_id=trial.trial_id,
            )
        )
    rows.sort(key=lambda r: (r["kl_coef"], r["lr"]))
    best = best_row(rows, sweep.metric, sweep.mode)
    best_cfg = None if best is None else RLHFConfig.from_dict(with_params(cfg.to_dict(), best))
    table, paths = write_results(out, rows, best, best_cfg, sweep)
    paths["tune"] = str(exp)
    finished = len(rows) == expected_trials(sweep) and all(r["finished"] for r in rows)
    return SweepResult(rows=rows, best=best, table=table, paths=paths, restored=restored, finished=finished)


def expected_trials(sweep: SweepConfig) -> int:
    per_sample = len(sweep.kl_coef) * len(sweep.lr) if sweep.search == "grid" else 1
    return per_sample * sweep.num_samples


def check_trial_fits(cfg: RLHFConfig, sweep: SweepConfig) -> None:
    """One trial's bundles against the cluster's total: otherwise Tune would wait forever. An `eval/*`
    metric needs evaluation data (Tune refuses reports that lack the metric)."""
    if sweep.metric.startswith("eval/") and not (cfg.data.eval_path and cfg.run.eval_prompts):
        raise ConfigError(
            f"sweep metric={sweep.metric!r} comes from evaluations, but this run makes none: set "
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
