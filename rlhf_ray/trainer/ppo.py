"""The RL stage (stage 4): the driver loop that moves object references between the role actors.

Each step: prompts -> rollout engines generate -> reference log-probs, reward scores, policy log-probs
(and critic values) in parallel from the same rollout ref -> advantages (a Ray task running
`rlhf_ray.experience`) -> PPO epochs on the policy (and critic) ranks -> weight sync to the engines ->
metrics, checkpoint, evaluation. The driver holds references and small dicts of floats, never batches.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController
from rlhf_ray.checkpoint import CheckpointManager
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data import PromptSource, load_records
from rlhf_ray.experience import RewardNormalizer
from rlhf_ray.metrics import MetricsLogger, plain, plot_metrics
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainer.roles import Roles, start_roles, wait_for
from rlhf_ray.trainer.tasks import concat_batches, eval_function_task, experience_task
from rlhf_ray.trainer.weight_sync import make_weight_sync

log = logging.getLogger(__name__)
STATE_FILE = "driver_state.json"


@dataclass
class DriverState:
    """What the driver must restore on resume besides the trainers' own checkpoints."""

    step: int = 0
    kl: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    normalizer: dict[str, float] | None = None


def kl_controller(cfg: RLHFConfig) -> FixedKLController | AdaptiveKLController:
    a = cfg.algorithm
    if a.kl_target is not None:
        return AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
    return FixedKLController(a.kl_coef)


def mean_dicts(dicts: list[dict[str, float]], prefix: str) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {f"{prefix}{k}": float(np.mean([d[k] for d in dicts if k in d])) for k in sorted(keys)}


