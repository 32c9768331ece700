"""The reference and the reward as groups of actors (`placement.<role>.num_actors`): each actor scores a
contiguous slice of the rollout batch, and the answers are put back together in row order, so a big batch
is scored on several devices at once and the training batch is the one a single actor would give.

The slicing and the joining run on the glue worker (`actors.glue`), so the driver moves only refs and
each actor receives only its slice. A role of one actor scores the whole rollout ref as it is: no glue
round trip is added to today's path.

Runs on the driver.
"""

from __future__ import annotations

from typing import Any

from actors import role_id
from actors.glue import glue
from actors.role_id import RoleId, RoleKind

GROUP_KINDS = (RoleKind.REFERENCE, RoleKind.REWARD)  # the roles that score in slices


def score_in_slices(rollout: Any, groups: dict[RoleId, tuple[list[Any], str]]) -> dict[RoleId, Any]:
    """Submit the scoring of `rollout` (a ref) by each group, `{role: (its actors, the method to call)}`;
    returns `{actor's id: ref of its answer}` (`role_id.members`). A group of `n > 1` actors gets `n`
    slices, split once per `n` on the glue worker (the reference and the reward share them when their
    counts agree). Nothing is waited on."""
    slices: dict[int, list[Any]] = {}
    answers: dict[RoleId, Any] = {}
    for role, (actors, method) in groups.items():
        n = len(actors)
        if n == 1:
            answers[role] = getattr(actors[0], method).remote(rollout)
            continue
        if n not in slices:
            slices[n] = glue().split.options(num_returns=n).remote(rollout, n)
        for member, actor, part in zip(role_id.members(role, n), actors, slices[n], strict=True):
            answers[member] = getattr(actor, method).remote(part)
    return answers


def join_slices(answers: dict[RoleId, Any]) -> dict[RoleId, Any]:
    """One ref per role: the answers of a group's actors joined in slice order on the glue worker (not
    waited on), every other answer (a role of one actor, the policy's, the critic's) as it is."""
    by_role: dict[RoleId, list[Any]] = {}
    for member, ref in answers.items():  # in submission order: slice order within a group
        role = RoleId(member.kind) if member.kind in GROUP_KINDS else member
        by_role.setdefault(role, []).append(ref)
    return {role: refs[0] if len(refs) == 1 else glue().join.remote(*refs) for role, refs in by_role.items()}


def role_times(ready_after: dict[RoleId, float], names: dict[RoleKind, str]) -> dict[str, float]:
    """`time/<name>` of each scoring role from the seconds until each actor's answer was ready: a group's
    is its last actor's (the slices are scored in parallel, the role is done when all are)."""
    times: dict[str, float] = {}
    for member, seconds in ready_after.items():
        key = f"time/{names[member.kind]}"
        times[key] = max(times.get(key, 0.0), seconds)
    return times


def score_joined(batch: Any, role: RoleId, actors: list[Any], method: str) -> Any:
    """One group's answer on `batch` (a ref) as one ref: its actors score slices, joined in row order."""
    return join_slices(score_in_slices(batch, {role: (actors, method)}))[role]
