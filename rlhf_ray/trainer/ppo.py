"""The RL stage (stage 4): the driver loop that moves object references between the role actors.

Each step: prompts -> rollout engines generate -> reference log-probs, reward scores, policy log-probs
(and critic values) in parallel from the same rollout ref -> advantages (`rlhf_ray.experience`, on the
glue worker) -> PPO epochs on the policy (and critic) ranks -> weight sync to the engines -> metrics,
checkpoint, evaluation. The driver holds references and small dicts of floats, never batches.

Runs on the driver.
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
import torch
import yaml

from actors import role_id
from actors.glue import glue, reset_glue
from actors.role_id import RoleId, RoleKind
from actors.worker_group import combine_rank_stats
from rlhf_ray.algorithms import AdaptiveKLController, FixedKLController
from rlhf_ray.checkpoint import CheckpointManager, checkpoint_due, writable_dir
from rlhf_ray.config import RLHFConfig
from rlhf_ray.data import DataError, PromptSource, load_records
from rlhf_ray.engine_args import engines_sleep
from rlhf_ray.experience import OldLogprobs, RewardNormalizer, old_logprobs_source
from rlhf_ray.metrics import MetricsLogger, plain, plot_metrics
from rlhf_ray.models import load_tokenizer
from rlhf_ray.samples import sample_due
from rlhf_ray.trainer.evaluation import held_out_records, sample_held_out
from rlhf_ray.trainer.gpu_sharing import GpuSharing
from rlhf_ray.trainer.offline import require_model_dir
from rlhf_ray.trainer.recovery import STEP_PHASES, Recovery, RecoveryError, RolledBack, drop_rows_after
from rlhf_ray.trainer.roles import Roles, restart, start_roles, wait_for
from rlhf_ray.trainer.scoring import join_slices, role_times, score_in_slices, score_joined
from rlhf_ray.trainer.weight_sync import make_weight_sync

__all__ = ["DriverState", "PPOTrainer", "RecoveryError", "check_inputs", "run_ppo"]
log = logging.getLogger(__name__)
STATE_FILE = "driver_state.json"
# the metric `time/<name>` of each scoring role: seconds from the rollout until its answer was ready (a
# group of reference or reward actors: until its last actor's was)
SCORE_TIMES = {
    RoleKind.REFERENCE: "reference",
    RoleKind.REWARD: "reward",
    RoleKind.POLICY: "logprobs",
    RoleKind.CRITIC: "critic",
}


@dataclass
class DriverState:
    """What the driver must restore on resume besides the trainers' own checkpoints."""

    step: int = 0
    kl: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    normalizer: dict[str, float] | None = None


def check_inputs(cfg: RLHFConfig) -> None:
    """The paths an RL run reads exist, and the engines can sleep if asked to: a `ConfigError`/`DataError`
    naming the key, before any actor."""
    require_model_dir(cfg.model.policy_path, "model.policy_path")
    for key in ("tokenizer_path", "critic_path"):
        if getattr(cfg.model, key):
            require_model_dir(getattr(cfg.model, key), f"model.{key}")
    if cfg.reward.kind == "model":
        require_model_dir(cfg.model.reward_path, "model.reward_path (reward.kind='model')")
    if not cfg.data.train_path:
        raise DataError(
            f"data.train_path is not set: give a JSONL/Parquet file of prompts (field {cfg.data.prompt_field!r})"
        )
    engines_sleep(cfg)  # rollout.sleep=true for engines without GPUs: a ConfigError now, not in the actor


def kl_controller(cfg: RLHFConfig) -> FixedKLController | AdaptiveKLController:
    a = cfg.algorithm
    if a.kl_target is not None:
        return AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
    return FixedKLController(a.kl_coef)


