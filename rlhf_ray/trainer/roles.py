"""Start the actors of one RL run on their placement, wait on them with deadlines, find the ones that
died or hung, restart those in place, and stop them all again.

Every wait has a deadline (`run.call_timeout_s`) and every failure names the role: `RoleTimeout` for a
role that did not answer in time, `RoleDied` for one whose actor process is gone. Both are what the RL
driver recovers from (`rlhf_ray.trainer.ppo`): `probe` tells which roles are unusable, `restart` replaces
them with fresh actors on the same placement-group bundles. A bundle whose node is gone (the node was
removed or crashed) is placed again by Ray once a node with its resources joins; `restart` waits for that
at most `run.restart_timeout_s`, then raises `RoleUnplaceable` naming the roles and the missing resources.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError
from ray.util.placement_group import placement_group_table

from actors import role_id
from actors.critic_trainer import CriticTrainer
from actors.deadline import DeadlinePassed, as_ready
from actors.placement import RolePlan, needs_critic, plan_placement
from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from actors.reward import RewardModel
from actors.role_id import RoleId, RoleKind
from actors.rollout import RolloutEngine
from actors.worker_group import WorkerGroupError
from rlhf_ray.config import RLHFConfig
from rlhf_ray.engine_args import engines_sleep

log = logging.getLogger(__name__)


class RoleTimeout(TimeoutError):
    """A role did not answer within `run.call_timeout_s`."""


class RoleDied(RuntimeError):
    """A role's actor process is gone (killed, crashed, out of memory, its node lost)."""


class RoleUnplaceable(RuntimeError):
    """Roles to restart whose placement-group bundles have no node (theirs was lost) and got none within
    `run.restart_timeout_s`. Not in `RECOVERABLE`: restarting again cannot help until the cluster has the
    resources, so the run stops and says so."""


# What a run can recover from by restarting actors: anything else (a bad reward, bad data) is a bug or
# bad input and fails the run at once.
RECOVERABLE = (RoleTimeout, RoleDied, RayActorError, ObjectLostError, WorkerGroupError)


@dataclass
class Roles:
    """The live actors of one RL run and the placement they were started on."""

    cfg: RLHFConfig
    plan: RolePlan
    policy: PolicyTrainer
    critic: CriticTrainer | None
    engines: list[Any]
    reference: list[Any]  # placement.reference.num_actors actors, each scoring a slice of the batch
    reward: list[Any]  # placement.reward.num_actors actors, likewise

    def ids(self) -> list[RoleId]:
        """Every restartable role: the policy, the critic (GAE only), each engine, each reference actor,
        each reward actor (`role_id.members`: the role itself when it is one actor)."""
        trainers = [role_id.POLICY] + ([role_id.CRITIC] if self.critic is not None else [])
        engines = [role_id.engine(i) for i in range(len(self.engines))]
        reference = role_id.members(role_id.REFERENCE, len(self.reference))
        return [*trainers, *engines, *reference, *role_id.members(role_id.REWARD, len(self.reward))]

    def actors_of(self, role: RoleId) -> list[Any]:
        """The actor handles of a role of single actors: the engines, the reference or the reward actors."""
        return {
            RoleKind.ROLLOUT: self.engines,
            RoleKind.REFERENCE: self.reference,
            RoleKind.REWARD: self.reward,
        }[role.kind]

    def actor(self, role: RoleId) -> Any:
        """The actor handle of one actor: an engine, a reference or reward actor (index None: the role's
        only actor)."""
        actors = self.actors_of(role)
        if role.index is None and len(actors) != 1:
            raise ValueError(f"{role} has {len(actors)} actors: name one by its index")
        return actors[role.index or 0]

    def shutdown(self) -> None:
        for handle in (*self.engines, *self.reference, *self.reward):
            _kill(handle)
        self.policy.kill()
        if self.critic is not None:
            self.critic.kill()
        self.plan.remove()


def _kill(handle: Any) -> None:
    with contextlib.suppress(Exception):  # already dead
        ray.kill(handle, no_restart=True)


def _start_actor(cfg: RLHFConfig, plan: RolePlan, role: RoleId) -> Any:
    """A fresh actor (an engine, a reference or reward actor) on its bundle of the plan."""
    (options,) = plan.options_of(role)
    if role.kind is RoleKind.ROLLOUT:
        return RolloutEngine.options(**options).remote(cfg, rank=role.index)
    cls = {RoleKind.REFERENCE: ReferenceModel, RoleKind.REWARD: RewardModel}[role.kind]
    return cls.options(**options).remote(cfg)


def _start_trainer(cfg: RLHFConfig, plan: RolePlan, role: RoleId) -> PolicyTrainer | CriticTrainer:
    cls = PolicyTrainer if role.kind is RoleKind.POLICY else CriticTrainer
    return cls(cfg, options_per_rank=plan.options_of(role), init_timeout=cfg.run.call_timeout_s)


