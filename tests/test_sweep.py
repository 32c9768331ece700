"""Ray Tune sweeps over RL config keys (`rlhf_ray.tune`, `rlhf_ray.trainer.sweep`, `jobs.sweep`).

Fast: the sweep settings' validation, the searched keys (`params`, `--param`, the kl_coef/lr shorthands)
checked against the RL config schema, the default ranking metric and what ASHA compares, the results
table and its reward/KL front, the CLI parsing.
Slow: a real 4-trial grid sweep on the tiny model over rollout.temperature and trainer.lr, ranked by the
held-out eval/gold (each trial an RL run with its own actors inside its trial's placement group, two
trials at a time, ASHA on reward/mean), then the same call again, which restores the finished experiment
instead of running anything; a 2-trial sweep interrupted (Ctrl-C) while its second trial runs, then
resumed: the finished trial is not run again, the other goes on from its checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.sweep import parse
from rlhf_ray.checkpoint import CheckpointManager
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.data.synthetic import write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.tune import (
    Param,
    SweepConfig,
    best_row,
    check_params,
    format_table,
    load_sweep_config,
    missing_metric_error,
    missing_metric_message,
    pareto_front,
    parse_param,
    parse_param_flag,
    ranking,
    summarise_trial,
    sweep_params,
    write_results,
)

# ---- fast ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sweep_config_from_file_and_flags(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("search: random\nkl_coef: [0.001, 0.1]\nlr: [1.0e-4, 1.0e-2]\nnum_samples: 6\n")
    s = load_sweep_config(f, max_concurrent_trials=2, metric=None)
    assert (s.search, s.kl_coef, s.num_samples, s.max_concurrent_trials) == ("random", [0.001, 0.1], 6, 2)
    assert s.metric is None  # None flags leave the file/default alone (None: chosen from the RL config)
    # the shorthands under search random: log-uniform in [low, high], as before `params` existed
    assert sweep_params(s) == [
        Param("algorithm.kl_coef", "loguniform", (0.001, 0.1)),
        Param("trainer.lr", "loguniform", (1e-4, 1e-2)),
    ]
    with pytest.raises(ConfigError, match=r"two values 0 < low < high"):
        load_sweep_config(f, kl_coef=[0.1, 0.01])
    with pytest.raises(ConfigError, match="unknown sweep key 'kl'"):
        load_sweep_config(None, kl=[0.1])
    with pytest.raises(ConfigError, match=r"sweep lr=\[0.0\]: values must be > 0"):
        load_sweep_config(None, lr=[0.0])
    with pytest.raises(ConfigError, match="wrong type"):
        load_sweep_config(None, num_samples="four")


@pytest.mark.timeout(60)
def test_cli_routes_flags_and_overrides():
    _, cfg, sweep = parse(
        [
            "--config",
            "jobs/configs/tiny_ppo.yaml",
            "--sweep",
            "jobs/configs/tiny_sweep.yaml",
            "--kl-coef",
            "0.02",
            "0.2",
            "--max-concurrent-trials",
            "1",
            "run.total_steps=7",
        ]
    )
    assert sweep.kl_coef == [0.02, 0.2] and sweep.max_concurrent_trials == 1
    # --kl-coef replaced the file's params algorithm.kl_coef; trainer.lr is the file's
    assert {p.key: p.values for p in sweep_params(sweep)} == {
        "trainer.lr": (5e-4, 2e-3),
        "algorithm.kl_coef": (0.02, 0.2),
    }
    assert cfg.run.total_steps == 7  # the CLI override wins over the sweep file's run.total_steps=20
    assert cfg.checkpoint.interval == 10  # the sweep file's override of the RL config
    # tiny_ppo evaluates with a gold function: ranked by eval/gold, which ASHA can compare as well since
    # the sweep file evaluates every 5 steps, by the first rung
    rank = ranking(cfg, sweep)
    assert (rank.metric, rank.mode, rank.asha_metric) == ("eval/gold", "max", "eval/gold")

    # --param: any key, merged into the file's params; values typed by the RL config
    _, cfg, sweep = parse(
        [
            *("--config", "jobs/configs/tiny_ppo.yaml", "--sweep", "jobs/configs/tiny_sweep.yaml"),
            *("--param", "algorithm.clip_eps=0.1,0.2", "--param", "trainer.lr=loguniform:1e-4,3e-3"),
            *("--metric", "kl", "--mode", "min"),
        ]
    )
    assert check_params(cfg, sweep_params(sweep)) == [
        Param("algorithm.kl_coef", "grid", (0.01, 0.3)),
        Param("trainer.lr", "loguniform", (1e-4, 3e-3)),
        Param("algorithm.clip_eps", "grid", (0.1, 0.2)),
    ]
    assert (ranking(cfg, sweep).metric, ranking(cfg, sweep).asha_mode) == ("kl", "min")
    base = ["--config", "jobs/configs/tiny_ppo.yaml"]
    with pytest.raises(
        SystemExit, match=r"unknown RL config key 'algorithm.clip': did you mean 'algorithm.clip_eps'"
    ):
        parse([*base, "--param", "algorithm.clip=0.1,0.2"])
    with pytest.raises(SystemExit, match=r"algorithm.clip_eps: the value 1.5 is not valid"):
        parse([*base, "--param", "algorithm.clip_eps=0.1,1.5"])


@pytest.mark.timeout(60)
def test_params_specs_and_their_errors():
    assert parse_param("rollout.temperature", {"choice": [0.7, 1.0]}) == Param(
        "rollout.temperature", "choice", (0.7, 1.0)
    )
    assert parse_param("rollout.temperature", [0.7, 1.0], "random").kind == "choice"  # a plain list
    assert parse_param("rollout.temperature", [0.7, 1.0], "grid").kind == "grid"
    assert parse_param_flag("algorithm.clip_eps=0.1,0.2") == {"algorithm.clip_eps": [0.1, 0.2]}
    assert parse_param_flag("trainer.lr=loguniform:1e-4,3e-3") == {"trainer.lr": {"loguniform": [1e-4, 3e-3]}}
    assert parse_param_flag("rollout.engine=choice:hf,vllm") == {"rollout.engine": {"choice": ["hf", "vllm"]}}
    # a value with a colon is a value, not a kind
    assert parse_param_flag("run.eval_function=a.b:gold") == {"run.eval_function": ["a.b:gold"]}
    for key, spec, message in [
        (
            "algorithm.kl_coeff",
            [0.1],
            r"unknown RL config key 'algorithm.kl_coeff': did you mean 'algorithm.kl_coef'",
        ),
        ("kl_coef", [0.1], r"unknown RL config key 'kl_coef'"),
        ("run.output_dir", ["a", "b"], r"run.output_dir is set by the sweep for each trial"),
        ("trainer.lr", {"normal": [0, 1]}, r"give one of grid, choice, uniform, loguniform"),
        ("trainer.lr", {"uniform": [1e-3]}, r"uniform \[0.001\]: give two numbers low < high"),
        ("trainer.lr", {"loguniform": [0.0, 1e-3]}, r"the low end must be > 0"),
        ("trainer.lr", [], r"give at least one value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_param(key, spec)
    with pytest.raises(ConfigError, match=r"--param 'trainer.lr': expected KEY=SPEC"):
        parse_param_flag("trainer.lr")
    with pytest.raises(ConfigError, match=r"unknown kind 'logunif'"):
        parse_param_flag("trainer.lr=logunif:1e-4,1e-3")
    # a key searched twice, by its shorthand and in params
    with pytest.raises(ConfigError, match=r"sweep kl_coef=\[0.1\] and params algorithm.kl_coef: both search"):
        load_sweep_config(None, kl_coef=[0.1], params={"algorithm.kl_coef": [0.2]})
    with pytest.raises(ConfigError, match=r"unknown RL config key 'rollout.temp'"):
        load_sweep_config(None, params={"rollout.temp": [0.5]})
    with pytest.raises(ConfigError, match=r"sweep params=\[1\]: expected a mapping"):
        load_sweep_config(None, params=[1])
    # nothing given: the small default grid over the two shorthands' keys
    assert [p.key for p in sweep_params(SweepConfig())] == ["algorithm.kl_coef", "trainer.lr"]


@pytest.mark.timeout(60)
def test_params_checked_against_the_rl_config():
    cfg = RLHFConfig.from_yaml("jobs/configs/tiny_ppo.yaml", ["algorithm.mini_batch_size=16"])
    got = check_params(
        cfg, [parse_param("trainer.lr", ["1e-4", 3e-4]), parse_param("trainer.zero_stage", [2, 3])]
    )
    assert got == [Param("trainer.lr", "grid", (1e-4, 3e-4)), Param("trainer.zero_stage", "grid", (2, 3))]
    assert isinstance(got[0].values[0], float)  # `1e-4` as YAML 1.1 reads it (a string), typed by the schema
    with pytest.raises(ConfigError, match=r"sweep params trainer.zero_stage: the value 4 is not valid"):
        check_params(cfg, [parse_param("trainer.zero_stage", [2, 4])])
    with pytest.raises(ConfigError, match=r"uniform draws real numbers, but trainer.micro_batch_size is int"):
        check_params(cfg, [parse_param("trainer.micro_batch_size", {"uniform": [4, 16]})])
    # each value is valid alone (batch 8 x 4 = 32 >= 32; 4 x 4 = 16 >= 16), one combination is not
    with pytest.raises(
        ConfigError,
        match=r"the trial with algorithm.mini_batch_size=32, run.prompts_per_step=4 is not a valid run",
    ):
        check_params(
            cfg,
            [parse_param("algorithm.mini_batch_size", [16, 32]), parse_param("run.prompts_per_step", [8, 4])],
        )


@pytest.mark.timeout(60)
def test_default_metric_and_what_asha_compares():
    gold = RLHFConfig.from_yaml("jobs/configs/tiny_ppo.yaml")  # data.eval_path, eval_prompts, eval_function
    sweep = SweepConfig(grace_period=2)

    def rank(cfg_overrides, **kw):
        r = ranking(gold.with_overrides(cfg_overrides), dataclasses.replace(sweep, **kw))
        return r.metric, r.mode, r.asha_metric, r.asha_mode

    # evaluations only at the start and the end: ASHA compares the training reward, the ranking the gold
    assert rank([]) == ("eval/gold", "max", "reward/mean", "max")
    assert "run.eval_interval <= 2 for ASHA on eval/gold" in ranking(gold, sweep).asha_why
    assert rank(["run.eval_interval=2"]) == ("eval/gold", "max", "eval/gold", "max")  # by the first rung
    assert rank(["run.eval_interval=3"])[2] == "reward/mean"  # too late for the rung at step 2
    assert rank(["run.eval_function=null"])[0] == "eval/reward"
    assert rank(["run.eval_prompts=0"])[:3] == ("reward/mean", "max", "reward/mean")
    assert rank(["data.eval_path=null"])[0] == "reward/mean"
    assert rank([], metric="kl", mode="min") == ("kl", "min", "kl", "min")
    assert rank([], asha=False)[2] is None
    described = ranking(gold, sweep).describe()
    assert (
        described.startswith("ranked by eval/gold (max; the default")
        and "ASHA compares reward/mean" in described
    )
    error = missing_metric_error("eval/golf", ["reward/mean", "kl", "eval/gold"])
    assert str(error).startswith(
        "sweep metric 'eval/golf' is not among the metrics a trial reports: eval/gold, kl, reward/mean"
    )
    # what run_sweep raises again from the error Tune hands back, Ray's traceback around it
    traced = f"ray::ImplicitFunc.train() (pid=1)\n  File x.py, line 3\nrlhf_ray.config.ConfigError: {error}\n"
    assert missing_metric_message(traced) == str(error)


def _row(trial, kl_coef, lr, reward, kl, error=False, steps=4):
    return {
        "trial": trial,
        "algorithm.kl_coef": kl_coef,
        "trainer.lr": lr,
        "steps": steps,
        "status": "completed",
        "reward": reward,
        "kl": kl,
        "gold": 0.5,
        "metric": reward,
        "metric_step": steps,
        "output_dir": "",
        "error": error,
        "finished": True,
    }


KEYS = ["algorithm.kl_coef", "trainer.lr"]


@pytest.mark.timeout(60)
def test_front_and_best():
    rows = [
        _row("a", 0.01, 1e-3, 0.8, 0.9),  # most reward, most KL: on the front
        _row("b", 0.1, 1e-3, 0.6, 0.2),  # on the front
        _row("c", 0.1, 2e-3, 0.5, 0.3),  # beaten by b on both counts
        _row("d", 0.3, 1e-3, 0.9, 0.1, error=True),  # failed: on no front, never best
    ]
    assert pareto_front(rows) == {0, 1}
    assert best_row(rows, "reward/mean", "max")["trial"] == "a"
    assert best_row(rows, "reward/mean", "min")["trial"] == "c"
    table = format_table(rows, KEYS, "reward/mean", 3)
    assert table.splitlines()[0] == (
        "| trial | algorithm.kl_coef | trainer.lr | steps | reward (last 3) | kl (last 3) | eval gold "
        "| rank: reward/mean (last 3) | front | status |"
    )
    assert [line.split(" | ")[-2] for line in table.splitlines()[2:]] == ["*", "*", "", ""]


@pytest.mark.timeout(60)
def test_ranked_by_the_last_evaluation(tmp_path):
    """An eval metric ranks by each trial's last evaluation (not a mean of carried values); a trial whose
    last evaluation is the shared step-0 one (ASHA stopped it first) does not compete."""
    reports = [  # eval at step 0 (carried to steps 1-2), then at step 3
        {"step": 1, "reward/mean": 0.9, "kl": 0.1, "eval/gold": 0.1, "eval/step": 0},
        {"step": 2, "reward/mean": 0.9, "kl": 0.1, "eval/gold": 0.1, "eval/step": 0},
        {"step": 3, "reward/mean": 0.9, "kl": 0.1, "eval/gold": 0.4, "eval/step": 3},
    ]
    kw = {"total_steps": 3, "metric": "eval/gold", "window": 3}
    config = {"rollout.temperature": 0.7, "lr": 1e-3}  # `lr`: a trial of a sweep from before `params`
    done = summarise_trial(config, reports, None, tune_status="TERMINATED", trial_id="a", **kw)
    assert (done["metric"], done["metric_step"], done["trainer.lr"]) == (0.4, 3, 1e-3)
    stopped = summarise_trial(
        {"rollout.temperature": 1.0, "lr": 1e-3},
        reports[:2],
        None,
        tune_status="TERMINATED",
        trial_id="b",
        **kw,
    )
    assert (stopped["metric"], stopped["metric_step"], stopped["status"]) == (0.1, 0, "stopped early (ASHA)")
    assert best_row([done, stopped], "eval/gold", "min")["trial"] == "a"  # b's 0.1 is the initial policy's
    keys = ["rollout.temperature", "trainer.lr"]
    table = format_table([done, stopped], keys, "eval/gold", 3)
    assert "| rank: eval/gold (last evaluation @ step) |" in table and "| 0.4000 @ 3 |" in table

    cfg = RLHFConfig.from_yaml("jobs/configs/tiny_ppo.yaml")
    sweep = SweepConfig(name="s", params={"rollout.temperature": [0.7, 1.0]}, lr=[1e-3])
    params, rank = check_params(cfg, sweep_params(sweep)), ranking(cfg, sweep)
    best_cfg = cfg.with_overrides(["rollout.temperature=0.7", "trainer.lr=1e-3"])
    text, paths = write_results(tmp_path, [done, stopped], done, best_cfg, sweep, params, rank)
    assert text.startswith(
        "searched: rollout.temperature grid [0.7, 1.0]; trainer.lr grid [0.001] (x1 samples)\n"
    )
    assert "ranked by eval/gold (max; the default" in text
    assert (
        "best by eval/gold (max, its last evaluation): trial a rollout.temperature=0.7 trainer.lr=0.001"
        in text
    )
    saved = json.loads(Path(paths["results_json"]).read_text())
    assert saved["ranking"]["metric"] == "eval/gold" and saved["best"]["trial"] == "a"
    assert [p["key"] for p in saved["params"]] == keys
    header = Path(paths["best_config"]).read_text()
    assert (
        "#   rollout.temperature: 0.7\n#   trainer.lr: 0.001\n" in header and "ranked by eval/gold" in header
    )
    assert RLHFConfig.from_yaml(paths["best_config"]).rollout.temperature == 0.7


@pytest.mark.timeout(60)
def test_summarise_trial_statuses_and_resumed_steps():
    reports = [  # steps 1-3, then a resume from the step-2 checkpoint reported steps 3-4 again
        {"step": 1, "reward/mean": 0.1, "kl": 0.0},
        {"step": 2, "reward/mean": 0.2, "kl": 0.1},
        {"step": 3, "reward/mean": 9.9, "kl": 9.9},
        {"step": 3, "reward/mean": 0.3, "kl": 0.2, "eval/gold": 0.5},
        {"step": 4, "reward/mean": 0.4, "kl": 0.3, "eval/gold": 0.6},
    ]
    kw = {"total_steps": 4, "metric": "reward/mean", "window": 2, "trial_id": "t1"}
    row = summarise_trial({"kl_coef": 0.1, "lr": 1e-3}, reports, None, tune_status="TERMINATED", **kw)
    assert (row["steps"], row["status"], row["gold"]) == (4, "completed", 0.6)
    assert (row["algorithm.kl_coef"], row["trainer.lr"]) == (0.1, 1e-3)  # the shorthands' keys
    assert row["reward"] == pytest.approx(0.35) and row["kl"] == pytest.approx(0.25)  # the newest step 3
    stopped = summarise_trial({"kl_coef": 0.1, "lr": 1e-3}, reports[:2], None, tune_status="TERMINATED", **kw)
    assert stopped["status"] == "stopped early (ASHA)" and stopped["finished"]
    cut = summarise_trial({"kl_coef": 0.1, "lr": 1e-3}, reports[:2], None, tune_status="PENDING", **kw)
    assert cut["status"].startswith("interrupted at step 2") and not cut["finished"]
    failed = summarise_trial(
        {"kl_coef": 0.1, "lr": 1e-3}, [], ValueError("bad\nmore"), tune_status="ERROR", **kw
    )
    assert failed["status"] == "error: ValueError: bad" and failed["error"] and failed["steps"] == 0
    assert best_row([cut, failed], "reward/mean", "max") is None  # neither finished cleanly


# ---- a real sweep --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=200, n_eval_prompts=16
    )


TOTAL_STEPS = 3


def sweep_rl_config(model_dir, task) -> RLHFConfig:
    """The tiny RL run, trimmed to what a trial needs to prove the sweep: one policy rank and the
    transformers sampler (vLLM and two ranks are covered by the end-to-end, job-submit and multi-node
    tests), fewer CPUs for the light roles so that two trials fit the 8 logical CPUs of `ray_local`."""
    return RLHFConfig.from_dict(
        {
            "model": {"policy_path": str(model_dir), "dtype": "float32"},
            "data": {
                "train_path": str(task["prompts"]),
                "eval_path": str(task["eval_prompts"]),
                "max_prompt_len": 16,
            },
            "rollout": {"engine": "hf", "max_new_tokens": 8, "samples_per_prompt": 4},
            "algorithm": {"estimator": "grpo", "mini_batch_size": 32},
            "trainer": {"num_ranks": 1, "zero_stage": 2, "micro_batch_size": 16},
            "placement": {"reference": {"num_cpus": 0.5}, "reward": {"num_cpus": 0.5}},
            "reward": {"kind": "rule", "function": "rlhf_ray.data.synthetic:digit_shaped_reward"},
            "run": {
                "total_steps": TOTAL_STEPS,
                "prompts_per_step": 8,
                "eval_prompts": 8,
                "eval_function": "rlhf_ray.data.synthetic:gold_reward",
                "call_timeout_s": 600,
            },
            "logging": {"tensorboard": False, "progress_bar": False},
            "checkpoint": {"interval": 0},
        }
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_refuses_what_cannot_run(ray_local, tiny_model_dir, task, tmp_path):
    """Before any trial starts: a trial larger than the cluster, an eval metric without evaluations."""
    from rlhf_ray.trainer.sweep import run_sweep

    big = sweep_rl_config(tiny_model_dir, task).with_overrides(["trainer.num_ranks=8"])
    with pytest.raises(
        ConfigError,
        match=r"one sweep trial needs more than the whole cluster \(CPU: needs 11, cluster has 8\)",
    ):
        run_sweep(big, SweepConfig(output_dir=str(tmp_path / "a")))
    no_eval = sweep_rl_config(tiny_model_dir, task).with_overrides(["run.eval_prompts=0"])
    with pytest.raises(ConfigError, match="comes from evaluations, but this run makes none"):
        run_sweep(no_eval, SweepConfig(output_dir=str(tmp_path / "b"), metric="eval/gold"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_four_trial_sweep_then_restore(ray_local, tiny_model_dir, task, tmp_path):
    from rlhf_ray.trainer.sweep import run_sweep, trial_resources

    cfg = sweep_rl_config(tiny_model_dir, task)
    keys = ["rollout.temperature", "trainer.lr"]
    sweep = SweepConfig(
        output_dir=str(tmp_path / "sweep"),
        name="t",
        # any RL config key, here next to the lr; the fast learners first: ASHA then has a bar the slow
        # ones may miss
        params={"rollout.temperature": {"grid": [1.0, 0.5]}, "trainer.lr": [2e-3, 1e-4]},
        grace_period=2,
        max_concurrent_trials=2,
        trial_cpus=0.5,
        window=2,
    )
    assert trial_resources(cfg, sweep.trial_cpus).required_resources["CPU"] == 3.5  # 2 trials in 8 CPUs

    result = run_sweep(cfg, sweep)
    print(result.table)
    rows = result.rows
    assert not result.restored and result.finished
    # the run evaluates with a gold function: ranked by eval/gold; evaluated only at steps 0 and 3, too
    # rarely for ASHA's rungs, which compare the training reward
    assert (result.ranking.metric, result.ranking.asha_metric) == ("eval/gold", "reward/mean")
    assert sorted((r["rollout.temperature"], r["trainer.lr"]) for r in rows) == [
        (0.5, 1e-4),
        (0.5, 2e-3),
        (1.0, 1e-4),
        (1.0, 2e-3),
    ]
    assert len({r["output_dir"] for r in rows}) == 4, "each trial needs its own output dir"
    for r in rows:
        assert not r["error"], r["status"]
        out = tmp_path / "sweep" / "trials" / r["trial"]
        assert r["output_dir"] == str(out)
        # the trial's run used its own temperature and lr
        run_cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert (run_cfg["rollout"]["temperature"], run_cfg["trainer"]["lr"]) == (r[keys[0]], r[keys[1]])
        steps = [m for m in read_metrics(out / "metrics.jsonl") if "reward/mean" in m]
        assert len(steps) == r["steps"] >= sweep.grace_period  # ASHA stops no trial before its grace period
        if r["status"] == "completed":
            assert r["steps"] == TOTAL_STEPS
            assert (out / "policy" / "config.json").is_file()
            assert r["gold"] == pytest.approx(read_metrics(out / "metrics.jsonl")[-1]["eval/gold"])
            assert (r["metric"], r["metric_step"]) == (r["gold"], TOTAL_STEPS)  # the last evaluation
        else:
            assert r["status"] == "stopped early (ASHA)" and r["steps"] < TOTAL_STEPS
            assert r["metric_step"] == 0  # only the initial policy's evaluation: it does not compete
        # the table's reward is the mean of the trial's last `window` steps
        assert r["reward"] == pytest.approx(sum(m["reward/mean"] for m in steps[-2:]) / len(steps[-2:]))
    assert sum(r["status"] == "completed" for r in rows) >= 1

    # every trial's roles ran in the placement group Tune reserved for that trial
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(result.paths["tune"])
    for df in analysis.trial_dataframes.values():
        assert (df["placement/in_trial_group"] == 1.0).all()

    # the table, the CSV and the best config agree
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 4  # header + one row per trial
    assert md.splitlines()[3].startswith("| trial | rollout.temperature | trainer.lr | steps |")
    assert "| rank: eval/gold (last evaluation @ step) |" in md
    with open(tmp_path / "sweep" / "results.csv") as f:
        assert {row["trial"] for row in csv.DictReader(f)} == {r["trial"] for r in rows}
    best = max((r for r in rows if r["status"] == "completed"), key=lambda r: r["metric"])
    assert (
        result.best["trial"] == best["trial"]
        and f"best by eval/gold (max, its last evaluation): trial {best['trial']}" in md
    )
    best_cfg = RLHFConfig.from_yaml(tmp_path / "sweep" / "best_config.yaml")
    assert (best_cfg.rollout.temperature, best_cfg.trainer.lr) == (best[keys[0]], best[keys[1]])
    assert best_cfg.model.policy_path == cfg.model.policy_path
    assert json.loads((tmp_path / "sweep" / "results.json").read_text())["ranking"]["metric"] == "eval/gold"

    # the same call again restores the finished experiment: no trial runs a step more
    lines = {
        r["trial"]: len(read_metrics(tmp_path / "sweep" / "trials" / r["trial"] / "metrics.jsonl"))
        for r in rows
    }
    again = run_sweep(cfg, sweep)
    assert again.restored and again.finished
    assert [(r["trial"], r["steps"], r["reward"]) for r in again.rows] == [
        (r["trial"], r["steps"], r["reward"]) for r in rows
    ]
    for trial, n in lines.items():
        assert len(read_metrics(tmp_path / "sweep" / "trials" / trial / "metrics.jsonl")) == n
    # a metric the trials never reported: the error names it and what they did report
    with pytest.raises(
        ConfigError, match=r"sweep metric 'eval/golf' is not among .*: .*eval/gold, .*reward/mean"
    ):
        run_sweep(cfg, dataclasses.replace(sweep, metric="eval/golf"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_interrupted_sweep_resumes_the_running_trial_from_its_checkpoint(
    ray_local, tiny_model_dir, task, tmp_path
):
    """`python -m jobs.sweep` (a driver process of its own on this module's cluster) gets Ctrl-C once its
    first trial has finished and its second has written a checkpoint. `run_sweep` with the same settings
    then restores the experiment: the finished trial is not run again (its files are untouched), the
    interrupted one carries on from its newest checkpoint (the rows up to it are the ones written before
    the interruption, wall-clock times included) to the last step, and the table has both."""
    import ray

    from rlhf_ray.trainer.sweep import run_sweep

    root = Path(__file__).resolve().parents[1]
    # 10 steps, a checkpoint at each: Ctrl-C lands while the second trial still runs (with 3 steps of
    # ~0.3 s it could finish between the poll that saw its first checkpoint and the signal)
    total = 10
    cfg = sweep_rl_config(tiny_model_dir, task).with_overrides(
        ["checkpoint.interval=1", f"run.total_steps={total}"]
    )
    sweep = SweepConfig(
        output_dir=str(tmp_path / "sweep"),
        name="r",
        kl_coef=[0.01],
        lr=[2e-3, 1e-4],  # two trials, one at a time, in this order
        asha=False,
        max_concurrent_trials=1,
        trial_cpus=0.5,
        window=2,
    )
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(dataclasses.asdict(sweep), sort_keys=False))
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(tmp_path / "rl.yaml")]
    cmd += ["--sweep", str(tmp_path / "sweep.yaml"), "--address", ray.get_runtime_context().gcs_address]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RAY_ADDRESS", None)
    trials = tmp_path / "sweep" / "trials"

    def progress() -> tuple[list[Path], list[Path]]:
        """(finished trials, unfinished trials with a checkpoint)"""
        dirs = sorted(trials.glob("*")) if trials.is_dir() else []
        done = [d for d in dirs if (d / "policy" / "config.json").is_file()]
        saved = [d for d in dirs if d not in done and CheckpointManager(d / "checkpoints").latest()]
        return done, saved

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while not all(progress()):
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
                assert time.monotonic() < deadline, "the sweep made no progress in 900 s"
                time.sleep(0.5)
            proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment's state and returns
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = (tmp_path / "first.log").read_text()
    assert proc.returncode == 1 and "run the same command to resume it" in output, output[-5000:]
    (finished,), (cut,) = progress()
    before = {p: p.read_bytes() for p in sorted(finished.rglob("*")) if p.is_file()}
    saved_at = int(
        json.loads((CheckpointManager(cut / "checkpoints").latest() / "manifest.json").read_text())["step"]
    )
    assert 1 <= saved_at < total
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= saved_at]
    assert [json.loads(line)["step"] for line in kept] == list(range(saved_at + 1))  # 0: the evaluation

    result = run_sweep(cfg, sweep)
    print(result.table)
    assert result.restored and result.finished
    assert {r["trial"] for r in result.rows} == {finished.name, cut.name}
    for r in result.rows:
        assert r["status"] == "completed" and r["steps"] == total and not r["error"], r
    # the finished trial did not run again: every file of it is as it was
    assert {p: p.read_bytes() for p in sorted(finished.rglob("*")) if p.is_file()} == before
    # the interrupted one resumed from its checkpoint: the rows up to it were not written again (their
    # wall-clock times are the first run's), each later step appears once, and it ended with its policy
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(total + 1))
    assert lines[: saved_at + 1] == kept
    assert (cut / "policy" / "config.json").is_file()
