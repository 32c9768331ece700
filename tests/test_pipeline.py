"""The four-stage pipeline job (`jobs.pipeline`): a shortened run through every stage with real Ray, real
DeepSpeed ranks and real vLLM rollouts, then a second call that must skip every finished stage, then the
run's files fed back in as your own data (pipeline.task=own); and fast checks (no Ray) of config errors,
the own-data template and plans, the resume keys and the report's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs.pipeline import main
from rlhf_ray.config import ConfigError, RLHFConfig
from rlhf_ray.data import DataError, write_jsonl
from rlhf_ray.report import build_summary, format_table, paired_gain, verdict
from rlhf_ray.trainer.pipeline import (
    STAGES,
    check_inputs,
    pending_stages,
    stage_configs,
    stage_keys,
    stage_plan,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")
OWN = str(ROOT / "jobs" / "configs" / "own_data.yaml")

# A pipeline small enough for the test suite: 1,500 demonstrations, 2 SFT epochs, 800 preference prompts,
# a few RL steps. Measured (seeded; CPU, 2 cores): SFT held-out loss 2.87 -> 0.98, greedy gold 0.478;
# 781 pairs, reward model held-out accuracy 0.577 (45 of 78 pairs; eval loss 0.700 vs 0.693 at the start:
# two epochs barely train it); RL gold +0.023 +- 0.015, reward +0.031 +- 0.028: verdict no_gain (the full
# demo, docs/DEMO.md, gives 'improved'); RL KL (k1, 48 samples) -0.015.
SHORT = [
    "pipeline.n_demos=1500",
    "pipeline.n_train_prompts=800",
    "pipeline.n_eval_prompts=48",
    "pipeline.preference_prompts=800",
    "data.eval_fraction=0.1",
    "offline.sft.epochs=2",
    "offline.reward_model.epochs=2",
    "offline.reward_model.batch_size=32",
    "offline.reward_model.lr=1.0e-3",
    "run.total_steps=6",
    "run.prompts_per_step=8",
    "algorithm.mini_batch_size=32",
    "trainer.micro_batch_size=16",
    "run.eval_interval=3",
    "run.eval_prompts=48",  # = pipeline.n_eval_prompts: the RL curve starts and ends at the report's figures
    "checkpoint.interval=0",
    "logging.progress_bar=false",
    "logging.log_interval=1",
]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pipeline_runs_every_stage_then_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_RAY_OBJECT_STORE_BYTES", str(512 * 1024**2))
    out = tmp_path / "run"
    argv = ["--config", TINY, f"pipeline.output_dir={out}", *SHORT]
    summary = main(argv)

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"summary: {out / 'summary.json'}"  # the summary path comes last
    on_disk = json.loads((out / "summary.json").read_text())
    for policy in ("sft", "rl"):
        for key in ("gold", "reward", "kl", "exact", "length", "gold_greedy", "reward_greedy"):
            assert np.isfinite(on_disk[policy][key]), (policy, key)
        assert 0.0 <= on_disk[policy]["gold"] <= 1.0
    assert set(on_disk["seconds"]) == {*STAGES, "total"}
    assert all(on_disk["stages"][s]["status"] == "ran" for s in STAGES)
    assert on_disk["seconds"]["total"] == pytest.approx(sum(on_disk["seconds"][s] for s in STAGES), abs=0.1)
    # the shortened run's reward model is weak and RL runs 6 steps: neither score rises by 3 s.e. (gold
    # +1.5 s.e., reward +1.1 s.e. measured), far from either threshold
    assert on_disk["verdict"] == "no_gain", (on_disk["gain"], on_disk["verdict_text"])
    assert on_disk["eval_prompts"] == 48
    # SFT learned the task from a random model (a random model's answers score ~0); the SFT policy's KL to
    # itself is ~0: the sampler's log-probs and the reference engine's scores line up token for token
    assert on_disk["sft"]["gold_greedy"] > 0.3, on_disk["sft"]
    assert abs(on_disk["sft"]["kl"]) < 0.02, on_disk["sft"]
    # k1 over 48 samples: noisy around a small true KL (measured -0.015; the training batches' k3: 0.005)
    assert -0.04 < on_disk["rl"]["kl"] < 0.1, on_disk["rl"]
    assert on_disk["rl_training"]["steps"] == 6
    # the report's evaluation samples the trainer's held-out prompts with its seeds: the RL curve's first
    # and last held-out gold are the SFT and RL policies' figures
    rl_rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    curve = [r["eval/gold"] for r in rl_rows if "eval/gold" in r]
    assert curve[0] == pytest.approx(on_disk["sft"]["gold"], abs=0.02), (curve, on_disk["sft"])
    assert curve[-1] == pytest.approx(on_disk["rl"]["gold"], abs=0.02), (curve, on_disk["rl"])
    print(json.dumps({k: on_disk[k] for k in ("sft", "rl", "gain", "verdict", "seconds")}, indent=1))
    # what the policies wrote: the report shows the first held-out answers of both side by side, and the RL
    # run's samples.jsonl its evaluations' answers (first held-out prompt first) and the last step's batch
    answers = json.loads((out / "stages" / "evaluate.json").read_text())["result"]
    examples = on_disk["examples"]
    assert len(examples) == 4 and "examples (the first held-out prompts" in summary["table"]
    for policy in ("sft", "rl"):
        assert [e[policy]["response"] for e in examples] == answers[policy]["sampled"]["response"][:4]
        assert [e[policy]["gold"] for e in examples] == answers[policy]["sampled"]["gold"][:4]
    samples = [json.loads(line) for line in (out / "rl" / "samples.jsonl").read_text().splitlines()]
    # (evaluations at 0, 3 and 6; the last step evaluates before it logs: its held-out answers come first)
    expected = [(0, "eval")] * 4 + [(3, "eval")] * 4 + [(6, "eval")] * 4 + [(6, "train")] * 4
    assert [(r["step"], r["split"]) for r in samples] == expected
    assert samples[0]["prompt"] == examples[0]["prompt"]

    # each stage's output is the next one's input
    pairs = [json.loads(line) for line in (out / "preferences" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) > 100 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    rm = json.loads((out / "stages" / "reward_model.json").read_text())["result"]
    # above chance (0.5, what the untrained head scores): > 0.55 is 43 or more of the 78 held-out pairs, 4
    # above chance (45 measured)
    assert rm["init"] == str(out / "sft"), rm
    assert rm["eval/accuracy_initial"] == 0.5 and rm["eval/accuracy"] > 0.55, rm
    rl_config = yaml.safe_load((out / "rl" / "config.yaml").read_text())
    assert rl_config["model"]["policy_path"] == str(out / "sft")
    assert rl_config["model"]["reward_path"] == str(out / "reward_model")
    assert rl_config["reward"]["kind"] == "model"
    assert (out / "rl" / "policy" / "config.json").is_file()
    assert (out / "curves.png").stat().st_size > 10_000
    assert summary["table"] in (out / "report.txt").read_text()

    # a second call finds every stage done: nothing is trained or written again
    weights = out / "sft" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = main(argv)
    assert all(again["stages"][s]["status"] == "skipped" for s in STAGES)
    assert again["seconds"] == on_disk["seconds"]  # the times recorded when the stages ran
    assert again["sft"] == on_disk["sft"] and again["rl"] == on_disk["rl"]
    assert weights.stat().st_mtime_ns == mtime
    assert again["wall_seconds"] < 30
    assert "skipped*" in again["table"]

    # the run's files as your own data (pipeline.task=own): its SFT policy as your SFT model (SFT skipped),
    # its pairs as your preference pairs (a reward model trains on them from your SFT model), its prompts
    own_out = tmp_path / "own"
    task = out / "task"
    own_argv = [
        "--config",
        TINY,
        *SHORT,
        f"pipeline.output_dir={own_out}",
        "pipeline.task=own",
        f"pipeline.sft_model={out / 'sft'}",
        f"pipeline.preference_pairs={out / 'preferences' / 'pairs.jsonl'}",
        f"pipeline.prompts={task / 'prompts.jsonl'}",
        f"pipeline.eval_prompts={task / 'eval_prompts.jsonl'}",
        "run.eval_function=rlhf_ray.data.synthetic:gold_reward",  # the held-out check (a labeler's, here)
        "offline.reward_model.epochs=1",
        "run.total_steps=2",
        "run.eval_interval=0",
    ]
    mine = main(own_argv)
    assert mine["plan"] == {
        "data": "given",
        "sft": "given",
        "preferences": "given",
        "reward_model": "run",
        "rl": "run",
        "evaluate": "run",
    }
    assert {s: v["status"] for s, v in mine["stages"].items()} == dict.fromkeys(
        ("reward_model", "rl", "evaluate"), "ran"
    )
    assert mine["given"]["sft"] == str(out / "sft") and f"given, not run: sft {out / 'sft'}" in mine["table"]
    assert not (own_out / "sft").exists() and not (own_out / "task").exists()
    rm = json.loads((own_out / "stages" / "reward_model.json").read_text())["result"]
    assert rm["init"] == str(out / "sft"), rm
    rl_config = yaml.safe_load((own_out / "rl" / "config.yaml").read_text())
    assert rl_config["model"]["policy_path"] == str(out / "sft")
    assert rl_config["model"]["reward_path"] == str(own_out / "reward_model")
    assert rl_config["data"]["train_path"] == str(task / "prompts.jsonl")
    # your SFT model is the reference: its KL to itself is ~0; the same held-out prompts and seeds as the
    # synthetic run's evaluation of the same SFT policy give the same gold score
    assert abs(mine["sft"]["kl"]) < 0.02 and mine["sft"]["gold"] == pytest.approx(
        on_disk["sft"]["gold"], abs=1e-6
    )
    assert mine["rl_training"]["steps"] == 2
    print(json.dumps({k: mine[k] for k in ("plan", "sft", "rl", "seconds")}, indent=1))


# ---- fast: no Ray -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pipeline.n_demo=10", "unknown config key 'pipeline.n_demo': did you mean 'pipeline.n_demos'?"),
        ("pipeline.preference_prompts=many", "pipeline.preference_prompts='many' has the wrong type"),
        ("offline.sft.epochs=0", "offline.sft.epochs=0 is out of range"),
        ("offline.reward_model.lr=-1", "offline.reward_model.lr=-1.0 is out of range"),
        ("offline.rm.epochs=1", "unknown config key 'offline.rm'"),
        ("pipeline.prompts=p.jsonl", "pipeline.prompts='p.jsonl' is read only with pipeline.task=own"),
        ("pipeline.task=own", "pipeline.prompts is not set: pipeline.task=own needs the RL prompts"),
    ],
)
def test_bad_pipeline_config_fails_clearly(override, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--config", TINY, override])
    assert message in str(exc.value.code)


def test_tiny_yaml_is_an_rl_config_too():
    cfg = RLHFConfig.from_yaml(TINY)
    assert cfg.reward.kind == "model" and cfg.offline.sft.epochs == 6
    assert cfg.algorithm.mini_batch_size == cfg.run.prompts_per_step * cfg.rollout.samples_per_prompt


def test_stage_configs_link_the_stages(tmp_path):
    cfg = RLHFConfig.from_yaml(
        TINY, [f"pipeline.output_dir={tmp_path}", "reward.kind=rule", "reward.function=m:f"]
    )
    c = stage_configs(cfg)
    assert c["sft"].model.policy_path == str(tmp_path / "task" / "model")
    assert (
        c["sft"].data.train_path == str(tmp_path / "task" / "sft.jsonl") and c["sft"].data.eval_path is None
    )
    # the reward model starts from <root>/sft (its model.reward_path), not from the yaml's reward model
    assert c["reward_model"].model.reward_path == str(tmp_path / "sft")
    assert c["reward_model"].data.train_path == str(tmp_path / "preferences" / "pairs.jsonl")
    assert c["rl"].model.policy_path == str(tmp_path / "sft")
    assert c["rl"].model.reward_path == str(tmp_path / "reward_model")
    assert c["rl"].reward.kind == "model"  # the pipeline optimises the learned reward model
    assert c["rl"].run.output_dir == str(tmp_path / "rl")
    assert c["preferences"].rollout.temperature == 1.0


def test_stage_keys_change_from_the_changed_stage_on():
    cfg = RLHFConfig.from_yaml(TINY)
    base = stage_keys(cfg)
    changed = {
        "offline.reward_model.epochs=4": "reward_model",
        "algorithm.kl_coef=0.1": "rl",
        "offline.sft.lr=1.0e-3": "sft",
        "pipeline.n_demos=100": "data",
        "pipeline.report_greedy=false": "evaluate",
    }
    for override, first in changed.items():
        keys = stage_keys(cfg.with_overrides([override]))
        i = STAGES.index(first)
        assert all(keys[s] == base[s] for s in STAGES[:i]), override
        assert all(keys[s] != base[s] for s in STAGES[i:]), override
    # settings that do not change results keep every stage
    assert stage_keys(cfg.with_overrides(["logging.progress_bar=false", "run.call_timeout_s=99"])) == base


# ---- own data (pipeline.task=own): the template, the plan, the inputs ---------------------------------
def own(tmp_path, *overrides):
    return RLHFConfig.from_yaml(OWN, [f"pipeline.output_dir={tmp_path / 'run'}", *overrides])


def actions(plan):
    return {s: step.action for s, step in plan.items()}


def test_own_data_template_loads_validates_and_plans_every_stage(tmp_path):
    """All four stages from your files: SFT from pipeline.base_model on your demonstrations, the reward model
    from the SFT policy on your pairs (nothing sampled), RL on your prompts against it."""
    cfg = own(tmp_path)
    root, p = tmp_path / "run", cfg.pipeline
    assert p.task == "own" and cfg.reward.kind == "model"
    plan = stage_plan(cfg)
    assert actions(plan) == {
        "data": "given",
        "sft": "run",
        "preferences": "given",
        "reward_model": "run",
        "rl": "run",
        "evaluate": "unused",  # the template has no run.eval_function: nothing to compare the policies with
    }
    assert plan["sft"].inputs == {"model": p.base_model, "data": p.demonstrations}
    assert plan["preferences"].output == p.preference_pairs
    assert plan["reward_model"].inputs == {"init": str(root / "sft"), "data": p.preference_pairs}
    assert plan["rl"].inputs == {
        "policy": str(root / "sft"),
        "reward_model": str(root / "reward_model"),
        "prompts": p.prompts,
        "eval_prompts": p.eval_prompts,
    }
    c = stage_configs(cfg, plan)
    assert set(c) == {"data", "sft", "reward_model", "rl"}
    assert (c["sft"].model.policy_path, c["sft"].data.train_path) == (p.base_model, p.demonstrations)
    assert c["sft"].run.output_dir == str(root)  # writes <root>/sft
    assert c["reward_model"].model.reward_path == str(root / "sft")  # where the reward model starts
    assert c["reward_model"].data.train_path == p.preference_pairs
    assert c["rl"].model.policy_path == str(root / "sft")
    assert c["rl"].model.reward_path == str(root / "reward_model")
    assert (c["rl"].data.train_path, c["rl"].data.eval_path) == (p.prompts, p.eval_prompts)
    assert c["rl"].run.eval_function is None and c["rl"].run.output_dir == str(root / "rl")
    # your data's settings reach every stage
    assert all(c[s].data.apply_chat_template and c[s].data.max_prompt_len == 512 for s in c)

    # with an eval function (e.g. your reward's rule, given each held-out record's fields) the report
    # compares the SFT and the RL policy on your held-out prompts
    plan = stage_plan(own(tmp_path, "run.eval_function=my_rewards:exact"))
    assert plan["evaluate"].action == "run"
    assert plan["evaluate"].inputs == {
        "sft": str(root / "sft"),
        "rl": str(root / "rl" / "policy"),
        "prompts": p.eval_prompts,
    }


def test_own_data_plan_with_your_sft_model(tmp_path):
    """pipeline.sft_model: SFT is skipped (base_model and demonstrations are not read); the reward model
    starts from your SFT model, which is also RL's policy and reference."""
    cfg = own(tmp_path, "pipeline.sft_model=/models/my-sft", "run.eval_function=my_rewards:exact")
    plan = stage_plan(cfg)
    assert plan["sft"].action == "given" and plan["sft"].output == "/models/my-sft"
    assert actions(plan) | {"sft": "run"} == actions(stage_plan(own(tmp_path, "run.eval_function=m:f")))
    assert plan["reward_model"].inputs == {"init": "/models/my-sft", "data": cfg.pipeline.preference_pairs}
    assert plan["rl"].inputs["policy"] == plan["evaluate"].inputs["sft"] == "/models/my-sft"
    c = stage_configs(cfg, plan)
    assert "sft" not in c
    assert c["reward_model"].model.reward_path == "/models/my-sft"
    assert c["rl"].model.policy_path == c["evaluate"].model.policy_path == "/models/my-sft"
    # nor does the config need base_model and demonstrations then
    bare = own(
        tmp_path,
        "pipeline.sft_model=/models/my-sft",
        "pipeline.base_model=null",
        "pipeline.demonstrations=null",
    )
    assert actions(stage_plan(bare)) == actions(plan) | {"evaluate": "unused"}


