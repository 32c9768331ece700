"""Start the actors of one RL run on their placement, and stop them again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

from actors.critic_trainer import CriticTrainer
from actors.placement import RolePlan, plan_placement
from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from actors.reward import RewardModel
from actors.rollout import RolloutEngine
from rlhf_ray.config import RLHFConfig


class RoleTimeout(TimeoutError):
    """A role did not answer within `run.call_timeout_s`."""


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

    def shutdown(self) -> None:
        for handle in (*self.engines, self.reference, self.reward):
            ray.kill(handle, no_restart=True)
        self.policy.kill()
        if self.critic is not None:
            self.critic.kill()
        self.plan.remove()


def needs_critic(cfg: RLHFConfig) -> bool:
    return cfg.algorithm.estimator == "gae"


def start_roles(cfg: RLHFConfig) -> Roles:
    plan = plan_placement(cfg, needs_critic(cfg))
    engines = [RolloutEngine.options(**opts).remote(cfg, rank=i) for i, opts in enumerate(plan.rollout)]
    reference = ReferenceModel.options(**plan.reference).remote(cfg)
    reward = RewardModel.options(**plan.reward).remote(cfg)
    timeout = cfg.run.call_timeout_s
    policy = PolicyTrainer(cfg, options_per_rank=plan.policy, init_timeout=timeout)
    critic = (
        CriticTrainer(cfg, options_per_rank=plan.critic, init_timeout=timeout) if needs_critic(cfg) else None
    )
    roles = Roles(cfg, plan, policy, critic, engines, reference, reward)
    # Every actor answers once before the first step, so a role that cannot start fails here by name.
    wait_for(
        {f"rollout engine {i}": e.ping.remote() for i, e in enumerate(engines)}
        | {"reference model": reference.ping.remote(), "reward model": reward.ping.remote()},
        cfg.run.call_timeout_s,
    )
    return roles


def wait_for(named_refs: dict[str, Any], timeout_s: float, fetch: bool = True) -> dict[str, Any]:
    """`ray.get` of several refs with one deadline; on timeout, name the roles that did not answer.
    With `fetch=False` only wait until they are ready (for batches, which the driver must not pull)."""
    names = list(named_refs)
    refs = [named_refs[n] for n in names]
    _ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=fetch)
    if pending:
        late = [n for n, r in zip(names, refs) if r in pending]
        raise RoleTimeout(
            f"no answer within {timeout_s:.0f} s from: {', '.join(late)}. The actor may be hung or starved of "
            f"resources; check `ray status` and the actor logs, or raise run.call_timeout_s"
        )
    if not fetch:
        return dict(zip(names, refs))
    return dict(zip(names, ray.get(refs)))