def start_roles(cfg: RLHFConfig) -> Roles:
    timeout = cfg.run.call_timeout_s
    plan = plan_placement(cfg, timeout_s=timeout)
    engines = [_start_actor(cfg, plan, role_id.engine(i)) for i in range(len(plan.rollout))]
    if engines_sleep(cfg):
        # Colocated on GPUs: vLLM demands its memory share free when it starts, so the engines start, and
        # go to sleep, before the trainer and the reference take their part of the same GPUs.
        try:
            wait_for({role_id.engine(i): e.sleep.remote() for i, e in enumerate(engines)}, timeout)
        except BaseException:
            for handle in engines:
                _kill(handle)
            plan.remove()
            raise
    reference = [_start_actor(cfg, plan, r) for r in role_id.members(role_id.REFERENCE, len(plan.reference))]
    reward = [_start_actor(cfg, plan, r) for r in role_id.members(role_id.REWARD, len(plan.reward))]
    try:
        policy = _start_trainer(cfg, plan, role_id.POLICY)
        critic = _start_trainer(cfg, plan, role_id.CRITIC) if needs_critic(cfg) else None
    except BaseException:
        for handle in (*engines, *reference, *reward):
            _kill(handle)
        plan.remove()
        raise
    roles = Roles(cfg, plan, policy, critic, engines, reference, reward)
    # Every actor answers once before the first step, so a role that cannot start fails here by name.
    try:
        single = [r for r in roles.ids() if not r.kind.is_trainer]
        wait_for({r: roles.actor(r).ping.remote() for r in single}, timeout)
    except BaseException:
        roles.shutdown()
        raise
    return roles


# ---- waiting --------------------------------------------------------------------------------------------
def wait_for(
    named_refs: dict[Any, Any],
    timeout_s: float,
    fetch: bool = True,
    ready_after: dict[Any, float] | None = None,
) -> dict[Any, Any]:
    """`ray.get` of several refs with one deadline; on timeout, name the roles that did not answer. Keys
    are `RoleId`s (or other names: their `str()` is what a message says).
    With `fetch=True` the first role that fails stops the wait at once (its peers may be blocked in a
    collective forever): a dead actor becomes `RoleDied` naming the role, other errors pass through.
    With `fetch=False` only wait until they are ready (for batches, which the driver must not pull).
    `ready_after`, when given, gets the seconds from the call until each key's ref was ready."""
    names = {ref: name for name, ref in named_refs.items()}
    start, results = time.perf_counter(), {}
    try:
        for ref in as_ready(names, timeout_s, fetch=fetch):
            if ready_after is not None:
                ready_after[names[ref]] = time.perf_counter() - start
            if fetch:
                results[names[ref]] = get_named(names[ref], ref)
    except DeadlinePassed as late:
        raise RoleTimeout(
            f"no answer within {timeout_s:.0f} s from: {', '.join(str(names[r]) for r in late.pending)}. "
            f"The actor may be hung or starved of resources; check `ray status` and the actor logs, or "
            f"raise run.call_timeout_s"
        ) from None
    if not fetch:
        return dict(named_refs)
    return {name: results[name] for name in named_refs}


def get_named(name: Hashable, ref: Any) -> Any:
    """`ray.get(ref)` of a ready ref; a dead actor (anywhere upstream) becomes `RoleDied` naming `name`."""
    try:
        return ray.get(ref)
    except RayActorError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RoleDied(
            f"{name}: an actor it depends on died ({type(exc).__name__}: {first}). The run restarts dead "
            f"roles up to run.max_restarts times; see the actor logs for why it died"
        ) from exc


# ---- finding and replacing dead or hung roles --------------------------------------------------------
def probe(roles: Roles, timeout_s: float) -> list[RoleId]:
    """The roles that are dead or do not answer a ping within `timeout_s`, in `Roles.ids` order.
    A worker group counts as one role: one bad rank makes the group bad (its peers may be stuck in a
    collective with it), and the wait stops as soon as every role is decided."""
    calls: dict[Any, RoleId] = {}
    bad: set[RoleId] = set()
    for role in roles.ids():
        if role.kind.is_trainer:
            group = (roles.policy if role.kind is RoleKind.POLICY else roles.critic).group
            if not group.actors:  # a killed group has nothing to ping: it is bad
                bad.add(role)
            calls |= {ref: role for ref in (group.call("ping") if group.actors else [])}
        else:
            calls[roles.actor(role).ping.remote()] = role
    expected = {role: list(calls.values()).count(role) for role in set(calls.values())}
    answered: dict[RoleId, int] = {}
    try:
        for ref in as_ready(calls, timeout_s, keep=lambda r: calls[r] not in bad):
            try:
                ray.get(ref)
                answered[calls[ref]] = answered.get(calls[ref], 0) + 1
            except Exception:  # any failure to answer a ping means the role is unusable
                bad.add(calls[ref])
    except DeadlinePassed:
        pass  # whoever did not answer in time is bad (below)
    bad |= {role for role, n in expected.items() if answered.get(role, 0) < n}
    return [r for r in roles.ids() if r in bad]