def test_own_data_plan_with_your_reward_model(tmp_path):
    """pipeline.reward_model: preference pairs and reward-model training are skipped; RL scores with yours."""
    cfg = own(tmp_path, "pipeline.reward_model=/models/my-rm")
    plan = stage_plan(cfg)
    assert actions(plan) == {
        "data": "given",
        "sft": "run",
        "preferences": "unused",
        "reward_model": "given",
        "rl": "run",
        "evaluate": "unused",
    }
    assert plan["rl"].inputs["reward_model"] == "/models/my-rm"
    c = stage_configs(cfg, plan)
    assert "reward_model" not in c and c["rl"].model.reward_path == "/models/my-rm"
    assert c["rl"].reward.kind == "model"
    # both given: only RL (and the report) runs
    both = stage_plan(
        own(tmp_path, "pipeline.reward_model=/models/my-rm", "pipeline.sft_model=/models/my-sft")
    )
    assert [s for s, step in both.items() if step.action == "run"] == ["rl"]


def test_own_data_plan_with_a_rule_reward_needs_no_reward_model(tmp_path):
    cfg = own(
        tmp_path,
        "reward.kind=rule",
        "reward.function=rlhf_ray.rewards_builtin:arithmetic_reward",
        "run.eval_function=rlhf_ray.rewards_builtin:arithmetic_reward",
    )
    plan = stage_plan(cfg)
    assert (plan["preferences"].action, plan["reward_model"].action) == ("unused", "unused")
    assert "reward_model" not in plan["rl"].inputs
    c = stage_configs(cfg, plan)
    assert c["rl"].reward.kind == "rule" and c["rl"].model.reward_path is None
    assert c["rl"].run.eval_function == "rlhf_ray.rewards_builtin:arithmetic_reward"
    # a learned reward with neither pairs nor a reward model: the plan says which key to set
    with pytest.raises(ConfigError, match="pipeline.preference_pairs is not set"):
        stage_plan(own(tmp_path, "pipeline.preference_pairs=null"))


