"""Same seed, same config, CPU: two RL runs produce identical metrics (every key that is not a timing),
step by step, evaluation included. Sampling seeds are per step and per sample, the prompt order is
drawn from (seed, epoch), trainer ranks shuffle from (seed, call) and gloo reduces in a fixed order."""

from __future__ import annotations

import pytest

from rlhf_ray.data.synthetic import write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import PPOTrainer
from tests.test_ppo_e2e import tiny_rl_config

pytestmark = pytest.mark.slow
TIMING = ("time/", "tokens_per_s")
STEPS = 3


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=200, n_eval_prompts=8
    )


def run(model_dir, task, out) -> list[dict]:
    cfg = tiny_rl_config(
        model_dir,
        task,
        out,
        run={"total_steps": STEPS, "eval_prompts": 8, "seed": 3},
        checkpoint={"interval": 0},
    )
    trainer = PPOTrainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.timeout(600)
def test_same_seed_same_metrics(ray_local, tiny_model_dir, task, tmp_path):
    a = run(tiny_model_dir, task, tmp_path / "a")
    b = run(tiny_model_dir, task, tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(STEPS + 1))  # step 0: evaluation
    for ra, rb in zip(a, b):
        keys = sorted(k for k in ra if not k.startswith(TIMING))
        assert keys == sorted(k for k in rb if not k.startswith(TIMING))
        differing = {k: (ra[k], rb[k]) for k in keys if ra[k] != rb[k]}
        assert not differing, f"step {ra['step']}: {differing}"
    # The numbers are real: they change from step to step as the policy trains.
    steps = [r for r in a if r["step"] > 0]
    assert len({r["reward/mean"] for r in steps}) == STEPS
    assert len({r["policy/policy_loss"] for r in steps}) == STEPS
    assert "eval/gold" in a[-1] and "rollout_vs_trainer_logprob_diff" in a[-1]
