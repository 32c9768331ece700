"""The four RLHF stages in one run on the synthetic sorting task: data -> SFT -> preference pairs ->
reward model -> RL -> evaluation and report. Each stage reads what the one before wrote.

One `RLHFConfig` says everything. Its RL sections (model, data, rollout, algorithm, trainer, reward, run,
...) are the shared base and the RL stage's settings; `offline.sft` and `offline.reward_model` are the
offline stages' overlays (epochs, batch size, learning rate); `pipeline` holds the task's sizes, the
number of preference prompts and the report's options. The pipeline sets the paths that tie the stages
together itself, from `pipeline.output_dir` (the run's root):

    <root>/task/           sft.jsonl, prompts.jsonl, eval_prompts.jsonl, model/ (a random tiny model)
    <root>/sft/            the SFT policy (model.policy_path of the later stages)
    <root>/preferences/    pairs.jsonl: two temperature-1 SFT samples per prompt, ordered by the labeler
    <root>/reward_model/   the reward model (model.reward_path of RL, reward.kind=model)
    <root>/rl/             the RL run: metrics.jsonl, checkpoints/, policy/
    <root>/logs/           the offline stages' metrics
    <root>/stages/<s>.json a stage's record, written last: the stage counts as done only once it exists
    <root>/summary.json, <root>/curves.png, <root>/report.txt

Resume: a stage whose record exists, with the same settings key, is skipped. The key hashes the stage's
own settings and the key of the stage before it, so changing e.g. `offline.reward_model.epochs` re-runs
the reward model, RL and the evaluation but keeps the data and SFT. An RL stage that stopped half way
continues from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors import placement
from rlhf_ray.config import RLHFConfig
from rlhf_ray.metrics import read_metrics
from rlhf_ray.report import build_summary, format_table, plot_curves, write_summary
from rlhf_ray.trainer.evaluation import evaluate_stage
from rlhf_ray.trainer.pipeline_layout import STAGES, Layout
from rlhf_ray.trainer.pipeline_stages import STAGE_FUNCTIONS

log = logging.getLogger(__name__)

GOLD_FUNCTION = "rlhf_ray.data.synthetic:gold_reward"


# ---- the configs of the stages --------------------------------------------------------------------
def _replace(cfg: RLHFConfig, **sections: dict[str, Any]) -> RLHFConfig:
    """`cfg` with fields of some sections replaced (paths set by the pipeline; the base was validated)."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    )


def stage_configs(cfg: RLHFConfig) -> dict[str, RLHFConfig]:
    """The `RLHFConfig` each stage runs with: the base plus the paths of this run. Offline stages hold
    out `data.eval_fraction` of their training file; RL evaluates on the task's held-out prompts."""
    lay = Layout(Path(cfg.pipeline.output_dir))
    root = str(lay.root)
    no_model = {"reward_path": None, "critic_path": None, "tokenizer_path": None}
    sft = _replace(
        cfg,
        model={**no_model, "policy_path": str(lay.init_model)},
        data={"train_path": str(lay.task / "sft.jsonl"), "eval_path": None},
        run={"output_dir": root},
    )
    sampling = {"temperature": 1.0, "top_p": 1.0}  # honest samples of the SFT policy
    preferences = _replace(
        cfg,
        model={**no_model, "policy_path": str(lay.sft)},
        data={"train_path": str(lay.task / "prompts.jsonl"), "eval_path": None},
        rollout=sampling,
        run={"output_dir": root},
    )
    reward_model = _replace(
        cfg,
        model={**no_model, "policy_path": str(lay.sft)},
        data={"train_path": str(lay.pairs), "eval_path": None},
        run={"output_dir": root},
    )
    rl = _replace(
        cfg,
        model={"policy_path": str(lay.sft), "reward_path": str(lay.reward_model), "tokenizer_path": None},
        data={
            "train_path": str(lay.task / "prompts.jsonl"),
            "eval_path": str(lay.task / "eval_prompts.jsonl"),
        },
        reward={"kind": "model"},
        run={"output_dir": str(lay.rl), "eval_function": cfg.run.eval_function or GOLD_FUNCTION},
        checkpoint={"dir": None},
    )
    evaluate = _replace(
        rl,
        model={"policy_path": str(lay.sft)},  # the reference; the policies are set per engine
        rollout=sampling,
    )
    return {
        "data": cfg,
        "sft": sft,
        "preferences": preferences,
        "reward_model": reward_model,
        "rl": rl,
        "evaluate": evaluate,
    }