def test_synthetic_plan_runs_every_stage_and_takes_a_given_sft_model(tmp_path):
    cfg = RLHFConfig.from_yaml(TINY, [f"pipeline.output_dir={tmp_path}"])
    assert set(actions(stage_plan(cfg)).values()) == {"run"}
    plan = stage_plan(cfg.with_overrides(["pipeline.sft_model=/models/sorted"]))
    assert plan["sft"].action == "given"
    assert plan["preferences"].inputs["policy"] == plan["reward_model"].inputs["init"] == "/models/sorted"


def _own_files(tmp_path):
    """Tiny own-data files (the synthetic task's prompts) and the config that reads them."""
    d = tmp_path / "data"
    write_jsonl(d / "sft.jsonl", [{"prompt": "sort 3 1", "response": "1 3"}] * 4)
    write_jsonl(d / "pairs.jsonl", [{"prompt": "sort 3 1", "chosen": "1 3", "rejected": "3 1"}] * 4)
    write_jsonl(d / "prompts.jsonl", [{"prompt": "sort 2 1", "answer": "1 2"}] * 4)
    write_jsonl(d / "eval.jsonl", [{"prompt": "sort 5 4", "answer": "4 5"}] * 2)
    return d


def _own_overrides(d, model_dir) -> list[str]:
    """The pipeline.* overrides that point a run at `_own_files`' files and `model_dir`."""
    return [
        f"pipeline.base_model={model_dir}",
        f"pipeline.demonstrations={d / 'sft.jsonl'}",
        f"pipeline.preference_pairs={d / 'pairs.jsonl'}",
        f"pipeline.prompts={d / 'prompts.jsonl'}",
        f"pipeline.eval_prompts={d / 'eval.jsonl'}",
    ]


