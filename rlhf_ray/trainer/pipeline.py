"""The four RLHF stages in one run: data -> SFT -> preference pairs -> reward model -> RL -> evaluation
and report. Each stage reads what the one before wrote, or what you gave in its place.

One `RLHFConfig` says everything. Its RL sections (model, data, rollout, algorithm, trainer, reward, run,
...) are the shared base and the RL stage's settings; `offline.sft` and `offline.reward_model` are the
offline stages' overlays (epochs, batch size, learning rate); `pipeline` says where the data and the first
model come from, which stages to skip, and the report's options. The pipeline sets the model and data paths
of each stage itself, from its plan (`pipeline_layout.stage_plan`):

- `pipeline.task=synthetic` (the default): the embedded sorting task, its simulated labeler and a random
  tiny model (sizes `pipeline.n_demos`, `pipeline.n_train_prompts`, `pipeline.n_eval_prompts`); the RL
  reward is the learned reward model; the report's gold score is the task's hidden one;
- `pipeline.task=own`: your model (`pipeline.base_model`), demonstrations, preference pairs, prompts and
  held-out prompts (docs/OWN_DATA.md); nothing is sampled for preferences (your pairs are them); the RL
  reward is `reward.*` (a reward model trained here or given, a rule, an HTTP scorer); the report compares
  the SFT and RL policies when `pipeline.eval_prompts` and `run.eval_function` are set.

`pipeline.sft_model` / `pipeline.reward_model` (a directory you have) skip the stages that make them.
Under `pipeline.output_dir` (the run's root):

    <root>/task/           sft.jsonl, prompts.jsonl, eval_prompts.jsonl, model/ (synthetic only)
    <root>/sft/            the SFT policy (model.policy_path of the later stages), unless given
    <root>/preferences/    pairs.jsonl: two temperature-1 SFT samples per prompt, ordered by the labeler
    <root>/reward_model/   the reward model (model.reward_path of RL, reward.kind=model), unless given
    <root>/rl/             the RL run: metrics.jsonl, checkpoints/, policy/, curves.png
    <root>/logs/           the offline stages' metrics
    <root>/stages/<s>.json a stage's record, written last: the stage counts as done only once it exists
    <root>/summary.json, <root>/curves.png, <root>/report.txt

Resume: a stage whose record exists, with the same settings key, is skipped. The key hashes the stage's
own settings, the files of yours it reads (path, size, modification time) and the key of the stage before
it, so changing e.g. `offline.reward_model.epochs` or the pairs file re-runs the reward model, RL and the
evaluation but keeps the data and SFT. An RL stage that stopped half way continues from its newest
checkpoint.
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
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.data import load_records
from rlhf_ray.metrics import read_metrics
from rlhf_ray.report import (
    build_summary,
    format_table,
    plot_curves,
    stage_figures,
    write_summary,
)
from rlhf_ray.trainer.offline import require_model_dir
from rlhf_ray.trainer.pipeline_layout import GOLD_FUNCTION, STAGES, Layout, StagePlan, stage_plan
from rlhf_ray.trainer.pipeline_stages import STAGE_FUNCTIONS

log = logging.getLogger(__name__)


# ---- the configs of the stages --------------------------------------------------------------------
def _replace(cfg: RLHFConfig, **sections: dict[str, Any]) -> RLHFConfig:
    """`cfg` with fields of some sections replaced (paths set by the pipeline; the base was validated)."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    )


def stage_configs(cfg: RLHFConfig, plan: dict[str, StagePlan] | None = None) -> dict[str, RLHFConfig]:
    """The `RLHFConfig` of each stage that runs: the base plus the paths of its plan. Offline stages hold
    out `data.eval_fraction` of their training file; RL evaluates on the held-out prompts."""
    plan = plan or stage_plan(cfg)
    root = str(Path(cfg.pipeline.output_dir))
    no_model = {"reward_path": None, "critic_path": None, "tokenizer_path": None}
    sampling = {"temperature": 1.0, "top_p": 1.0}  # honest samples of the SFT policy
    configs = {"data": cfg}
    if plan["sft"].action == "run":
        i = plan["sft"].inputs
        configs["sft"] = _replace(
            cfg,
            model={**no_model, "policy_path": i["model"]},
            data={"train_path": i["data"], "eval_path": None},
            run={"output_dir": root},
        )
    if plan["preferences"].action == "run":
        i = plan["preferences"].inputs
        configs["preferences"] = _replace(
            cfg,
            model={**no_model, "policy_path": i["policy"]},
            data={"train_path": i["prompts"], "eval_path": None},
            rollout=sampling,
            run={"output_dir": root},
        )
    if plan["reward_model"].action == "run":
        i = plan["reward_model"].inputs  # model.reward_path: where the reward model starts (the SFT policy)
        configs["reward_model"] = _replace(
            cfg,
            model={**no_model, "policy_path": i["init"], "reward_path": i["init"]},
            data={"train_path": i["data"], "eval_path": None},
            run={"output_dir": root},
        )
    i, own = plan["rl"].inputs, cfg.pipeline.task == "own"
    rl = _replace(
        cfg,
        model={"policy_path": i["policy"], "reward_path": i.get("reward_model"), "tokenizer_path": None},
        data={"train_path": i["prompts"], "eval_path": i.get("eval_prompts")},
        reward={} if own else {"kind": "model"},
        run={
            "output_dir": str(plan["rl"].output),
            "eval_function": cfg.run.eval_function or (None if own else GOLD_FUNCTION),
        },
        checkpoint={"dir": None},
    )
    configs["rl"] = rl
    if plan["evaluate"].action == "run":
        # the reference: the SFT policy; the two policies are set per engine
        configs["evaluate"] = _replace(
            rl, model={"policy_path": plan["evaluate"].inputs["sft"]}, rollout=sampling
        )
    return configs


