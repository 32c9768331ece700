"""Recovery of an RL run from dead or hung actors, mixed into `PPOTrainer`.

A failure while a step is made (a `RECOVERABLE` error: a dead actor, a role past `run.call_timeout_s`)
is handled where it happens, by `_attempt`:
- `probe` finds the roles that died or do not answer; `restart` replaces them on the same bundles;
- only rollout engines, the reference or the reward actor were lost, and the update was not under way:
  the engines get the policy's current weights and the failed part of the step runs again (the same
  prompts, the same seeds), so the step appears once in the metrics, as if nothing happened;
- a policy or critic rank was lost, or the update failed half-way: every trainer loads the last
  complete checkpoint (the start, when there is none), the driver state (step, data position, KL
  controller, reward normaliser) goes back with it, the metrics rows of the undone steps are dropped
  and the loop carries on from there (`RolledBack`).
Each recovery counts against `run.max_restarts`; past it the run stops with a `RecoveryError` that names
the dead roles and the checkpoint a re-run resumes from. A role whose node was lost is restarted once Ray
has placed its bundle on another node; when no node with its resources joins within
`run.restart_timeout_s`, the run stops at once with a `RecoveryError` naming the roles, the missing
resources and the checkpoint to resume from (restarting again could not help).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.glue import reset_glue
from actors.role_id import RoleId
from rlhf_ray.metrics import MetricsLogger
from rlhf_ray.trainer.roles import RECOVERABLE, RoleUnplaceable, probe, restart
from rlhf_ray.trainer.weight_sync import make_weight_sync

log = logging.getLogger(__name__)
STEP_PHASES = ("experience", "training", "weight sync")  # the parts of a step (`PPOTrainer.train_step`)


class RecoveryError(RuntimeError):
    """The run met more failures than `run.max_restarts` allows, or a lost node's roles found no node
    within `run.restart_timeout_s`; the message says why and how to resume."""


class RolledBack(Exception):
    """Recovery restored the last checkpoint: the loop carries on from `PPOTrainer.step`."""


class RecoveryMixin:
    """The recovery half of `PPOTrainer`, which provides cfg, roles, sync, step, restarts, out, _logger,
    last_checkpoint (the newest this run wrote or resumed from), `restore(path)` and
    `reset_driver_state()`."""

    def _attempt(self, fn: Callable[[], Any], phase: str, again: Callable[[], None] | None = None) -> Any:
        """`fn()`, recovering from dead or hung actors (`_recover`) and calling it again (after `again()`,
        which rewinds what the failed call consumed). Raises `RolledBack` when recovery restored a
        checkpoint, `RecoveryError` past `run.max_restarts`."""
        while True:
            try:
                return fn()
            except RECOVERABLE as exc:
                self._recover(exc, phase)
                if again is not None:
                    again()

    def _recover(self, exc: BaseException, phase: str) -> None:
        """Find the roles that died or hung (`probe`), start fresh ones on the same bundles (`restart`),
        then either re-sync the engines to the policy's current weights (only engines, the reference or
        the reward actor were replaced, and the update was not under way: the step is retried) or load
        the last complete checkpoint into every trainer (a trainer rank was lost, or the update failed
        half-way) and raise `RolledBack`. Each attempt counts against `run.max_restarts`."""
        cfg = self.cfg
        rollback = phase == "training"
        while True:
            reset_glue()  # it may be what failed; a fresh one costs a second
            bad = probe(self.roles, cfg.run.call_timeout_s)
            self.restarts += 1
            what = f"{type(exc).__name__}: {exc}".strip()
            if self.restarts > cfg.run.max_restarts:
                raise RecoveryError(self._give_up_message(phase, what, bad)) from exc
            log.warning(
                "%s failed: %s; not answering: %s; recovering (%d of run.max_restarts=%d)",
                self._where(phase),
                what.splitlines()[0],
                ", ".join(map(str, bad)) or "none",
                self.restarts,
                cfg.run.max_restarts,
            )
            try:
                if bad:
                    restart(self.roles, bad)
                    self.sync = make_weight_sync(cfg, self.roles)
                rollback = rollback or any(role.kind.is_trainer for role in bad)
                if rollback:
                    self._rollback(fresh=bad)
                else:
                    self.sync.sync()  # a fresh engine starts from the initial weights
            except RECOVERABLE as again:
                exc = again
                continue
            except RoleUnplaceable as lost:
                raise RecoveryError(
                    f"the RL run stopped at {self._where(phase)}: {lost}. {self._resume_hint()} once the "
                    f"cluster has the resources"
                ) from lost
            if rollback:
                raise RolledBack
            return

    def _where(self, phase: str) -> str:
        if phase in STEP_PHASES:
            return f"step {self.step + 1} ({phase})"
        return f"{phase} after step {self.step}"

    def _resume_hint(self) -> str:
        latest = self.last_checkpoint
        resume = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was written yet"
        return (
            f"Nothing written is lost: {resume}, and running the same command again resumes from it "
            f"(checkpoint.resume=true)"
        )

    def _give_up_message(self, phase: str, what: str, bad: list[RoleId]) -> str:
        return (
            f"the RL run gave up at {self._where(phase)} after {self.restarts - 1} recoveries "
            f"(run.max_restarts={self.cfg.run.max_restarts}); dead or not answering: {', '.join(map(str, bad)) or 'none'}; "
            f"last failure: {what}. {self._resume_hint()}. If the same role keeps failing, read its actor log; "
            f"raise run.max_restarts to tolerate more failures"
        )

    def _rollback(self, fresh: list[RoleId]) -> None:
        """Back to the last complete checkpoint (or to the start when there is none): trainers' weights
        and optimiser state, data position, KL controller, reward normaliser; metrics rows of the steps
        undone are dropped, so every step appears once in metrics.jsonl."""
        cfg = self.cfg
        latest = self.last_checkpoint  # this run's own (the directory may hold another run's too)
        if latest is not None:
            self.restore(latest)
        else:
            trained = [r for r in self.roles.ids() if r.kind.is_trainer and r not in fresh]
            if trained:  # no checkpoint: surviving trainers hold updated weights; start them afresh
                restart(self.roles, trained)
                self.sync = make_weight_sync(cfg, self.roles)
            self.reset_driver_state()
            self.sync.sync()
        self._drop_metrics_after(self.step)
        log.warning("rolled back to step %d (%s)", self.step, latest or "initial weights")

    def _drop_metrics_after(self, step: int) -> None:
        self._logger.close()
        drop_rows_after(self._logger.path, step)
        self._logger = MetricsLogger(self.out, self.cfg.logging, self.cfg.run.total_steps, start_step=step)


def drop_rows_after(path: Path, step: int) -> int:
    """Remove the rows of steps after `step` from a metrics JSONL file (atomically); returns how many.
    Used when a run goes back to a checkpoint, so that the steps it does again appear once."""
    if not path.exists():
        return 0
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line + "\n" for line in rows if json.loads(line)["step"] <= step]
    if len(kept) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(rows) - len(kept)