class PPOTrainer:
    """One RL run. `fit()` trains for `run.total_steps` steps and returns the final summary."""

    def __init__(self, cfg: RLHFConfig):
        self.cfg = cfg
        # Everything that can be checked without actors is checked here, before any actor starts.
        check_inputs(cfg)
        self.out = writable_dir(cfg.run.output_dir, "run.output_dir")
        ckpt_dir = writable_dir(cfg.checkpoint.dir or self.out / "checkpoints", "checkpoint.dir")
        self.group = cfg.rollout.samples_per_prompt
        self.old_logprobs = old_logprobs_source(cfg)  # whether each step scores them before the update
        tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.policy_path, cfg.data.chat_template)
        records = load_records(cfg.data.train_path, [cfg.data.prompt_field])
        self.prompts = PromptSource(records, tokenizer, cfg.data, seed=cfg.run.seed)
        self.eval_prompts, self.eval_fields = None, None  # token ids; record fields for the reward
        if cfg.data.eval_path and cfg.run.eval_prompts:
            self.eval_prompts, self.eval_fields = held_out_records(cfg, cfg.run.eval_prompts)
        self.ckpt = CheckpointManager(
            ckpt_dir, cfg.checkpoint.keep_last, cfg.hash(), identity=cfg.checkpoint_identity()
        )
        latest = self.ckpt.latest()
        if latest is not None and cfg.checkpoint.resume:
            self.ckpt.verify(latest, check_files=False)  # a checkpoint of another model/config: refuse now
        elif latest is not None:
            log.warning(
                "%s already holds checkpoints (newest %s) and checkpoint.resume=false: this run starts over "
                "beside them; give it its own run.output_dir to keep runs apart",
                self.ckpt.dir,
                latest.name,
            )
        self.last_checkpoint: Path | None = None  # the newest this run wrote or resumed from
        self._saved_at = time.monotonic()  # the last save or restore (or the start): checkpoint_due's clock
        self._initial_data = self.prompts.state_dict()
        self.reset_driver_state()
        # every part of a step runs through it; it may call `resync` and `rewind` (`Recoverable`)
        self.recovery = Recovery(self)
        self._logger: MetricsLogger | None = None
        self._samples: Any = None  # ref of this step's sample rows (`pick_samples`) when it writes them
        self.roles: Roles | None = None
        # the resolved config, loadable again with --config (secrets never enter it: they come from the env)
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.roles = start_roles(self.cfg)
        wait_for({"glue worker": glue().ping.remote()}, self.cfg.run.call_timeout_s)  # up before step 1
        self.sync = make_weight_sync(self.cfg, self.roles)
        cfg = self.cfg
        sleep = engines_sleep(cfg)
        self.sharing = GpuSharing(
            self.roles,
            sleep=sleep,
            offload=cfg.trainer.offload_during_rollout,
            timeout_s=cfg.run.call_timeout_s,
            asleep=sleep,  # start_roles put them to sleep before the trainer started
        )
        latest = self.ckpt.latest() if self.cfg.checkpoint.resume else None
        if latest is not None:
            self.restore(latest)
            # a run that died after its last checkpoint logged steps that are now done again
            for name in ("metrics.jsonl", "samples.jsonl"):
                dropped = drop_rows_after(self.out / name, self.step)
                if dropped:
                    log.warning(
                        "%s: dropped %d rows after step %d (they are done again)", name, dropped, self.step
                    )

    def reset_driver_state(self) -> None:
        """The driver's side of a fresh run: step 0, the first data position, a new KL controller and
        reward normaliser (the trainers' side is their initial weights)."""
        self.step = 0
        self.prompts.load_state_dict(self._initial_data)
        self.kl_ctl = kl_controller(self.cfg)
        self.normalizer = RewardNormalizer() if self.cfg.algorithm.normalize_reward else None

    def shutdown(self) -> None:
        reset_glue()
        if self.roles is not None:
            self.roles.shutdown()
            self.roles = None

    def fit(self, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train to `run.total_steps`; `on_step(step, metrics)` is called after each step is logged
        (Ray Tune reports through it). Returns paths and the last step's metrics (`final`).

        A dead or hung actor does not end the run: see `_recover` (at most `run.max_restarts` times)."""
        cfg = self.cfg
        if self.roles is None:
            self.start()
        seed_everything(cfg.run.seed + self.step)
        # at step 0 (not resumed) an earlier run's metrics.jsonl, samples.jsonl, tensorboard/ are moved aside
        self._logger = MetricsLogger(
            self.out, cfg.logging, cfg.run.total_steps, start_step=self.step, new_run=self.step == 0
        )
        self._last: dict[str, Any] = {}
        policy_dir = self.out / "policy"
        evaluated = self.step > 0 or not self.eval_prompts  # the step-0 evaluation, once
        self._saved_at = time.monotonic()  # the minutes since a save count from here (the roles are up)
        try:
            while True:
                try:
                    if not evaluated:
                        self._logger.log(0, self.recovery.attempt(self.evaluate, "evaluation"))
                        evaluated = True
                    while self.step < cfg.run.total_steps:
                        self._one_step(on_step)
                    self.recovery.attempt(
                        lambda: self.roles.policy.save_pretrained(str(policy_dir), cfg.run.call_timeout_s),
                        "saving the policy",
                    )
                    break
                except RolledBack:
                    continue
        finally:
            self._logger.close()
        plot = plot_metrics(self._logger.path, self.out / "curves.png")
        return {
            "output_dir": str(self.out),
            "policy": str(policy_dir),
            "metrics": str(self._logger.path),
            "plot": str(plot),
            "step": self.step,
            "restarts": self.recovery.restarts,
            "final": {k: plain(v) for k, v in self._last.items()},
        }

    def _one_step(self, on_step: Callable[[int, dict[str, Any]], None] | None) -> None:
        cfg = self.cfg
        metrics = self.train_step()
        self.step += 1
        eval_every = cfg.run.eval_interval
        final = self.step == cfg.run.total_steps
        if self.eval_prompts and ((eval_every and self.step % eval_every == 0) or final):
            metrics |= self.recovery.attempt(self.evaluate, "evaluation")
        metrics["faults/restarts"] = self.recovery.restarts
        self._logger.log(self.step, metrics)
        if self._samples is not None:
            self.log_samples(self._samples, "train")
        self._last = metrics
        if on_step is not None:
            on_step(self.step, metrics)
        ckpt = cfg.checkpoint
        minutes = (time.monotonic() - self._saved_at) / 60
        if checkpoint_due(self.step, cfg.run.total_steps, ckpt.interval, ckpt.interval_minutes, minutes):
            self.recovery.attempt(self.save_checkpoint, "checkpoint")

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One RL step in three parts, each run through `Recovery.attempt`: the experience (after a recovery it is
        made again from the same prompts and seeds), the update (a failure there rolls back to the last
        checkpoint), the weight sync (made again)."""
        t0 = time.perf_counter()
        data, normalizer, kl_coef = self.prompts.state_dict(), self.normalizer, self.kl_ctl.value

        def again() -> None:
            self.prompts.load_state_dict(data)
            self.normalizer = normalizer

        batch, exp_stats, times = self.recovery.attempt(
            lambda: self.make_experience(kl_coef), "experience", again
        )
        # a few rows a person can read, picked on the glue worker while the policy trains
        self._samples = (
            self.pick_samples(batch)
            if sample_due(self.step + 1, self.cfg.logging.sample_interval, self.cfg.run.total_steps)
            else None
        )
        train_stats, times["time/train"] = self.recovery.attempt(
            lambda: self.update(batch, kl_coef), "training"
        )
        # without a scoring pass, the update's own forward compared the sampler's log-probs with the trainer's
        gap = train_stats.pop("policy/rollout_vs_trainer_logprob_diff", None)
        if gap is not None:
            exp_stats["rollout_vs_trainer_logprob_diff"] = gap
        t = time.perf_counter()
        self.recovery.attempt(self.sync_weights, "weight sync")
        times["time/sync"] = time.perf_counter() - t

        self.kl_ctl.update(exp_stats["kl"], self.cfg.run.prompts_per_step * self.group)
        step_time = time.perf_counter() - t0
        phases = ("time/generate", "time/score", "time/advantages", "time/train", "time/sync")
        times["time/step"] = step_time
        times["time/overhead"] = max(step_time - sum(times[k] for k in phases), 0.0)
        return (
            exp_stats
            | train_stats
            | times
            | {"tokens_per_s": exp_stats["tokens"] / max(times["time/generate"], 1e-9)}
            | self.prompts.stats()
        )

    def make_experience(self, kl_coef: float) -> tuple[Any, dict[str, float], dict[str, float]]:
        """Generate, score (reference, reward, policy log-probs unless the update makes its own, values: in
        parallel from the same rollout ref) and compute advantages. Returns the batch's ref, its stats and the phases' times."""
        cfg, roles = self.cfg, self.roles
        timeout = cfg.run.call_timeout_s
        t0 = time.perf_counter()
        times: dict[str, float] = {}
        step_seed = cfg.run.seed * 1_000_003 + self.step

        # each prompt's record fields (e.g. its answer) ride in the rollout's meta, for the reward
        _, prompts, fields = zip(*self.prompts.next_records(cfg.run.prompts_per_step))
        self.sharing.before_generate()
        shards = np.array_split(np.arange(len(prompts)), len(roles.engines))
        parts = [
            e.generate.remote(
                [prompts[i] for i in idx],
                self.group,
                seed=step_seed * 97 + k,
                fields=[fields[i] for i in idx],
            )
            for k, (e, idx) in enumerate(zip(roles.engines, shards))
            if len(idx)
        ]
        # One engine: its batch as it is (a glue task costs a worker round trip per step).
        rollout = parts[0] if len(parts) == 1 else glue().concat.remote(*parts)
        wait_for({role_id.ROLLOUT_ENGINES: rollout}, timeout, fetch=False)
        self.sharing.before_scoring()
        times["time/generate"] = time.perf_counter() - t0

        t = time.perf_counter()
        # one ref per reference and reward actor, each scoring its slice (`rlhf_ray.trainer.scoring`)
        scoring = score_in_slices(
            rollout,
            {role_id.REFERENCE: (roles.reference, "logprobs"), role_id.REWARD: (roles.reward, "score")},
        )
        if self.old_logprobs is OldLogprobs.SCORED:  # else the update's own forward gives them
            scoring[role_id.POLICY] = roles.policy.compute_logprobs(rollout)
        if roles.critic is not None:
            scoring[role_id.CRITIC] = roles.critic.compute_values(rollout)
        ready_after: dict[Any, float] = {}
        wait_for(scoring, timeout, fetch=False, ready_after=ready_after)
        times |= role_times(ready_after, SCORE_TIMES)
        scoring = join_slices(scoring)  # one ref per role again, in row order
        times["time/score"] = time.perf_counter() - t

        t = time.perf_counter()
        batch, stats_ref, norm_ref = glue().experience.remote(
            rollout,
            scoring.get(role_id.POLICY),
            scoring[role_id.REFERENCE],
            scoring[role_id.REWARD],
            scoring.get(role_id.CRITIC),
            cfg.algorithm,
            kl_coef,
            self.group,
            self.normalizer,
            cfg.rollout.max_new_tokens,
        )
        exp_stats, normalizer = wait_for({"experience": stats_ref, "normalizer": norm_ref}, timeout).values()
        self.normalizer = normalizer
        times["time/advantages"] = time.perf_counter() - t
        return batch, exp_stats, times

    def update(self, batch: Any, kl_coef: float) -> tuple[dict[str, float], float]:
        """PPO epochs on the policy (and critic) ranks; their combined stats and the seconds it took."""
        roles, t = self.roles, time.perf_counter()
        train = {role_id.rank(role_id.POLICY, i): r for i, r in enumerate(roles.policy.train(batch, kl_coef))}
        if roles.critic is not None:
            train |= {role_id.rank(role_id.CRITIC, i): r for i, r in enumerate(roles.critic.train(batch))}
        results = wait_for(train, self.cfg.run.call_timeout_s)
        stats = {}
        for kind in (RoleKind.POLICY, RoleKind.CRITIC):
            ranks = [v for k, v in results.items() if k.kind is kind]
            stats |= {f"{kind.value}/{k}": v for k, v in combine_rank_stats(ranks).items()}
        return stats, time.perf_counter() - t

    def sync_weights(self) -> None:
        """The engines get the policy's current weights (on shared GPUs: with their weights resident and
        the trainer's optimizer states moved out of the way, `rlhf_ray.trainer.gpu_sharing`)."""
        self.sharing.before_sync()
        self.sync.sync()
        self.sharing.after_sync()

    # ---- what recovery may do to the run (`rlhf_ray.trainer.recovery.Recoverable`) -----------------
    def resync(self, rebuild: bool) -> None:
        """The engines get the policy's current weights; `rebuild`: through a new weight sync (actors of
        the old one were replaced)."""
        self.sharing.mark_unknown()
        if rebuild:
            self.sync = make_weight_sync(self.cfg, self.roles)
        self.sync_weights()

    def rewind(self, fresh: list[RoleId]) -> None:
        """Back to the last complete checkpoint of this run (or to the start when there is none): trainers'
        weights and optimiser state, data position, KL controller, reward normaliser; the metrics rows of
        the undone steps are dropped, so every step appears once in metrics.jsonl."""
        self.sharing.mark_unknown()
        if fresh:  # restarted roles may be among the weight sync's actors
            self.sync = make_weight_sync(self.cfg, self.roles)
        latest = self.last_checkpoint  # this run's own (the directory may hold another run's too)
        if latest is not None:
            self.restore(latest)
        else:
            trained = [r for r in self.roles.ids() if r.kind.is_trainer and r not in fresh]
            if trained:  # no checkpoint: surviving trainers hold updated weights; start them afresh
                restart(self.roles, trained)
                self.sync = make_weight_sync(self.cfg, self.roles)
            self.reset_driver_state()
            self.sync_weights()
        self._logger.close()
        drop_rows_after(self._logger.path, self.step)
        drop_rows_after(self._logger.samples_path, self.step)
        self._logger = MetricsLogger(
            self.out, self.cfg.logging, self.cfg.run.total_steps, start_step=self.step
        )
        log.warning("rolled back to step %d (%s)", self.step, latest or "initial weights")

    def where(self, phase: str) -> str:
        if phase in STEP_PHASES:
            return f"step {self.step + 1} ({phase})"
        return f"{phase} after step {self.step}"

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        cfg, roles = self.cfg, self.roles
        self.sharing.before_generate()
        batch = sample_held_out(
            roles.engines[0], self.eval_prompts, cfg, greedy=cfg.run.eval_greedy, fields=self.eval_fields
        )
        scores = score_joined(batch, role_id.REWARD, roles.reward, "score")
        result = glue().eval_scores.remote(cfg.run.eval_function or "", batch, scores)
        samples = self.pick_samples(batch, scores) if cfg.logging.sample_interval else None
        out = wait_for({"evaluation": result}, cfg.run.call_timeout_s)["evaluation"]
        if samples is not None and self._logger is not None:
            self.log_samples(samples, "eval")
        return out

    # ---- sample completions (samples.jsonl, TensorBoard text) ------------------------------------------
    def pick_samples(self, batch: Any, scores: Any = None) -> Any:
        """Ref of `logging.num_samples` rows of a batch ref as small dicts (`actors.glue.samples`), with
        gold scores (`run.eval_function`) for those rows; `scores`: an eval batch's reward ref."""
        n, function = self.cfg.logging.num_samples, self.cfg.run.eval_function or ""
        return glue().samples.remote(batch, n, function, scores)

    def log_samples(self, rows: Any, split: str) -> None:
        """Fetch the picked rows and write them at the current step. They are for reading: a failure to get
        them is a warning, and the run goes on (a lost glue worker fails the next step, where recovery acts)."""
        try:
            fetched = wait_for({"samples": rows}, self.cfg.run.call_timeout_s)["samples"]
        except Exception as e:  # any failure here only costs the samples
            log.warning("no %s samples at step %d: %s", split, self.step, e)
            return
        self._logger.log_samples(self.step, fetched, split)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        roles, timeout = self.roles, self.cfg.run.call_timeout_s
        self.sharing.trainer_resident()  # DeepSpeed saves the optimizer states from where it keeps them

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

        self.last_checkpoint = self.ckpt.save(self.step, write)
        self._saved_at = time.monotonic()
        return self.last_checkpoint

    def restore(self, path: Path) -> None:
        manifest = self.ckpt.verify(path)
        self.last_checkpoint = path
        self._saved_at = time.monotonic()  # the work since this checkpoint is what a crash would cost now
        roles, timeout = self.roles, self.cfg.run.call_timeout_s
        self.sharing.trainer_resident()
        saved_lr = {"trainer.lr": roles.policy.load_checkpoint(str(path / "policy"), timeout)}
        if roles.critic is not None:
            saved_lr["trainer.critic_lr"] = roles.critic.load_checkpoint(str(path / "critic"), timeout)
        for key, saved in saved_lr.items():  # the trainers now train at the config's rate
            now = getattr(self.cfg.trainer, key.removeprefix("trainer."))
            if saved != now:
                log.warning(
                    "%s=%g (%g in the checkpoint): the resumed run trains at the new rate", key, now, saved
                )
        state = json.loads((path / STATE_FILE).read_text())
        self.step = state["step"]
        self.kl_ctl.load_state_dict(state["kl"])
        self.prompts.load_state_dict(state["data"])
        self.normalizer = None if state.get("normalizer") is None else RewardNormalizer(**state["normalizer"])
        self.sync_weights()  # the engines start from the initial weights; give them the restored ones
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