def stage_keys(cfg: RLHFConfig) -> dict[str, str]:
    """A short hash per stage of the settings its result depends on, chained through the stages."""
    d = cfg.to_dict()
    p, seed = d["pipeline"], d["run"]["seed"]
    trunk = {
        "dtype": d["model"]["dtype"],
        "data": {k: v for k, v in d["data"].items() if k not in ("train_path", "eval_path")},
        "trainer": {k: v for k, v in d["trainer"].items() if k not in ("lr", "critic_lr")},
    }
    rl_run = {
        k: v for k, v in d["run"].items() if k not in ("output_dir", "call_timeout_s", "restart_timeout_s")
    }
    parts = {
        "data": {"seed": seed, "sizes": [p["n_demos"], p["n_train_prompts"], p["n_eval_prompts"]]},
        "sft": trunk | {"stage": d["offline"]["sft"]},
        "preferences": {"n": p["preference_prompts"], "rollout": d["rollout"], "seed": seed},
        "reward_model": trunk | {"stage": d["offline"]["reward_model"]},
        "rl": trunk
        | {k: d[k] for k in ("algorithm", "rollout", "reward")}
        | {"lr": [d["trainer"]["lr"], d["trainer"]["critic_lr"]], "run": rl_run},
        "evaluate": {"greedy": p["report_greedy"], "n": p["n_eval_prompts"], "seed": seed},
    }
    keys, previous = {}, ""
    for stage in STAGES:
        blob = json.dumps([previous, parts[stage]], sort_keys=True, default=str)
        keys[stage] = previous = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


# ---- stage records (resume) -----------------------------------------------------------------------
def read_record(lay: Layout, stage: str) -> dict[str, Any] | None:
    path = lay.record(stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn record: the stage did not finish


def write_record(lay: Layout, stage: str, record: dict[str, Any]) -> None:
    """Atomically (temp file + rename): the record is the stage's completion marker."""
    path = lay.record(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def _clear_outputs(lay: Layout, stage: str) -> None:
    for path in lay.outputs(stage):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


StageFn = Callable[[RLHFConfig, Layout], dict[str, Any]]


def run_stage(stage: str, fn: StageFn, cfg: RLHFConfig, lay: Layout, key: str) -> dict[str, Any]:
    """Run one stage unless its record says it is done with the same key. Returns its record with
    `status` 'ran' or 'skipped' for this call."""
    record = read_record(lay, stage)
    if record is not None and record.get("key") == key:
        log.info("stage %s: done in an earlier call (%.0f s), skipped", stage, record["seconds"])
        return record | {"status": "skipped"}
    if record is not None:
        log.info("stage %s: its settings changed since it ran; running it again", stage)
        lay.record(stage).unlink()
    key_file = lay.root / "stages" / f"{stage}.started"
    if not (key_file.is_file() and key_file.read_text() == key):
        _clear_outputs(lay, stage)  # outputs of other settings, or of unknown origin: start clean
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    log.info("stage %s: running", stage)
    t0 = time.perf_counter()
    result = fn(cfg, lay)
    record = {"stage": stage, "key": key, "seconds": round(time.perf_counter() - t0, 2), "result": result}
    write_record(lay, stage, record)
    key_file.unlink(missing_ok=True)
    return record | {"status": "ran"}


# ---- the whole run --------------------------------------------------------------------------------
def needed_cpus(cfg: RLHFConfig) -> float:
    """Logical CPUs the largest stage asks of Ray: the RL roles (or the evaluation's engines and reward)."""
    p = cfg.placement
    evaluation = 2 * p.rollout.num_cpus + p.reward.num_cpus
    return max(placement.needed_cpus(cfg), evaluation)


def pending_stages(cfg: RLHFConfig) -> list[str]:
    """The stages a call would run: those without a record of the current settings."""
    lay, keys = Layout(Path(cfg.pipeline.output_dir)), stage_keys(cfg)
    return [s for s in STAGES if (read_record(lay, s) or {}).get("key") != keys[s]]


def run_pipeline(cfg: RLHFConfig) -> dict[str, Any]:
    """Run (or resume) every stage, then write summary.json, curves.png and report.txt under
    `pipeline.output_dir`. Returns the summary (`rlhf_ray.report`), with the report text as `table`."""
    t0 = time.perf_counter()
    lay = Layout(Path(cfg.pipeline.output_dir))
    lay.root.mkdir(parents=True, exist_ok=True)
    (lay.root / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    configs, keys = stage_configs(cfg), stage_keys(cfg)
    functions = STAGE_FUNCTIONS | {"evaluate": evaluate_stage}
    records = {
        stage: run_stage(stage, functions[stage], configs[stage], lay, keys[stage]) for stage in STAGES
    }

    rl_rows = read_metrics(lay.rl / "metrics.jsonl")
    paths = {
        "summary": str(lay.root / "summary.json"),
        "plot": str(lay.root / "curves.png"),
        "report": str(lay.root / "report.txt"),
        "sft": str(lay.sft),
        "reward_model": str(lay.reward_model),
        "rl_policy": str(lay.rl_policy),
        "rl_metrics": str(lay.rl / "metrics.jsonl"),
    }
    summary = build_summary(
        records["evaluate"]["result"],
        records,
        rl_rows,
        cfg.pipeline.min_gold_gain,
        time.perf_counter() - t0,
        paths,
        n_examples=cfg.logging.num_samples,
    )
    plot_curves(rl_rows, summary, paths["plot"])
    table = format_table(summary)
    Path(paths["report"]).write_text(table + "\n")
    write_summary(summary, paths["summary"])
    return summary | {"table": table}
