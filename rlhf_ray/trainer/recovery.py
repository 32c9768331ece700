"""Recovery of an RL run from dead or hung actors: `Recovery`, which `PPOTrainer` runs each part of a
step through, and `Recoverable`, the operations on the run that recovery may call (nothing else).

A failure while a step is made (a `RECOVERABLE` error: a dead actor, a role past `run.call_timeout_s`)
is handled where it happens, by `Recovery.attempt`:
- `probe` finds the roles that died or do not answer; `restart` replaces them on the same bundles;
- only rollout engines, reference or reward actors were lost, and the update was not under way:
  the engines get the policy's current weights (`Recoverable.resync`) and the failed part of the step runs again (the same
  prompts, the same seeds), so the step appears once in the metrics, as if nothing happened;
- a policy or critic rank was lost, or the update failed half-way: every trainer loads the last
  complete checkpoint (the start, when there is none), the driver state (step, data position, KL
  controller, reward normaliser) goes back with it, the metrics rows of the undone steps are dropped
  and the loop carries on from there (`Recoverable.rewind`, then `RolledBack`).
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
from typing import Any, Protocol

from actors.glue import reset_glue
from actors.role_id import RoleId
from rlhf_ray.config import RLHFConfig
from rlhf_ray.trainer.roles import RECOVERABLE, Roles, RoleUnplaceable, probe, restart

log = logging.getLogger(__name__)
STEP_PHASES = ("experience", "training", "weight sync")  # the parts of a step (`PPOTrainer.train_step`)


class RecoveryError(RuntimeError):
    """The run met more failures than `run.max_restarts` allows, or a lost node's roles found no node
    within `run.restart_timeout_s`; the message says why and how to resume."""


class RolledBack(Exception):
    """Recovery restored the last checkpoint: the loop carries on from `PPOTrainer.step`."""


class Recoverable(Protocol):
    """What recovery may change in a run, named: the run (`PPOTrainer`) offers these and nothing else.
    Recovery replaces dead actors inside `roles` (same object, fresh handles), then calls `resync` or
    `rewind`; `where` and `last_checkpoint` only feed its messages."""

    cfg: RLHFConfig
    roles: Roles
    last_checkpoint: Path | None  # the newest complete checkpoint this run wrote or resumed from

    def resync(self, rebuild: bool) -> None:
        """Give the engines the policy's current weights (`rebuild`: remake the weight sync first, its
        actors were replaced)."""

    def rewind(self, fresh: list[RoleId]) -> None:
        """Back to the last complete checkpoint (the start when there is none): the trainers' weights and
        optimiser state, the driver's step, data position, KL controller and reward normaliser, and the
        metrics rows of the undone steps. `fresh`: roles just restarted (they hold initial weights)."""

    def where(self, phase: str) -> str:
        """The step and phase, for messages."""


class Recovery:
    """Runs the parts of a step and recovers from dead or hung actors (module docstring); counts the
    recoveries against `run.max_restarts`."""

    def __init__(self, run: Recoverable):
        self.run = run
        self.restarts = 0  # recoveries so far

    def attempt(self, fn: Callable[[], Any], phase: str, again: Callable[[], None] | None = None) -> Any:
        """`fn()`, recovering from dead or hung actors (`_recover`) and calling it again (after `again()`,
        which rewinds what the failed call consumed). Raises `RolledBack` when recovery rewound the run
        to a checkpoint (the caller's step is void), `RecoveryError` past `run.max_restarts`."""
        while True:
            try:
                return fn()
            except RECOVERABLE as exc:
                self._recover(exc, phase)
                if again is not None:
                    again()

    def _recover(self, exc: BaseException, phase: str) -> None:
        """Find the roles that died or hung (`probe`), start fresh ones on the same bundles (`restart`),
        then either resync the engines to the policy's current weights (only engines, reference or
        reward actors were replaced, and the update was not under way: the step is retried) or rewind
        the run to its last complete checkpoint (a trainer rank was lost, or the update failed half-way)
        and raise `RolledBack`. Each attempt counts against `run.max_restarts`."""
        run, cfg = self.run, self.run.cfg
        rollback = phase == "training"
        while True:
            reset_glue()  # it may be what failed; a fresh one costs a second
            bad = probe(run.roles, cfg.run.call_timeout_s)
            self.restarts += 1
            what = f"{type(exc).__name__}: {exc}".strip()
            if self.restarts > cfg.run.max_restarts:
                raise RecoveryError(self._give_up_message(phase, what, bad)) from exc
            log.warning(
                "%s failed: %s; not answering: %s; recovering (%d of run.max_restarts=%d)",
                run.where(phase),
                what.splitlines()[0],
                ", ".join(map(str, bad)) or "none",
                self.restarts,
                cfg.run.max_restarts,
            )
            try:
                if bad:
                    restart(run.roles, bad)
                rollback = rollback or any(role.kind.is_trainer for role in bad)
                if rollback:
                    run.rewind(fresh=bad)
                else:
                    run.resync(rebuild=bool(bad))  # a fresh engine starts from the initial weights
            except RECOVERABLE as again:
                exc = again
                continue
            except RoleUnplaceable as lost:
                raise RecoveryError(
                    f"the RL run stopped at {run.where(phase)}: {lost}. {self._resume_hint()} once the "
                    f"cluster has the resources"
                ) from lost
            if rollback:
                raise RolledBack
            return

    def _resume_hint(self) -> str:
        latest = self.run.last_checkpoint
        resume = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was written yet"
        return (
            f"Nothing written is lost: {resume}, and running the same command again resumes from it "
            f"(checkpoint.resume=true)"
        )

    def _give_up_message(self, phase: str, what: str, bad: list[RoleId]) -> str:
        return (
            f"the RL run gave up at {self.run.where(phase)} after {self.restarts - 1} recoveries "
            f"(run.max_restarts={self.run.cfg.run.max_restarts}); dead or not answering: "
            f"{', '.join(map(str, bad)) or 'none'}; last failure: {what}. {self._resume_hint()}. If the "
            f"same role keeps failing, read its actor log; raise run.max_restarts to tolerate more failures"
        )


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
