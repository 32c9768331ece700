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
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError
from ray.util.placement_group import placement_group_table

from actors.critic_trainer import CriticTrainer
from actors.placement import RolePlan, plan_placement
from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from actors.reward import RewardModel
from actors.rollout import RolloutEngine
from actors.worker_group import WorkerGroupError
from rlhf_ray.config import RLHFConfig

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
    cfg: RLHFConfig
    plan: RolePlan
    policy: PolicyTrainer
    critic: CriticTrainer | None
    engines: list[Any]
    reference: Any
    reward: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every restartable role: 'policy', 'critic', 'rollout engine <i>', 'reference model', 'reward model'."""
        out = ["policy"] + (["critic"] if self.critic is not None else [])
        return (
            out
            + [f"rollout engine {i}" for i in range(len(self.engines))]
            + ["reference model", "reward model"]
        )

    def shutdown(self) -> None:
        for handle in (*self.engines, self.reference, self.reward):
            _kill(handle)
        self.policy.kill()
        if self.critic is not None:
            self.critic.kill()
        self.plan.remove()


def _kill(handle: Any) -> None:
    with contextlib.suppress(Exception):  # already dead
        ray.kill(handle, no_restart=True)


def needs_critic(cfg: RLHFConfig) -> bool:
    return cfg.algorithm.estimator == "gae"


def start_roles(cfg: RLHFConfig) -> Roles:
    timeout = cfg.run.call_timeout_s
    plan = plan_placement(cfg, needs_critic(cfg), timeout_s=timeout)
    engines = [_start_engine(cfg, plan, i) for i in range(len(plan.rollout))]
    reference = ReferenceModel.options(**plan.reference).remote(cfg)
    reward = RewardModel.options(**plan.reward).remote(cfg)
    try:
        policy = PolicyTrainer(cfg, options_per_rank=plan.policy, init_timeout=timeout)
        critic = (
            CriticTrainer(cfg, options_per_rank=plan.critic, init_timeout=timeout)
            if needs_critic(cfg)
            else None
        )
    except BaseException:
        for handle in (*engines, reference, reward):
            _kill(handle)
        plan.remove()
        raise
    roles = Roles(cfg, plan, policy, critic, engines, reference, reward)
    # Every actor answers once before the first step, so a role that cannot start fails here by name.
    try:
        wait_for(
            {f"rollout engine {i}": e.ping.remote() for i, e in enumerate(engines)}
            | {"reference model": reference.ping.remote(), "reward model": reward.ping.remote()},
            timeout,
        )
    except BaseException:
        roles.shutdown()
        raise
    return roles


def _start_engine(cfg: RLHFConfig, plan: RolePlan, i: int) -> Any:
    return RolloutEngine.options(**plan.rollout[i]).remote(cfg, rank=i)


# ---- waiting --------------------------------------------------------------------------------------------
def wait_for(named_refs: dict[str, Any], timeout_s: float, fetch: bool = True) -> dict[str, Any]:
    """`ray.get` of several refs with one deadline; on timeout, name the roles that did not answer.
    With `fetch=True` the first role that fails stops the wait at once (its peers may be blocked in a
    collective forever): a dead actor becomes `RoleDied` naming the role, other errors pass through.
    With `fetch=False` only wait until they are ready (for batches, which the driver must not pull)."""
    names = {ref: name for name, ref in named_refs.items()}
    deadline = time.monotonic() + timeout_s
    pending, results = list(names), {}
    while pending:
        ready, pending = ray.wait(
            pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0), fetch_local=fetch
        )
        if not ready:
            late = [names[r] for r in pending]
            raise RoleTimeout(
                f"no answer within {timeout_s:.0f} s from: {', '.join(late)}. The actor may be hung or starved "
                f"of resources; check `ray status` and the actor logs, or raise run.call_timeout_s"
            )
        if fetch:
            results[names[ready[0]]] = get_named(names[ready[0]], ready[0])
    if not fetch:
        return dict(named_refs)
    return {name: results[name] for name in named_refs}


def get_named(name: str, ref: Any) -> Any:
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
def probe(roles: Roles, timeout_s: float) -> list[str]:
    """The roles (names as in `Roles.names`) that are dead or do not answer a ping within `timeout_s`.
    A worker group counts as one role: one bad rank makes the group bad (its peers may be stuck in a
    collective with it), and the wait stops as soon as every role is decided."""
    calls: dict[Any, str] = {}
    groups = {"policy": roles.policy} | ({"critic": roles.critic} if roles.critic is not None else {})
    for name, handle in groups.items():
        if handle.group.actors:  # a killed group has nothing to ping: it is bad (below)
            calls |= {ref: name for ref in handle.group.call("ping")}
    for i, engine in enumerate(roles.engines):
        calls[engine.ping.remote()] = f"rollout engine {i}"
    calls[roles.reference.ping.remote()] = "reference model"
    calls[roles.reward.ping.remote()] = "reward model"
    bad = {name for name, h in groups.items() if not h.group.actors}
    expected = {name: sum(1 for n in calls.values() if n == name) for name in set(calls.values())}
    answered: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    pending = [r for r, n in calls.items() if n not in bad]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            break
        name = calls[ready[0]]
        try:
            ray.get(ready[0])
            answered[name] = answered.get(name, 0) + 1
        except Exception:  # any failure to answer a ping means the role is unusable
            bad.add(name)
        pending = [r for r in pending if calls[r] not in bad]
    bad |= {name for name, n in expected.items() if answered.get(name, 0) < n}
    return [n for n in roles.names() if n in bad]


def restart(roles: Roles, names: list[str]) -> None:
    """Kill the named roles (a hung actor too) and start fresh ones on the same placement-group bundles,
    in place in `roles`. Trainer groups restart from their initial weights: restore a checkpoint after."""
    cfg, plan, timeout = roles.cfg, roles.plan, roles.cfg.run.call_timeout_s
    for name in names:
        if name not in roles.names():
            raise ValueError(f"restart: unknown role {name!r} (known: {', '.join(roles.names())})")
    # An actor on a bundle without a node would wait, unnamed, until its creation timed out: wait for the
    # bundles first (bounded), so that a lost node that never comes back is reported as what it is.
    wait_for_bundles(plan, names, cfg.run.restart_timeout_s)
    pings: dict[str, Any] = {}
    for name in names:
        if name.startswith("rollout engine "):
            i = int(name.rsplit(" ", 1)[1])
            _kill(roles.engines[i])
            roles.engines[i] = _start_engine(cfg, plan, i)
            pings[name] = roles.engines[i].ping.remote()
        elif name == "reference model":
            _kill(roles.reference)
            roles.reference = ReferenceModel.options(**plan.reference).remote(cfg)
            pings[name] = roles.reference.ping.remote()
        elif name == "reward model":
            _kill(roles.reward)
            roles.reward = RewardModel.options(**plan.reward).remote(cfg)
            pings[name] = roles.reward.ping.remote()
        elif name == "policy":
            roles.policy.kill()
            roles.policy = PolicyTrainer(cfg, options_per_rank=plan.policy, init_timeout=timeout)
        elif name == "critic" and roles.critic is not None:
            roles.critic.kill()
            roles.critic = CriticTrainer(cfg, options_per_rank=plan.critic, init_timeout=timeout)
    wait_for(pings, timeout)
    log.warning("restarted: %s", ", ".join(names))


# ---- waiting for lost bundles ----------------------------------------------------------------------------
def role_bundles(plan: RolePlan, name: str) -> list[int]:
    """The placement-group bundle indices the actors of role `name` (as in `Roles.names`) run on."""
    if name.startswith("rollout engine "):
        options = [plan.rollout[int(name.rsplit(" ", 1)[1])]]
    else:
        by_name = {"reference model": [plan.reference], "reward model": [plan.reward]}
        options = by_name.get(name) or {"policy": plan.policy, "critic": plan.critic}[name]
    return [o["scheduling_strategy"].placement_group_bundle_index for o in options]


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


def wait_for_bundles(plan: RolePlan, names: list[str], timeout_s: float, poll_s: float = 0.5) -> None:
    """Wait until every bundle of the named roles is on a live node again; past `timeout_s` raise
    `RoleUnplaceable` naming each waiting role, the resources its bundles ask for, the total missing
    and what the cluster has free, and the ways out."""
    deadline = time.monotonic() + timeout_s
    start, waited = time.monotonic(), False
    while True:
        lost = unplaced_bundles(plan)
        waiting = {n: [b for b in role_bundles(plan, n) if b in lost] for n in names}
        waiting = {n: b for n, b in waiting.items() if b}
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
                ", ".join(waiting),
            )
            waited = True
        if time.monotonic() >= deadline:
            raise RoleUnplaceable(_unplaceable_message(plan, waiting, timeout_s))
        time.sleep(poll_s)


def _unplaceable_message(plan: RolePlan, waiting: dict[str, list[int]], timeout_s: float) -> str:
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
        f"could not restart {', '.join(waiting)}: their node is gone and no live node offered their resources "
        f"within {timeout_s:.0f} s (run.restart_timeout_s). Waiting: {per_role}. Missing in total: "
        f"{_fmt([need])}; free in the cluster now: {_fmt([{k: free.get(k, 0.0) for k in need}])}. Add a node "
        f"with these resources, lower the placement.<role> resources (num_cpus, num_gpus, resources) of these "
        f"roles, or raise run.restart_timeout_s to wait longer for a replacement node"
    )


def _fmt(bundles: list[dict[str, float]]) -> str:
    return " + ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}" for b in bundles)
