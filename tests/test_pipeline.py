"""The four-stage pipeline job (`jobs.pipeline`): a shortened run through every stage with real Ray, real
DeepSpeed ranks and real vLLM rollouts, then a second call that must skip every finished stage; and fast
checks (no Ray) of config errors, the resume keys and the report's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs.pipeline import main
from rlhf_ray.config import RLHFConfig
from rlhf_ray.report import build_summary, format_table, verdict
from rlhf_ray.trainer.pipeline import STAGES, stage_configs, stage_keys

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "jobs" / "configs" / "tiny.yaml")

# A pipeline small enough for the test suite: 1,500 demonstrations, 2 SFT epochs (greedy gold ~0.6), 800
# preference prompts, a few RL steps.
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
@pytest.mark.timeout(900)
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
    assert on_disk["verdict"] in ("improved", "reward_hacking", "no_gain")
    assert on_disk["eval_prompts"] == 48
    # SFT learned the task from a random model (a random model's answers score ~0); the SFT policy's KL to
    # itself is ~0: the sampler's log-probs and the reference engine's scores line up token for token
    assert on_disk["sft"]["gold_greedy"] > 0.3, on_disk["sft"]
    assert abs(on_disk["sft"]["kl"]) < 0.02, on_disk["sft"]
    assert on_disk["rl"]["kl"] > -0.05  # k1 over 48 samples: noisy around a small KL
    assert on_disk["rl_training"]["steps"] == 6
    # the report's evaluation samples the trainer's held-out prompts with its seeds: the RL curve's first
    # and last held-out gold are the SFT and RL policies' figures
    rl_rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    curve = [r["eval/gold"] for r in rl_rows if "eval/gold" in r]
    assert curve[0] == pytest.approx(on_disk["sft"]["gold"], abs=0.02), (curve, on_disk["sft"])
    assert curve[-1] == pytest.approx(on_disk["rl"]["gold"], abs=0.02), (curve, on_disk["rl"])
    print(json.dumps({k: on_disk[k] for k in ("sft", "rl", "gain", "verdict", "seconds")}, indent=1))

    # each stage's output is the next one's input
    pairs = [json.loads(line) for line in (out / "preferences" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) > 100 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    rm = json.loads((out / "stages" / "reward_model.json").read_text())["result"]
    assert rm["init"] == str(out / "sft") and rm["eval/accuracy"] > 0.5, rm
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


# ---- fast: no Ray -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pipeline.n_demo=10", "unknown config key 'pipeline.n_demo': did you mean 'pipeline.n_demos'?"),
        ("pipeline.preference_prompts=many", "pipeline.preference_prompts='many' has the wrong type"),
        ("offline.sft.epochs=0", "offline.sft.epochs=0 is out of range"),
        ("offline.reward_model.lr=-1", "offline.reward_model.lr=-1.0 is out of range"),
        ("offline.rm.epochs=1", "unknown config key 'offline.rm'"),
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
    assert c["reward_model"].model.reward_path is None  # starts from <root>/sft, not the yaml's reward model
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
    # a gold rise within the noise is not an improvement
    noisy = (np.array(sft_gold) + rng.normal(0.0, 0.3, n)).tolist()
    assert verdict({"gold": 0.01, "gold_se": 0.015, "reward": 0.0, "reward_se": 0.1}, 0.02)[0] == "no_gain"
    assert judged(noisy, sft_reward)["gain"]["gold_se"] > 0.01