def test_own_data_keys_follow_your_files(tmp_path, tiny_model_dir):
    """A changed file of yours re-runs the stage that reads it and those after it, not those before."""
    d = _own_files(tmp_path)
    files = _own_overrides(d, tiny_model_dir)
    cfg = own(tmp_path, *files)
    base = stage_keys(cfg)
    assert stage_keys(cfg) == base
    for name, first in (("prompts.jsonl", "rl"), ("pairs.jsonl", "preferences"), ("sft.jsonl", "sft")):
        with (d / name).open("a") as f:
            f.write('{"prompt": "sort 9 8", "response": "8 9", "chosen": "8 9", "rejected": "9 8"}\n')
        keys = stage_keys(cfg)
        i = STAGES.index(first)
        assert all(keys[s] == base[s] for s in STAGES[:i]), name
        assert all(keys[s] != base[s] for s in STAGES[i:]), name
        base = keys
    assert pending_stages(cfg) == ["sft", "reward_model", "rl"]  # nothing ran yet; no Ray needed to know


def test_own_inputs_are_checked_before_any_stage(tmp_path, tiny_model_dir):
    from rlhf_ray.models import build_word_tokenizer, tiny_model

    d = _own_files(tmp_path)
    files = _own_overrides(d, tiny_model_dir)
    cfg = own(tmp_path, *files)
    check_inputs(cfg, list(STAGES))  # all there
    with pytest.raises(DataError, match="no field 'response'"):
        check_inputs(cfg.with_overrides([f"pipeline.demonstrations={d / 'prompts.jsonl'}"]), ["sft"])
    # a stage that does not run does not read its file
    check_inputs(cfg.with_overrides([f"pipeline.demonstrations={d / 'prompts.jsonl'}"]), ["rl"])
    with pytest.raises(ConfigError, match="pipeline.base_model='/nowhere' is not a directory"):
        check_inputs(cfg.with_overrides(["pipeline.base_model=/nowhere"]), ["sft"])
    # a reward model with another tokenizer than the policy cannot score its token ids
    other = tiny_model(tmp_path / "other", build_word_tokenizer(["x", "y", "z"]), seed=0)
    with pytest.raises(ConfigError, match="pipeline.reward_model=.* has another tokenizer than the policy"):
        check_inputs(cfg.with_overrides([f"pipeline.reward_model={other}"]), ["rl"])
    check_inputs(cfg.with_overrides([f"pipeline.reward_model={tiny_model_dir}"]), ["rl"])
    # the job says so before Ray starts
    with pytest.raises(SystemExit) as exc:
        main(["--config", OWN, f"pipeline.output_dir={tmp_path / 'run'}"])
    assert "input error: pipeline.base_model='/path/to/base-model' is not a directory" in str(exc.value.code)


