"""The identity of an RL role: a kind and, for one of several actors, its index. One typed id is used
wherever a role is named (starting, waiting, probing, restarting, placing, timing); its `str()` is the
name people read in messages and logs: 'policy', 'policy rank 1', 'rollout engine 0', 'reference model',
'reward model 1' (actor 1 of a reward role of several actors).
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
    """`kind` and `index`: the engine's index for rollout engines, the rank for a trainer's rank, the
    actor's index for one of several reference or reward actors; None for the role as a whole (a trainer's
    group, all the rollout engines together, all the reference or reward actors: the one actor when the
    role has one)."""

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


def members(group: RoleId, count: int) -> list[RoleId]:
    """The ids of the `count` actors of REFERENCE or REWARD (`placement.<role>.num_actors`), each scoring a
    slice of the batch: the role itself when it is one actor, so that a run of one keeps the plain name
    ('reward model'), else one id per actor ('reward model 0', 'reward model 1')."""
    if group.kind not in (RoleKind.REFERENCE, RoleKind.REWARD):
        raise ValueError(f"members: {group} is not a group of scoring actors (reference or reward)")
    return [group] if count == 1 else [RoleId(group.kind, i) for i in range(count)]