def restart(roles: Roles, ids: list[RoleId]) -> None:
    """Kill the given roles (a hung actor too) and start fresh ones on the same placement-group bundles,
    in place in `roles`. Trainer groups restart from their initial weights: restore a checkpoint after."""
    cfg, plan = roles.cfg, roles.plan
    for role in ids:
        if role not in roles.ids():
            raise ValueError(f"restart: unknown role {role} (known: {', '.join(map(str, roles.ids()))})")
    # An actor on a bundle without a node would wait, unnamed, until its creation timed out: wait for the
    # bundles first (bounded), so that a lost node that never comes back is reported as what it is.
    wait_for_bundles(plan, ids, cfg.run.restart_timeout_s)
    pings: dict[RoleId, Any] = {}
    for role in ids:
        if role.kind is RoleKind.POLICY:
            roles.policy.kill()
            roles.policy = _start_trainer(cfg, plan, role)
        elif role.kind is RoleKind.CRITIC:
            roles.critic.kill()
            roles.critic = _start_trainer(cfg, plan, role)
        else:
            _kill(roles.actor(role))
            fresh = _start_actor(cfg, plan, role)
            roles.actors_of(role)[role.index or 0] = fresh  # in place: the lists are the run's
            pings[role] = fresh.ping.remote()
    wait_for(pings, cfg.run.call_timeout_s)
    log.warning("restarted: %s", ", ".join(map(str, ids)))


# ---- waiting for lost bundles ----------------------------------------------------------------------------
def unplaced_bundles(plan: RolePlan) -> set[int]:
    """Bundles of the plan's placement group that have no live node now (theirs was lost; Ray places
    them again when a node with their resources joins)."""
    if plan.placement_group is None:
        return set()
    table = placement_group_table(plan.placement_group)
    if table.get("state") == "CREATED":
        return set()
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return {int(i) for i, node in table.get("bundles_to_node_id", {}).items() if node not in alive}


def wait_for_bundles(plan: RolePlan, ids: list[RoleId], timeout_s: float, poll_s: float = 0.5) -> None:
    """Wait until every bundle of the named roles is on a live node again; past `timeout_s` raise
    `RoleUnplaceable` naming each waiting role, the resources its bundles ask for, the total missing
    and what the cluster has free, and the ways out."""
    deadline = time.monotonic() + timeout_s
    start, waited = time.monotonic(), False
    while True:
        lost = unplaced_bundles(plan)
        waiting = {r: [b for b in plan.bundles_of(r) if b in lost] for r in ids}
        waiting = {r: b for r, b in waiting.items() if b}
        if not waiting:
            if waited:
                log.warning(
                    "placement: the lost bundles are placed again after %.1f s", time.monotonic() - start
                )
            return
        if not waited:
            log.warning(
                "placement: waiting up to %.0f s (run.restart_timeout_s) for a node to host: %s",
                timeout_s,
                ", ".join(map(str, waiting)),
            )
            waited = True
        if time.monotonic() >= deadline:
            raise RoleUnplaceable(_unplaceable_message(plan, waiting, timeout_s))
        time.sleep(poll_s)


def _unplaceable_message(plan: RolePlan, waiting: dict[RoleId, list[int]], timeout_s: float) -> str:
    specs = plan.placement_group.bundle_specs
    need: dict[str, float] = {}
    for b in {b for bundles in waiting.values() for b in bundles}:  # colocated roles share a bundle
        for k, v in specs[b].items():
            need[k] = need.get(k, 0.0) + v
    free = ray.available_resources()
    per_role = "; ".join(
        f"{name} (bundle {', '.join(map(str, b))}: {_fmt([specs[i] for i in b])})"
        for name, b in waiting.items()
    )
    return (
        f"could not restart {', '.join(map(str, waiting))}: their node is gone and no live node offered their resources "
        f"within {timeout_s:.0f} s (run.restart_timeout_s). Waiting: {per_role}. Missing in total: "
        f"{_fmt([need])}; free in the cluster now: {_fmt([{k: free.get(k, 0.0) for k in need}])}. Add a node "
        f"with these resources, lower the placement.<role> resources (num_cpus, num_gpus, resources) of these "
        f"roles, or raise run.restart_timeout_s to wait longer for a replacement node"
    )


def _fmt(bundles: list[dict[str, float]]) -> str:
    return " + ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}" for b in bundles)
