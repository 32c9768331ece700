"""The identity of an RL role: a kind and, for one of several actors, its index. One typed id is used
wherever a role is named (starting, waiting, probing, restarting, placing, timing); its `str()` is the
name people read in messages and logs: 'policy', 'policy rank 1', 'rollout engine 0', 'reference model'.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class RoleKind(Enum):
    POLICY = "policy"
    CRITIC = "critic"
    ROLLOUT = "rollout engine"
    REFERENCE = "reference model"
    REWARD = "reward model"

    @property
    def is_trainer(self) -> bool:
        """A worker group of DeepSpeed ranks (restarting it loses its trained weights)."""
        return self in (RoleKind.POLICY, RoleKind.CRITIC)


@dataclass(frozen=True)
class RoleId:
    """`kind` and `index`: the engine's index for rollout engines, the rank for a trainer's rank; None
    for the role as a whole (a trainer's group, or all the rollout engines together)."""

    kind: RoleKind
    index: int | None = None

    def __str__(self) -> str:
        if self.index is None:
            return "rollout engines" if self.kind is RoleKind.ROLLOUT else self.kind.value
        if self.kind.is_trainer:
            return f"{self.kind.value} rank {self.index}"
        return f"{self.kind.value} {self.index}"


POLICY = RoleId(RoleKind.POLICY)
CRITIC = RoleId(RoleKind.CRITIC)
REFERENCE = RoleId(RoleKind.REFERENCE)
REWARD = RoleId(RoleKind.REWARD)
ROLLOUT_ENGINES = RoleId(RoleKind.ROLLOUT)


def engine(i: int) -> RoleId:
    return RoleId(RoleKind.ROLLOUT, i)


def rank(trainer: RoleId, i: int) -> RoleId:
    """Rank `i` of a trainer role (POLICY or CRITIC)."""
    return RoleId(trainer.kind, i)
