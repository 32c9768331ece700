"""The offline stages as their drivers run them: real Ray, real DeepSpeed (2 ranks, ZeRO-2, fp32), the
synthetic sorting task at small scale.

SFT runs once per module (the reward model and DPO start from its output). Pairs for the reward model
and DPO are cheap ones: the correct answer against a demonstration that certainly carries a slip, ordered
by the simulated labeler (so a few are flipped). Figures measured on 2 busy cores are in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.critic_trainer import CriticRank
from actors.deepspeed_rank import BatchPlan
from actors.reward_trainer import pair_view
from actors.sft_trainer import SFTRank
from rlhf_ray.batch import Batch
from rlhf_ray.config import ConfigError, OfflineStageConfig, RLHFConfig
from rlhf_ray.data import DataError, encode_preferences, load_records, write_jsonl
from rlhf_ray.data.synthetic import demonstration, gold_score, make_preference_records, target, write_task
from rlhf_ray.models import load_tokenizer, load_value_model, sequence_scores
from rlhf_ray.trainer.offline import parse_stage_flags, rank_config, stage_settings, trim_batch

N_DEMOS, N_PAIR_PROMPTS, N_EVAL_PROMPTS = 1500, 1700, 100
SFT_GOLD_MIN = 0.5  # measured greedy gold on held-out prompts after 2 epochs: see test_sft
RM_ACCURACY_MIN = 0.75  # measured held-out accuracy: see test_reward_model


def make_cfg(model_dir, out_dir, train_path, **sections) -> RLHFConfig:
    base = {
        "model": {"policy_path": str(model_dir), "dtype": "float32"},
        "data": {"train_path": str(train_path), "eval_fraction": 0.1, "max_response_len": 12},
        "trainer": {"num_ranks": 2, "zero_stage": 2, "micro_batch_size": 16, "lr": 2e-3},
        "run": {"output_dir": str(out_dir), "seed": 0},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        base[name] = base.get(name, {}) | values
    return RLHFConfig.from_dict(base)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offline-task")
    paths = write_task(
        root, seed=0, n_demos=N_DEMOS, n_train_prompts=N_PAIR_PROMPTS, n_eval_prompts=N_EVAL_PROMPTS
    )
    prompts = [r["prompt"] for r in load_records(paths["prompts"])]
    rng = np.random.default_rng(1)
    slipped = [demonstration(p, rng, slip_rate=1.0) for p in prompts]
    records = make_preference_records(prompts, [target(p) for p in prompts], slipped, seed=2)
    paths["pairs"] = write_jsonl(root / "pairs.jsonl", records)
    return paths


@pytest.fixture(scope="module")
def sft(ray_local, tiny_model_dir, task, tmp_path_factory):
    from rlhf_ray.trainer.sft import run_sft

    out = tmp_path_factory.mktemp("offline-run")
    cfg = make_cfg(tiny_model_dir, out, task["sft"])
    return {"out": out, "summary": run_sft(cfg, epochs=2, batch_size=32)}


# ---- SFT ------------------------------------------------------------------------------------------
def greedy_gold(model_dir: str, prompts: list[str]) -> float:
    """Mean gold score of greedy answers (transformers), prompts batched by length (no padding)."""
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    by_len: dict[int, list[str]] = {}
    for p in prompts:
        by_len.setdefault(len(tok(p)["input_ids"]), []).append(p)
    scores = []
    with torch.no_grad():
        for group in by_len.values():
            ids = torch.tensor([tok(p)["input_ids"] for p in group])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            answers = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            scores += [gold_score(p, a) for p, a in zip(group, answers)]
    return float(np.mean(scores))


@pytest.mark.slow
def test_sft(sft, task):
    s = sft["summary"]
    # measured: eval loss 2.84 -> 0.70 (1350 demos, 2 epochs x 43 steps), greedy gold 0.6-0.7
    assert s["eval/loss_initial"] > 2.0
    assert s["eval/loss"] < 0.5 * s["eval/loss_initial"], s
    assert s["steps"] == 2 * int(np.ceil(s["train_examples"] / 32))
    rows = [json.loads(line) for line in Path(s["metrics"]).read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/loss" in rows[0]
    assert all("train/loss" in r and "tokens_per_s" in r for r in rows[1:])
    assert Path(s["plot"]).is_file()
    model_dir = Path(s["model"])
    assert model_dir == sft["out"] / "sft"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (model_dir / "tokenizer.json").is_file()
    prompts = [r["prompt"] for r in load_records(task["eval_prompts"])]
    gold = greedy_gold(str(model_dir), prompts)
    print(f"SFT: {json.dumps(s)}\ngreedy gold on {len(prompts)} held-out prompts: {gold:.3f}")
    assert gold > SFT_GOLD_MIN


# ---- reward model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_reward_model(sft, task):
    from actors.reward import RewardModel
    from rlhf_ray.trainer.reward_model import run_reward_model

    out = sft["out"]
    cfg = make_cfg(
        out / "unused-policy-path", out, task["pairs"], data={"eval_fraction": 0.2}, trainer={"lr": 1e-3}
    )
    s = run_reward_model(cfg, epochs=1, batch_size=32)
    print(f"RM: {json.dumps(s)}")
    assert s["init"] == str(out / "sft")  # no model.reward_path: the run's SFT model
    assert s["eval/accuracy_initial"] == pytest.approx(0.5)  # zero head: every pair a tie
    assert s["eval/accuracy"] > RM_ACCURACY_MIN, s
    assert s["eval/loss"] < s["eval/loss_initial"]

    # the saved directory is a reward model: it loads, and ranks held-out pairs like the trainer did
    model_dir = s["model"]
    assert model_dir == str(out / "reward_model")
    model = load_value_model(model_dir, trainable=False)
    tok = load_tokenizer(model_dir)
    pairs = encode_preferences(load_records(task["pairs"]).select(range(64)), tok, cfg.data)
    with torch.no_grad():
        chosen = sequence_scores(model, pairs["chosen_input_ids"], pairs["chosen_attention_mask"])
        rejected = sequence_scores(model, pairs["rejected_input_ids"], pairs["rejected_attention_mask"])
    assert (chosen > rejected).float().mean() > RM_ACCURACY_MIN

    # ... and serves the reward role (reward.kind='model')
    serve_cfg = cfg.with_overrides([f"model.reward_path={model_dir}", "reward.kind=model"])
    actor = RewardModel.options(num_cpus=1).remote(serve_cfg)
    try:
        batch = Batch(
            {k.removeprefix("chosen_"): v for k, v in pairs.tensors.items() if k.startswith("chosen_")}
        )
        served = ray.get(actor.score.remote(batch), timeout=120)["scores"]
    finally:
        ray.kill(actor)
    assert torch.allclose(served, chosen, atol=1e-5)


# ---- DPO ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dpo_raises_margin_on_training_pairs(sft, task, tmp_path):
    from rlhf_ray.trainer.dpo import run_dpo

    pairs = write_jsonl(tmp_path / "dpo_pairs.jsonl", load_records(task["pairs"]).select(range(256)))
    cfg = make_cfg(
        sft["out"] / "sft", tmp_path / "dpo-run", pairs, data={"eval_path": str(pairs)}, trainer={"lr": 1e-4}
    )
    s = run_dpo(cfg, epochs=1, batch_size=32, beta=0.1)
    print(f"DPO: {json.dumps(s)}")
    assert s["steps"] == 8
    assert s["eval/rewards/margin_initial"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert s["eval/rewards/margin"] > 0.1, s
    assert s["eval/rewards/accuracy"] > 0.7, s
    assert s["eval/loss"] < s["eval/loss_initial"]
    saved = AutoModelForCausalLM.from_pretrained(s["model"])
    assert saved.config.architectures == ["LlamaForCausalLM"]


# ---- fast checks: no Ray ---------------------------------------------------------------------------
def test_missing_field_fails_before_any_actor(tiny_model_dir, task, tmp_path):
    from rlhf_ray.trainer.dpo import run_dpo
    from rlhf_ray.trainer.sft import run_sft

    cfg = make_cfg(tiny_model_dir, tmp_path, task["sft"])  # prompt/response: no chosen/rejected
    with pytest.raises(DataError, match="'chosen'"):
        run_dpo(cfg)
    with pytest.raises(DataError, match="'answer'"):
        run_sft(cfg.with_overrides(["data.response_field=answer"]))
    with pytest.raises(ConfigError, match="model.policy_path"):
        run_sft(cfg.with_overrides([f"model.policy_path={tmp_path / 'nowhere'}"]))


def test_stage_settings_precedence_and_validation(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, tmp_path / "x.jsonl")
    s = stage_settings(cfg, "dpo", epochs=3, lr=None)
    assert (s.epochs, s.batch_size, s.lr, s.beta, s.loss_type) == (3, 32, None, 0.1, "sigmoid")
    with pytest.raises(ConfigError, match=r"offline\.sft\.batch_size=0"):
        stage_settings(cfg, "sft", batch_size=0)
    with pytest.raises(ConfigError, match="loss_type"):
        stage_settings(cfg, "dpo", loss_type="hinge")
    flags, rest = parse_stage_flags(
        ["--config", "c.yaml", "--epochs", "2", "trainer.lr=1e-3", "--beta=0.2"], dpo=True
    )
    assert flags == {"epochs": 2, "batch_size": None, "lr": None, "beta": 0.2, "loss_type": None}
    assert rest == ["--config", "c.yaml", "trainer.lr=1e-3"]


def test_offline_ranks_plan_their_batches_from_the_stage(tiny_model_dir, tmp_path):
    """The SFT ranks take one optimiser step per `offline.sft.batch_size` sequences (or the job's flag) at
    the stage's lr, whatever PPO's `algorithm` section says; the RL ranks keep the algorithm's plan."""
    cfg = make_cfg(
        tiny_model_dir,
        tmp_path,
        tmp_path / "x.jsonl",
        algorithm={"mini_batch_size": 16, "ppo_epochs": 3},
        offline={"sft": {"batch_size": 8, "lr": 5e-4}},
    )
    settings = stage_settings(cfg, "sft")
    assert isinstance(settings, OfflineStageConfig)
    assert settings == cfg.offline.sft
    ranks_cfg = rank_config(cfg, "sft", settings)  # what run_sft starts the ranks with
    assert SFTRank.batch_plan(ranks_cfg) == BatchPlan(mini_batch_size=8, epochs=1)
    assert ranks_cfg.algorithm == cfg.algorithm and ranks_cfg.trainer == cfg.trainer
    flagged = rank_config(cfg, "sft", stage_settings(cfg, "sft", batch_size=4, lr=None))
    assert SFTRank.batch_plan(flagged) == BatchPlan(mini_batch_size=4, epochs=1)
    assert flagged.offline.sft.lr == 5e-4  # a flag left out (None) keeps the config's value
    assert CriticRank.batch_plan(ranks_cfg) == BatchPlan(mini_batch_size=16, epochs=3)


def test_pair_view_weighs_each_pair_once(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    records = [
        {"prompt": "sort: 3 1 2 =", "chosen": "1 2 3", "rejected": "1 3 2 2 2"},
        {"prompt": "sort: 5 4 =", "chosen": "4 5", "rejected": "5"},
    ]
    batch = encode_preferences(records, tok, RLHFConfig().data)
    view = pair_view(batch)
    assert view["response_mask"].sum(1).tolist() == [1.0, 1.0]
    assert view["attention_mask"].sum(1).tolist() == [11, 7]  # the longer side of each pair
    assert trim_batch(view.select([1])).seq_len == 7
    assert torch.equal(trim_batch(batch)["chosen_input_ids"], batch["chosen_input_ids"])