class PPOTrainer:
    """One RL run. `fit()` trains for `run.total_steps` steps and returns the final summary."""

    def __init__(self, cfg: RLHFConfig):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.group = cfg.rollout.samples_per_prompt
        tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.policy_path, cfg.data.chat_template)
        records = load_records(cfg.data.train_path, [cfg.data.prompt_field])
        self.prompts = PromptSource(records, tokenizer, cfg.data, seed=cfg.run.seed)
        self.eval_prompts = None
        if cfg.data.eval_path and cfg.run.eval_prompts:
            eval_records = load_records(cfg.data.eval_path, [cfg.data.prompt_field])
            eval_source = PromptSource(eval_records, tokenizer, cfg.data, seed=cfg.run.seed, shuffle=False)
            self.eval_prompts = [
                ids for _, ids in eval_source.next(min(cfg.run.eval_prompts, len(eval_source)))
            ]
        self.kl_ctl = kl_controller(cfg)
        self.normalizer = RewardNormalizer() if cfg.algorithm.normalize_reward else None
        self.ckpt = CheckpointManager(
            cfg.checkpoint.dir or self.out / "checkpoints", cfg.checkpoint.keep_last, cfg.hash()
        )
        self.step = 0
        self.roles: Roles | None = None
        (self.out / "config.yaml").write_text(json.dumps(cfg.to_dict(), indent=1))

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.roles = start_roles(self.cfg)
        self.sync = make_weight_sync(self.cfg, self.roles)
        latest = self.ckpt.latest() if self.cfg.checkpoint.resume else None
        if latest is not None:
            self.restore(latest)

    def shutdown(self) -> None:
        if self.roles is not None:
            self.roles.shutdown()
            self.roles = None

    def fit(self, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train to `run.total_steps`; `on_step(step, metrics)` is called after each step is logged
        (Ray Tune reports through it). Returns paths and the last step's metrics (`final`)."""
        cfg = self.cfg
        if self.roles is None:
            self.start()
        seed_everything(cfg.run.seed + self.step)
        logger = MetricsLogger(self.out, cfg.logging, cfg.run.total_steps, start_step=self.step)
        eval_every = cfg.run.eval_interval
        last: dict[str, Any] = {}
        try:
            if self.step == 0 and self.eval_prompts:
                logger.log(0, self.evaluate())
            while self.step < cfg.run.total_steps:
                metrics = self.train_step()
                self.step += 1
                if eval_every and self.step % eval_every == 0 and self.step < cfg.run.total_steps:
                    metrics |= self.evaluate()
                if self.step == cfg.run.total_steps and self.eval_prompts:
                    metrics |= self.evaluate()
                logger.log(self.step, metrics)
                last = metrics
                if on_step is not None:
                    on_step(self.step, metrics)
                interval = cfg.checkpoint.interval
                if (interval and self.step % interval == 0) or self.step == cfg.run.total_steps:
                    self.save_checkpoint()
        finally:
            logger.close()
        policy_dir = self.out / "policy"
        self.roles.policy.save_pretrained(str(policy_dir), cfg.run.call_timeout_s)
        plot = plot_metrics(logger.path, self.out / "curves.png")
        return {
            "output_dir": str(self.out),
            "policy": str(policy_dir),
            "metrics": str(logger.path),
            "plot": str(plot),
            "step": self.step,
            "final": {k: plain(v) for k, v in last.items()},
        }

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, roles = self.cfg, self.roles
        timeout = cfg.run.call_timeout_s
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        step_seed = cfg.run.seed * 1_000_003 + self.step

        prompts = [ids for _, ids in self.prompts.next(cfg.run.prompts_per_step)]
        shards = np.array_split(np.arange(len(prompts)), len(roles.engines))
        parts = [
            e.generate.remote([prompts[i] for i in idx], self.group, seed=step_seed * 97 + k)
            for k, (e, idx) in enumerate(zip(roles.engines, shards))
            if len(idx)
        ]
        rollout = concat_batches.remote(*parts)
        wait_for({"rollout engines": rollout}, timeout, fetch=False)
        times["time/generate"] = time.perf_counter() - t0

        # Reference, reward, policy log-probs (and values) from the same rollout ref, in parallel.
        t = time.perf_counter()
        scoring = {
            "reference model": roles.reference.logprobs.remote(rollout),
            "reward model": roles.reward.score.remote(rollout),
            "policy trainer": roles.policy.compute_logprobs(rollout),
        }
        if roles.critic is not None:
            scoring["critic trainer"] = roles.critic.compute_values(rollout)
        times |= self._wait_timed(scoring, t, timeout)
        times["time/score"] = time.perf_counter() - t

        t = time.perf_counter()
        kl_coef = self.kl_ctl.value
        batch, stats_ref, norm_ref = experience_task.remote(
            rollout,
            scoring["policy trainer"],
            scoring["reference model"],
            scoring["reward model"],
            scoring.get("critic trainer"),
            cfg.algorithm,
            kl_coef,
            self.group,
            self.normalizer,
        )
        exp_stats, normalizer = wait_for({"experience": stats_ref, "normalizer": norm_ref}, timeout).values()
        self.normalizer = normalizer
        times["time/advantages"] = time.perf_counter() - t

        t = time.perf_counter()
        train = {f"policy rank {i}": r for i, r in enumerate(roles.policy.train(batch, kl_coef))}
        if roles.critic is not None:
            train |= {f"critic rank {i}": r for i, r in enumerate(roles.critic.train(batch))}
        results = wait_for(train, timeout)
        times["time/train"] = time.perf_counter() - t
        policy_stats = mean_dicts([v for k, v in results.items() if k.startswith("policy")], "policy/")
        critic_stats = mean_dicts([v for k, v in results.items() if k.startswith("critic")], "critic/")

        t = time.perf_counter()
        self.sync.sync()
        times["time/sync"] = time.perf_counter() - t

        self.kl_ctl.update(exp_stats["kl"], cfg.run.prompts_per_step * self.group)
        step_time = time.perf_counter() - t0
        phases = ("time/generate", "time/score", "time/advantages", "time/train", "time/sync")
        times["time/step"] = step_time
        times["time/overhead"] = max(step_time - sum(times[k] for k in phases), 0.0)
        return (
            exp_stats
            | policy_stats
            | critic_stats
            | times
            | {"tokens_per_s": exp_stats["tokens"] / max(times["time/generate"], 1e-9)}
            | self.prompts.stats()
        )

    def _wait_timed(self, named: dict[str, Any], start: float, timeout: float) -> dict[str, float]:
        """Wait for refs started together; each role's time is when its result became ready."""
        names = {ref: name for name, ref in named.items()}
        pending, done = list(named.values()), {}
        while pending:
            ready, pending = ray.wait(
                pending,
                num_returns=1,
                timeout=max(timeout - (time.perf_counter() - start), 0),
                fetch_local=False,
            )
            if not ready:
                wait_for({names[r]: r for r in pending}, 0.001, fetch=False)  # raises, naming the late roles
            done[names[ready[0]]] = time.perf_counter() - start
        key = {
            "reference model": "reference",
            "reward model": "reward",
            "policy trainer": "logprobs",
            "critic trainer": "critic",
        }
        return {f"time/{key[n]}": v for n, v in done.items()}

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        cfg, roles = self.cfg, self.roles
        engine = roles.engines[0]
        batch = engine.generate.remote(self.eval_prompts, 1, greedy=cfg.run.eval_greedy, seed=cfg.run.seed)
        scores = roles.reward.score.remote(batch)
        result = eval_function_task.remote(cfg.run.eval_function or "", batch, scores)
        return wait_for({"evaluation": result}, cfg.run.call_timeout_s)["evaluation"]

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        roles, timeout = self.roles, self.cfg.run.call_timeout_s

        def write(tmp: Path) -> None:
            roles.policy.save_checkpoint(str(tmp / "policy"), timeout)
            if roles.critic is not None:
                roles.critic.save_checkpoint(str(tmp / "critic"), timeout)
            state = DriverState(
                step=self.step,
                kl=self.kl_ctl.state_dict(),
                data=self.prompts.state_dict(),
                normalizer=None if self.normalizer is None else vars(self.normalizer),
            )
            (tmp / STATE_FILE).write_text(json.dumps(vars(state)))

        return self.ckpt.save(self.step, write)

    def restore(self, path: Path) -> None:
        manifest = self.ckpt.verify(path)
        roles, timeout = self.roles, self.cfg.run.call_timeout_s
        roles.policy.load_checkpoint(str(path / "policy"), timeout)
        if roles.critic is not None:
            roles.critic.load_checkpoint(str(path / "critic"), timeout)
        state = json.loads((path / STATE_FILE).read_text())
        self.step = state["step"]
        self.kl_ctl.load_state_dict(state["kl"])
        self.prompts.load_state_dict(state["data"])
        if state.get("normalizer") is not None:
            self.normalizer = RewardNormalizer(**state["normalizer"])
        self.sync.sync()  # the engines start from the initial weights; give them the restored ones
        log.info("resumed from %s (step %d)", path, manifest["step"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_ppo(cfg: RLHFConfig) -> dict[str, Any]:
    trainer = PPOTrainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()