def _evaluation(sft_gold, rl_gold, sft_reward, rl_reward):
    def stats(gold, reward):
        n = len(gold)
        return {"sampled": {"gold": gold, "reward": reward, "kl": [0.1] * n, "length": [5] * n}}

    return {"sft": stats(sft_gold, sft_reward), "rl": stats(rl_gold, rl_reward)}


def test_verdict_tells_improvement_from_reward_hacking():
    rng = np.random.default_rng(0)
    n = 400
    sft_gold = rng.uniform(0.6, 1.0, n).tolist()
    sft_reward = rng.normal(0, 1, n).tolist()
    up = [g + 0.1 for g in sft_gold]
    hacked_reward = [r + 1.0 for r in sft_reward]
    records = {s: {"status": "ran", "seconds": 1.0} for s in STAGES}

    def judged(rl_gold, rl_reward):
        ev = _evaluation(sft_gold, rl_gold, sft_reward, rl_reward)
        return build_summary(ev, records, [], 0.02, 1.0, {})

    assert judged(up, hacked_reward)["verdict"] == "improved"
    hacked = judged([g - 0.05 for g in sft_gold], hacked_reward)
    assert hacked["verdict"] == "reward_hacking"
    assert "REWARD HACKING" in format_table(hacked)
    assert judged(sft_gold, sft_reward)["verdict"] == "no_gain"


