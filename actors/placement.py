"""Placement of the RL roles on the cluster: one Ray placement group whose bundles are laid out from
`cfg.placement`, and the `.options()` each actor is created with.

- `separate` (default): every actor has its own bundle (policy and critic ranks, rollout engines,
  reference actors, reward actors).
- `colocate`: rollout engine i and reference actor i share the bundle of policy rank i, each taking an
  equal fraction of it (on GPUs: one device shared by trainer, vLLM and reference); engines and reference
  actors beyond the ranks, the critic and the reward actors have bundles of their own.

The reference and the reward are groups of `placement.<role>.num_actors` actors (one by default), each
scoring a contiguous slice of the batch (`rlhf_ray.trainer.scoring`), so a big batch is scored on several
devices at once.

A 1-node CPU run and a multi-node GPU run differ only in `cfg.placement`. Demands larger than the cluster
fail here, before any actor waits forever for resources.

Inside a Ray Tune trial the resources are already reserved: the trial runs in a placement group whose last
bundles are `layout(cfg, ...)`'s (see `rlhf_ray.trainer.sweep.trial_resources`), and the roles go into those
bundles instead of a new group, which the trial's end (not `RolePlan.remove`) releases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.role_id import RoleId, RoleKind
from rlhf_ray.algorithms import get_estimator
from rlhf_ray.config import RLHFConfig, RoleResources


class PlacementError(RuntimeError):
    """The cluster cannot host the roles the config asks for."""


@dataclass
class RolePlan:
    policy: list[dict[str, Any]] = field(default_factory=list)
    critic: list[dict[str, Any]] = field(default_factory=list)
    rollout: list[dict[str, Any]] = field(default_factory=list)
    reference: list[dict[str, Any]] = field(default_factory=list)  # one per reference actor
    reward: list[dict[str, Any]] = field(default_factory=list)  # one per reward actor
    placement_group: PlacementGroup | None = None
    owned: bool = True  # False: the group of the Tune trial we run in; its owner removes it

    def options_of(self, role: RoleId) -> list[dict[str, Any]]:
        """The `.options()` of the actors of `role`: all of the role's (index None), or the one actor of
        that index (a trainer's rank, an engine, a reference or reward actor)."""
        by_kind = {
            RoleKind.POLICY: self.policy,
            RoleKind.CRITIC: self.critic,
            RoleKind.ROLLOUT: self.rollout,
            RoleKind.REFERENCE: self.reference,
            RoleKind.REWARD: self.reward,
        }
        options = by_kind[role.kind]
        return options if role.index is None else [options[role.index]]

    def bundles_of(self, role: RoleId) -> list[int]:
        """The placement-group bundle indices the actors of `role` run on."""
        return [o["scheduling_strategy"].placement_group_bundle_index for o in self.options_of(role)]

    def remove(self) -> None:
        if self.placement_group is not None and self.owned:
            remove_placement_group(self.placement_group)
        self.placement_group = None


def needs_critic(cfg: RLHFConfig) -> bool:
    """Only an estimator that learns a value function (GAE) gets a critic; the critic-free ones start none."""
    return get_estimator(cfg.algorithm.estimator).needs_critic


def role_options(
    res: RoleResources,
    share: float = 1.0,
    placement_group: PlacementGroup | None = None,
    bundle: int | None = None,
) -> dict[str, Any]:
    """Ray `.options()` of one actor with `share` of the resources `res` (a `placement.<role>` entry),
    in bundle `bundle` of `placement_group` when one is given. The one translation of the config's
    resources into Ray's."""
    opts: dict[str, Any] = {
        "num_cpus": res.num_cpus * share,
        "num_gpus": res.num_gpus * share,
        "resources": {k: v * share for k, v in res.resources.items()},
    }
    if placement_group is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle
        )
    return opts


def needed_cpus(cfg: RLHFConfig) -> float:
    """Logical CPUs the RL roles reserve (the sum over their bundles, colocated roles counted once)."""
    bundles, _ = layout(cfg)
    return sum(b.get("CPU", 0.0) for b in bundles)


def _bundle(res: RoleResources) -> dict[str, float]:
    b = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    b = {k: v for k, v in b.items() if v > 0}
    return b or {"CPU": 0.01}


Slot = tuple[int, float, RoleResources]  # bundle index, share of that bundle, the bundle's resources


def layout(
    cfg: RLHFConfig, need_critic: bool | None = None
) -> tuple[list[dict[str, float]], dict[str, list[Slot]]]:
    """Bundles, and for each role one slot per actor: which bundle, what share of it. `need_critic`
    defaults to what the estimator needs (`needs_critic`)."""
    if need_critic is None:
        need_critic = needs_critic(cfg)
    p = cfg.placement
    n_ranks, n_engines = cfg.trainer.num_ranks, cfg.rollout.num_engines
    n_reference, n_reward = p.reference.num_actors, p.reward.num_actors
    bundles: list[dict[str, float]] = []
    slots: dict[str, list[Slot]] = {r: [] for r in ("policy", "critic", "rollout", "reference", "reward")}

    def own(res: RoleResources) -> Slot:
        bundles.append(_bundle(res))
        return (len(bundles) - 1, 1.0, res)

    if p.mode == "separate":
        slots["policy"] = [own(p.policy) for _ in range(n_ranks)]
        slots["rollout"] = [own(p.rollout) for _ in range(n_engines)]
        slots["reference"] = [own(p.reference) for _ in range(n_reference)]
    else:
        shared = [own(p.policy)[0] for _ in range(n_ranks)]
        members: dict[int, list[str]] = {i: ["policy"] for i in shared}
        for role, count, res in (("rollout", n_engines, p.rollout), ("reference", n_reference, p.reference)):
            for i in range(count):  # actor i shares rank i's bundle; those beyond the ranks get their own
                if i < n_ranks:
                    members[shared[i]].append(role)
                else:
                    slots[role].append(own(res))
        for idx, roles in members.items():
            for role in roles:
                slots[role].append((idx, 1.0 / len(roles), p.policy))
        for role in ("rollout", "reference"):  # actor order: the shared bundles come first
            slots[role].sort(key=lambda s: s[0])
    if need_critic:
        slots["critic"] = [own(p.critic) for _ in range(n_ranks)]
    slots["reward"] = [own(p.reward) for _ in range(n_reward)]
    return bundles, slots