def fingerprint(path: str | None) -> Any:
    """What says that a file or directory of yours changed: its path, size and modification time (a
    directory: those of the files in it); only the path for one that does not exist (yet)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        return [str(p.resolve()), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]]
    return [str(p), None]


def stage_keys(cfg: RLHFConfig, plan: dict[str, StagePlan] | None = None) -> dict[str, str]:
    """A short hash per stage of the settings its result depends on, chained through the stages: its own
    settings and, for your files and models it reads or gives in its place, their `fingerprint`."""
    plan = plan or stage_plan(cfg)
    root = Path(cfg.pipeline.output_dir).resolve()
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
    for stage, step in plan.items():
        if step.action == "given":  # your files or model (own data: each stage fingerprints what it reads)
            parts[stage] = {"given": fingerprint(step.output)}
        elif step.action == "unused":
            parts[stage] = {"unused": True}
        else:
            yours = {k: v for k, v in step.inputs.items() if not Path(v).resolve().is_relative_to(root)}
            if yours:
                parts[stage] |= {"inputs": {k: fingerprint(v) for k, v in yours.items()}}
    keys, previous = {}, ""
    for stage in STAGES:
        blob = json.dumps([previous, parts[stage]], sort_keys=True, default=str)
        keys[stage] = previous = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


# ---- your inputs, checked before any stage runs -----------------------------------------------------
def check_inputs(cfg: RLHFConfig, stages: list[str]) -> None:
    """The files and models of yours that `stages` (those about to run) read exist and hold the fields
    the stages read; a reward model you give has the policy's tokenizer (it scores the policy's token
    ids). A ConfigError / DataError naming the key, before any stage starts."""
    from rlhf_ray.models import load_tokenizer

    p, d, plan = cfg.pipeline, cfg.data, stage_plan(cfg)
    fields = {
        "demonstrations": [d.prompt_field, d.response_field],
        "preference_pairs": [d.prompt_field, d.chosen_field, d.rejected_field],
        "prompts": [d.prompt_field],
        "eval_prompts": [d.prompt_field],
    }
    models = ("base_model", "sft_model", "reward_model")
    reads = {
        "base_model": ["sft"],
        "demonstrations": ["sft"],
        "preference_pairs": ["reward_model"],
        "prompts": ["rl"],
        "eval_prompts": ["rl", "evaluate"],
        "sft_model": ["preferences", "reward_model", "rl", "evaluate"],
        "reward_model": ["rl", "evaluate"],
    }
    read = [k for k, by in reads.items() if getattr(p, k) and set(by) & set(stages)]
    if "base_model" in read and plan["sft"].action != "run":
        read.remove("base_model")  # pipeline.sft_model is given: SFT does not run
    for key in read:
        path = getattr(p, key)
        if key in models:
            require_model_dir(path, f"pipeline.{key}")
        else:
            load_records(path, fields[key])
    policy = p.sft_model or p.base_model
    if "reward_model" in read and cfg.reward.kind == "model" and policy:
        policy_key = "sft_model" if p.sft_model else "base_model"
        ours = load_tokenizer(policy, d.chat_template).get_vocab()
        theirs = load_tokenizer(p.reward_model, d.chat_template).get_vocab()
        if ours != theirs:
            differ = len(set(ours.items()) ^ set(theirs.items()))
            raise ConfigError(
                f"pipeline.reward_model={p.reward_model!r} has another tokenizer than the policy "
                f"(pipeline.{policy_key}={policy!r}): {len(theirs)} vs {len(ours)} tokens, {differ} entries "
                f"differ. The reward model scores the policy's token ids, so it must share its tokenizer: "
                f"train it from the policy's base or SFT model (leave pipeline.reward_model unset and give "
                f"pipeline.preference_pairs)"
            )


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
    """The stages a call would run: those of the plan without a record of the current settings."""
    lay, plan, keys = Layout(Path(cfg.pipeline.output_dir)), stage_plan(cfg), stage_keys(cfg)
    runs = [s for s in STAGES if plan[s].action == "run"]
    return [s for s in runs if (read_record(lay, s) or {}).get("key") != keys[s]]


def run_pipeline(cfg: RLHFConfig, inputs_checked: bool = False) -> dict[str, Any]:
    """Run (or resume) the stages of the plan, then write summary.json, report.txt and (with the held-out
    evaluation) curves.png under `pipeline.output_dir`. Returns the summary (`rlhf_ray.report`; without
    the evaluation, the stages and the RL run's figures), with the report text as `table`.
    `inputs_checked`: the caller ran `check_inputs` on the pending stages already."""
    t0 = time.perf_counter()
    lay = Layout(Path(cfg.pipeline.output_dir))
    plan = stage_plan(cfg)
    if not inputs_checked:
        check_inputs(cfg, pending_stages(cfg))
    lay.root.mkdir(parents=True, exist_ok=True)
    (lay.root / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    configs, keys = stage_configs(cfg, plan), stage_keys(cfg, plan)
    records = {
        stage: run_stage(stage, STAGE_FUNCTIONS[stage], configs[stage], lay, keys[stage])
        for stage in STAGES
        if plan[stage].action == "run"
    }

    rl_rows = read_metrics(lay.rl / "metrics.jsonl")
    given = {s: step.output for s, step in plan.items() if step.action == "given" and step.output}
    paths = {
        "summary": str(lay.root / "summary.json"),
        "plot": str(lay.root / "curves.png"),
        "report": str(lay.root / "report.txt"),
        "sft": plan["sft"].output,
        "reward_model": plan["reward_model"].output,
        "rl_policy": str(lay.rl_policy),
        "rl_metrics": str(lay.rl / "metrics.jsonl"),
    }
    wall = time.perf_counter() - t0
    if "evaluate" in records:
        summary = build_summary(
            records["evaluate"]["result"],
            records,
            rl_rows,
            cfg.pipeline.min_gold_gain,
            wall,
            paths,
            n_examples=cfg.logging.num_samples,
        )
        plot_curves(rl_rows, summary, paths["plot"])
        table = format_table(summary)
    else:
        paths["plot"] = str(lay.rl / "curves.png")  # the RL run's own curves
        summary = short_summary(records, rl_rows, wall, paths)
        table = format_short(summary)
    summary["given"] = given
    summary["plan"] = {s: step.action for s, step in plan.items()}
    if given:
        table += "\ngiven, not run: " + "; ".join(f"{s} {path}" for s, path in given.items())
    Path(paths["report"]).write_text(table + "\n")
    write_summary(summary, paths["summary"])
    return summary | {"table": table}


# ---- the report without a held-out evaluation -----------------------------------------------------
def short_summary(
    records: dict[str, dict[str, Any]], rl_rows: list[dict[str, Any]], wall: float, paths: dict[str, Any]
) -> dict[str, Any]:
    """summary.json when the plan has no evaluation stage: the stages, the RL run's and the offline
    stages' figures (`rlhf_ray.report` names), no comparison of the policies."""
    return {"verdict": None, **stage_figures(records, rl_rows, wall, paths)}


def format_short(summary: dict[str, Any]) -> str:
    t, o = summary["rl_training"], summary["offline"]
    lines = [
        "no held-out comparison of the SFT and RL policies: set pipeline.eval_prompts and run.eval_function "
        "(e.g. your reward's rule, docs/REWARDS.md) to get one",
        f"RL training: {t['steps']} steps; last steps' reward {t['reward_last']:.3f}, KL (k3) {t['kl_last']:.3f}",
    ]
    if "sft_eval_loss" in o:
        lines.append(
            f"SFT held-out loss {o.get('sft_eval_loss_initial', float('nan')):.3f} -> {o['sft_eval_loss']:.3f}"
        )
    if "reward_model_eval_accuracy" in o:
        lines.append(f"reward model held-out pair accuracy {o['reward_model_eval_accuracy']:.3f}")
    lines += ["", f"{'stage':<14}{'this call':<11}{'seconds':>9}"]
    for stage, s in summary["stages"].items():
        lines.append(f"{stage:<14}{'ran' if s['status'] == 'ran' else 'skipped*':<11}{s['seconds']:>9.1f}")
    lines.append(f"{'total':<25}{summary['seconds']['total']:>9.1f}")
    if any(s["status"] != "ran" for s in summary["stages"].values()):
        lines.append("* done in an earlier call with the same settings; its time is from then")
    lines.append(f"this call took {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