def _shifted(before: list[float], mean: float, sd: float, seed: int) -> list[float]:
    """`before` plus per-prompt changes whose mean is exactly `mean` and sample s.d. exactly `sd`, so the
    paired standard error is exactly sd / sqrt(n)."""
    z = np.random.default_rng(seed).normal(size=len(before))
    z = (z - z.mean()) / z.std(ddof=1)
    return (np.asarray(before) + mean + sd * z).tolist()


def test_verdict_counts_a_rise_only_beyond_three_standard_errors(monkeypatch):
    # n = 100 paired prompts: s.e. = sd / 10. A +0.1 gold rise with sd 0.4 (s.e. 0.04, 3 s.e. = 0.12) is
    # within its own noise; with sd 0.3 (s.e. 0.03, 3 s.e. = 0.09) it is clear. Likewise a +0.5 reward
    # rise with sd 2.0 (3 s.e. = 0.6) versus sd 1.5 (3 s.e. = 0.45), gold unchanged.
    rng = np.random.default_rng(1)
    n = 100
    sft_gold = rng.uniform(0.3, 0.7, n).tolist()
    sft_reward = rng.normal(0, 1, n).tolist()
    records = {s: {"status": "ran", "seconds": 1.0} for s in STAGES}

    def judged(rl_gold, rl_reward):
        return build_summary(
            _evaluation(sft_gold, rl_gold, sft_reward, rl_reward), records, [], 0.02, 1.0, {}
        )

    gold_noisy = judged(_shifted(sft_gold, 0.1, 0.4, 2), sft_reward)
    assert gold_noisy["gain"]["gold"] == pytest.approx(0.1) and gold_noisy["gain"][
        "gold_se"
    ] == pytest.approx(0.04)
    assert gold_noisy["verdict"] == "no_gain", gold_noisy["verdict_text"]
    gold_clear = judged(_shifted(sft_gold, 0.1, 0.3, 2), sft_reward)
    assert gold_clear["gain"]["gold_se"] == pytest.approx(0.03)
    assert gold_clear["verdict"] == "improved", gold_clear["verdict_text"]

    reward_noisy = judged(sft_gold, _shifted(sft_reward, 0.5, 2.0, 3))
    assert reward_noisy["gain"]["reward_se"] == pytest.approx(0.2)
    assert reward_noisy["verdict"] == "no_gain", reward_noisy["verdict_text"]
    reward_clear = judged(sft_gold, _shifted(sft_reward, 0.5, 1.5, 3))
    assert reward_clear["gain"]["reward_se"] == pytest.approx(0.15)
    assert reward_clear["verdict"] == "reward_hacking", reward_clear["verdict_text"]
    # a clear reward rise with a gold rise lost in the noise is reward hacking, not an improvement
    both = judged(_shifted(sft_gold, 0.1, 0.4, 2), _shifted(sft_reward, 0.5, 1.5, 3))
    assert both["verdict"] == "reward_hacking" and "rose by only 0.100" in both["verdict_text"]

    # the threshold is what decides: at 2 s.e. the noisy rises above count, at 5 s.e. the clear ones do not
    monkeypatch.setattr("rlhf_ray.report.CLEAR_SE", 2.0)
    assert judged(_shifted(sft_gold, 0.1, 0.4, 2), sft_reward)["verdict"] == "improved"
    assert judged(sft_gold, _shifted(sft_reward, 0.5, 2.0, 3))["verdict"] == "reward_hacking"
    monkeypatch.setattr("rlhf_ray.report.CLEAR_SE", 5.0)
    assert judged(_shifted(sft_gold, 0.1, 0.3, 2), sft_reward)["verdict"] == "no_gain"
    assert judged(sft_gold, _shifted(sft_reward, 0.5, 1.5, 3))["verdict"] == "no_gain"