def check_fits(bundles: list[dict[str, float]], available: dict[str, float]) -> None:
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items() if v > available.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {v:g}, cluster has {have:g}" for k, (v, have) in short.items())
        raise PlacementError(
            f"the roles need more resources than the cluster has ({detail}). Lower trainer.num_ranks, "
            f"rollout.num_engines or the placement.<role>.num_cpus/num_gpus, use placement.mode=colocate, "
            f"or add nodes"
        )


def _same_bundle(a: dict[str, float], b: dict[str, float]) -> bool:
    keys = {k for k, v in {**a, **b}.items() if v}
    return all(abs(a.get(k, 0.0) - b.get(k, 0.0)) < 1e-6 for k in keys)


def borrowed_offset(pg: PlacementGroup, bundles: list[dict[str, float]]) -> int:
    """Index of the first role bundle in `pg`, a placement group made for us (a Tune trial's): the roles'
    bundles must be its last `len(bundles)` ones, in order."""
    specs = pg.bundle_specs
    offset = len(specs) - len(bundles)
    if offset < 0 or not all(_same_bundle(specs[offset + i], b) for i, b in enumerate(bundles)):
        raise PlacementError(
            f"running inside placement group {pg.id.hex()[:12]} with bundles {specs}, which does not end "
            f"with the {len(bundles)} bundles the roles need ({bundles}). Size the trial's resources from "
            f"the same config: tune.with_resources(fn, rlhf_ray.trainer.sweep.trial_resources(cfg))"
        )
    return offset


def plan_placement(cfg: RLHFConfig, need_critic: bool | None = None, timeout_s: float = 300.0) -> RolePlan:
    """Reserve the roles' bundles (a new placement group, or the current Tune trial's) and return the
    `.options()` of every actor."""
    check_model_roles_have_gpus(cfg, ray.cluster_resources().get("GPU", 0.0), need_critic)
    bundles, slots = layout(cfg, need_critic)
    current = get_current_placement_group()
    if current is not None:
        pg, offset, owned = current, borrowed_offset(current, bundles), False
    else:
        pg, offset, owned = _new_group(cfg, bundles, timeout_s), 0, True

    def options(role: str) -> list[dict[str, Any]]:
        return [role_options(res, share, pg, offset + idx) for idx, share, res in slots[role]]

    return RolePlan(
        policy=options("policy"),
        critic=options("critic"),
        rollout=options("rollout"),
        reference=options("reference"),
        reward=options("reward"),
        placement_group=pg,
        owned=owned,
    )


def _new_group(cfg: RLHFConfig, bundles: list[dict[str, float]], timeout_s: float) -> PlacementGroup:
    check_fits(bundles, ray.cluster_resources())
    pg = placement_group(bundles, strategy=cfg.placement.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(
            f"placement group of {len(bundles)} bundles ({bundles}) was not placed within {timeout_s:.0f} s; "
            f"the cluster has the resources in total but not in the shape asked for "
            f"(placement.strategy={cfg.placement.strategy}): free resources, add nodes or try strategy PACK"
        )
    return pg


def model_roles(cfg: RLHFConfig, need_critic: bool | None = None) -> list[str]:
    """The roles that run a neural network (and so want a GPU when the cluster has them): the policy, the
    engines, the reference, the critic when one is trained, the reward when it is a model."""
    if need_critic is None:
        need_critic = needs_critic(cfg)
    roles = ["policy", "rollout", "reference"]
    if need_critic:
        roles.append("critic")
    if cfg.reward.kind == "model":
        roles.append("reward")
    return roles


def check_model_roles_have_gpus(
    cfg: RLHFConfig, cluster_gpus: float, need_critic: bool | None = None
) -> None:
    """On a cluster with GPUs, a model role given none would quietly compute on the CPU (Ray gives a
    `num_gpus=0` actor no GPU, and the role then runs there): refuse it, naming the key, unless the user
    set `placement.<role>.allow_cpu`. In colocate mode the engines and the reference ride on the policy's
    bundles, so only the policy's (and the critic's, reward's) own settings count."""
    if cluster_gpus <= 0:
        return
    own = {"policy", "critic", "reward"} if cfg.placement.mode == "colocate" else None
    for role in model_roles(cfg, need_critic):
        if own is not None and role not in own:
            continue
        res: RoleResources = getattr(cfg.placement, role)
        if res.num_gpus == 0 and not res.allow_cpu:
            raise PlacementError(
                f"placement.{role}.num_gpus=0 on a cluster with {cluster_gpus:g} GPUs: the {role} would run on "
                f"the CPU. Give it GPUs (placement.{role}.num_gpus=1, or a fraction to share one), or set "
                f"placement.{role}.allow_cpu=true to run it on the CPU on purpose"
            )
