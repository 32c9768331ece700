"""RL settings that only their config was tested for, each shown doing what it says in a real run (Ray
actors, vLLM engines, DeepSpeed ranks, the tiny model):

- classic PPO: several epochs over mini-batches smaller than the batch (GAE, ZeRO-2, 2 ranks), so the
  importance ratio leaves 1 and clipping acts;
- one run that combines the options that do not interact: ZeRO-3 with the broadcast transport to two
  vLLM engines, optimizer offload, gradient checkpointing, warm-up, an entropy bonus, reward
  normalisation and top-p sampling.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.data.synthetic import write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import PPOTrainer
from tests.test_ppo_e2e import tiny_rl_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=400, n_eval_prompts=16
    )


def step_rows(out) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "time/step" in r]


@pytest.mark.timeout(900)
def test_multi_epoch_ppo_moves_the_ratio_and_clips(ray_local, tiny_model_dir, task, tmp_path):
    """ppo_epochs=2 over mini-batches of 16 of a 32-sequence batch: 4 optimiser steps per batch. The old
    log-probs are scored once before the update (time/logprobs) and kept, so later mini-batches see a
    ratio away from 1 and some tokens are clipped; each update stays close to the policy it started from
    (approx_kl) and the reward still rises."""
    out = tmp_path / "run"
    cfg = tiny_rl_config(
        tiny_model_dir,
        task,
        out,
        algorithm={"estimator": "gae", "kl_coef": 0.05, "mini_batch_size": 16, "ppo_epochs": 2},
        trainer={"num_ranks": 2, "zero_stage": 2, "lr": 1e-3, "critic_lr": 2e-3, "micro_batch_size": 8},
        run={"total_steps": STEPS_MULTI_EPOCH, "eval_prompts": 0},
    )
    trainer = PPOTrainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    rows = step_rows(out)
    assert len(rows) == STEPS_MULTI_EPOCH
    assert all("time/logprobs" in r for r in rows)  # a scoring pass made the old log-probs
    ratio_max = [r["policy/ratio_max"] for r in rows]
    ratio_min = [r["policy/ratio_min"] for r in rows]
    clip = [r["policy/clip_frac"] for r in rows]
    kl = [r["kl"] for r in rows]
    rewards = [r["reward/mean"] for r in rows]
    first, last = float(np.mean(rewards[:4])), float(np.mean(rewards[-4:]))
    print(
        f"multi-epoch PPO: ratio in [{min(ratio_min):.3f}, {max(ratio_max):.3f}], clip_frac mean "
        f"{np.mean(clip):.4f} max {max(clip):.4f}, kl max {max(kl):.4f}, approx_kl max "
        f"{max(r['policy/approx_kl'] for r in rows):.4f}, reward {first:.3f} -> {last:.3f}"
    )
    assert max(ratio_max) > 1.05 and min(ratio_min) < 0.95  # the policy moved within one batch
    assert max(clip) > 0.0 and sum(c > 0 for c in clip) >= len(clip) // 2  # clipping acts, not once
    # the clipped updates stay in a trust region: the k3 KL(old || new) of one update stays small (measured
    # max 0.07, at the first step); the KL to the reference grows as the policy learns, and stays finite
    approx_kl = [r["policy/approx_kl"] for r in rows]
    assert max(approx_kl) < 0.15 and all(math.isfinite(k) for k in kl)
    assert last > first + 0.05, (first, last)


STEPS_MULTI_EPOCH = 12
STEPS_OPTIONS = 4
WARMUP = 3
LR = 2e-3
TOP_P = 0.5


def on_rank0(trainer: PPOTrainer, fn):
    return ray.get(trainer.roles.policy.group.actors[0].__ray_call__.remote(fn), timeout=120)


@pytest.mark.timeout(900)
def test_options_take_effect_in_one_run(ray_local, tiny_model_dir, task, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_rl_config(
        tiny_model_dir,
        task,
        out,
        rollout={"num_engines": 2, "weight_sync": "broadcast", "top_p": TOP_P},
        algorithm={"estimator": "grpo", "mini_batch_size": 32, "entropy_coef": 0.5, "normalize_reward": True},
        trainer={
            "num_ranks": 2,
            "zero_stage": 3,
            "lr": LR,
            "micro_batch_size": 16,
            "warmup_steps": WARMUP,
            "gradient_checkpointing": True,
            "offload_optimizer": True,
        },
        run={"total_steps": STEPS_OPTIONS, "eval_prompts": 0},
    )
    trainer = PPOTrainer(cfg)
    try:
        trainer.fit()
        engines = ray.get([e.stats.remote() for e in trainer.roles.engines], timeout=120)
        checkpointing = on_rank0(trainer, lambda rank: rank.engine.module.is_gradient_checkpointing)
        offload = on_rank0(trainer, lambda rank: bool(rank.engine.zero_offload_optimizer()))
        stage = on_rank0(trainer, lambda rank: rank.engine.zero_optimization_stage())
        # top-p: the trained policy's samples, scored below against its full distribution
        prompts = [ids for _, ids in trainer.prompts.next(16)]
        sample = ray.get(trainer.roles.engines[0].generate.remote(prompts, 4, seed=11), timeout=300)
        # what each engine holds after the last sync: its log-probs of the sample (raw, temperature 1)
        held = ray.get([e.logprobs.remote(sample) for e in trainer.roles.engines], timeout=300)
    finally:
        trainer.shutdown()
    rows = step_rows(out)
    assert len(rows) == STEPS_OPTIONS

    # ZeRO-3 + broadcast to two vLLM engines: both engines sample, every sync reaches both, and after the
    # last one both hold the trained policy (their log-probs equal those of the saved policy, which moved
    # away from the initial model). With top-p the sampler's own log-probs are those of the truncated
    # distribution, so `rollout_vs_trainer_logprob_diff` is no sync check here.
    assert stage == 3 and checkpointing is True and offload is True
    assert all(e["num_sequences"] > 0 for e in engines), engines
    assert all(e["num_weight_updates"] >= STEPS_OPTIONS for e in engines), engines
    mask = sample["response_mask"] > 0
    trained = AutoModelForCausalLM.from_pretrained(out / "policy", torch_dtype=torch.float32).eval()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    final_lp = token_logprobs(trained, sample)
    for lp in held:
        assert (lp - final_lp)[mask].abs().max().item() < 1e-3
    assert (token_logprobs(initial, sample) - final_lp)[mask].abs().max().item() > 1e-2

    # warm-up: the learning rate of step k is lr * min(1, k / warmup_steps)
    lrs = [r["policy/lr"] for r in rows]
    assert lrs == pytest.approx([LR * min(1.0, k / WARMUP) for k in range(1, STEPS_OPTIONS + 1)], rel=1e-6)

    # the entropy bonus is part of the loss (entropy_coef * mean token entropy). Whether it raises the
    # entropy cannot be shown here: the random tiny model starts at the maximum (about log of its vocab)
    for r in rows:
        assert r["policy/entropy_bonus"] == pytest.approx(0.5 * r["policy/entropy"], rel=1e-6)
    print(f"entropy with entropy_coef=0.5: {[round(r['policy/entropy'], 4) for r in rows]}")

    # reward normalisation: the running statistics saved with the run saw every score of every step
    state_file = max(out.glob("checkpoints/step-*/driver_state.json"))  # the final checkpoint's
    norm = json.loads(state_file.read_text())["normalizer"]
    assert norm["count"] == STEPS_OPTIONS * 32
    assert norm["mean"] == pytest.approx(np.mean([r["reward/mean"] for r in rows]), rel=1e-6)

    # top-p: every sampled token lies in the nucleus of the policy's distribution (the smallest set of most
    # likely tokens whose probability reaches top_p), while a plain sample would often leave it
    with torch.no_grad():
        logits = trained(sample["input_ids"], attention_mask=sample["attention_mask"]).logits.float()
    probs = torch.softmax(logits[:, :-1], dim=-1)  # position t-1 predicts token t
    tokens = sample["input_ids"][:, 1:]
    mask = sample["response_mask"][:, 1:] > 0
    p_token = probs.gather(-1, tokens[..., None]).squeeze(-1)
    mass_above = (probs * (probs > p_token[..., None])).sum(-1)  # of the tokens more likely than it
    outside = (mass_above >= TOP_P + 1e-3) & mask
    expected_outside = ((1 - nucleus_mass(probs, TOP_P)) * mask).sum().item()  # for a plain sample
    print(
        f"top-p {TOP_P}: {int(mask.sum())} tokens, {int(outside.sum())} outside the nucleus "
        f"(a plain sample would leave it ~{expected_outside:.0f} times)"
    )
    assert int(mask.sum()) > 100 and expected_outside > 10
    assert int(outside.sum()) == 0


def token_logprobs(model, batch) -> torch.Tensor:
    """log p(token t | < t) at temperature 1, `[B, T]` aligned with input_ids (position 0 holds 0)."""
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(lp, (1, 0))


def nucleus_mass(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The probability of the top-p nucleus at every position."""
    sorted_p, _ = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    return (sorted_p * (before < top_p)).sum(-1)