def test_verdict_rule_at_its_edges():
    def kind(gold, gold_se, reward=0.0, reward_se=1.0, min_gold_gain=0.02):
        gain = {"gold": gold, "gold_se": gold_se, "reward": reward, "reward_se": reward_se}
        return verdict(gain, min_gold_gain)[0]

    # strictly beyond 3 s.e. (0.375 = 3 x 0.125 exactly in binary): on the line is not clear
    assert kind(0.375, 0.125) == "no_gain" and kind(0.376, 0.125) == "improved"
    assert kind(0.0, 0.1, reward=0.375, reward_se=0.125) == "no_gain"
    assert kind(0.0, 0.1, reward=0.376, reward_se=0.125) == "reward_hacking"
    # a tiny s.e. does not make a tiny rise count: pipeline.min_gold_gain is the floor
    assert kind(0.05, 0.001, min_gold_gain=0.04) == "improved"
    assert kind(0.05, 0.001, min_gold_gain=0.06) == "no_gain"
    # a fall is never clear, however precise
    assert kind(-0.2, 0.001, reward=-1.0, reward_se=0.001) == "no_gain"


def test_verdict_with_zero_standard_error_does_not_crash():
    # every prompt moved by exactly the same amount (e.g. all answers went from wrong to right): s.e. 0
    assert paired_gain([1.0] * 4, [0.0] * 4) == (1.0, 0.0)
    kind, text = verdict({"gold": 1.0, "gold_se": 0.0, "reward": 0.0, "reward_se": 0.0}, 0.02)
    assert kind == "improved" and "+1.000" in text
    kind, text = verdict({"gold": 0.0, "gold_se": 0.0, "reward": 2.0, "reward_se": 0.0}, 0.02)
    assert kind == "reward_hacking" and "+2.000" in text


def test_report_shows_the_first_answers_of_both_policies_side_by_side():
    ev = _evaluation([0.2, 0.5, 1.0], [1.0, 0.5, 1.0], [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    ev["sft"]["sampled"] |= {"prompt": ["sort 2 1", "sort 4 3", "p2"], "response": ["2 1", "3\n4", "x"]}
    ev["rl"]["sampled"] |= {"prompt": ["sort 2 1", "sort 4 3", "p2"], "response": ["1 2", "y" * 300, "z"]}
    records = {s: {"status": "ran", "seconds": 1.0} for s in STAGES}
    summary = build_summary(ev, records, [], 0.02, 1.0, {}, n_examples=2)
    assert summary["examples"] == [
        {
            "prompt": "sort 2 1",
            "sft": {"response": "2 1", "gold": 0.2, "reward": 0.1},
            "rl": {"response": "1 2", "gold": 1.0, "reward": 0.4},
        },
        {
            "prompt": "sort 4 3",
            "sft": {"response": "3\n4", "gold": 0.5, "reward": 0.2},
            "rl": {"response": "y" * 300, "gold": 0.5, "reward": 0.5},
        },
    ]
    lines = format_table(summary).splitlines()
    at = lines.index("examples (the first held-out prompts; temperature-1 samples):")
    assert lines[at + 1 : at + 4] == [
        "  prompt: sort 2 1",
        "    SFT gold 0.20 reward +0.10 | 2 1",
        "    RL  gold 1.00 reward +0.40 | 1 2",
    ]
    assert lines[at + 5] == "    SFT gold 0.50 reward +0.20 | 3⏎4"  # one line per answer
    assert lines[at + 6] == "    RL  gold 0.50 reward +0.50 | " + "y" * 100 + "…"
    assert lines[at + 7] == ""  # then the stage times
    # an evaluation recorded before the texts were kept: no examples, the rest of the report as before
    bare = _evaluation([0.2], [1.0], [0.1], [0.4])
    old = build_summary(bare, records, [], 0.02, 1.0, {})
    assert old["examples"] == [] and "examples" not in format_table(old)
