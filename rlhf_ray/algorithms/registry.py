"""Advantage estimators and policy losses by name: `algorithm.estimator` and `algorithm.policy_loss` name a
registered entry (`estimator_names()`, `policy_loss_names()`) or a function of the user's own as
`'package.module:function'`.

An estimator is `fn(x: AdvantageInputs) -> (advantages [B, T], returns [B, T] or None)`: token-level
advantages, 0 off the mask, and the critic's regression targets when it learns a value function. A policy
loss is called as `ppo_policy_loss` is, `fn(logprobs, old_logprobs, advantages, mask, *, clip_eps,
clip_eps_high, dual_clip, agg, max_len) -> (loss, stats)`: reduce with `aggregate_loss(per_token, mask,
agg, max_len)`, put python floats in `stats` (with `pg_loss`, the loss, when it is not the whole of it).

A `module:function` estimator may be a plain function (no critic, no groups, not whitened) or an
`Estimator` that says what it needs; a policy loss likewise a function or a `PolicyLoss`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from rlhf_ray.algorithms.advantages import (
    broadcast_to_tokens,
    compute_gae,
    compute_grpo_advantages,
    compute_reinforce_pp_advantages,
    compute_rloo_advantages,
)
from rlhf_ray.algorithms.losses import gspo_policy_loss, ppo_policy_loss


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use, for a batch of B rows of T tokens."""

    # [B, T]: each score on its row's last response token, minus the per-token KL penalty when
    # algorithm.kl_in='reward'; `seq_rewards` sums them per row
    token_rewards: Tensor
    mask: Tensor  # [B, T], float: 1 on response tokens
    group_size: int  # samples per prompt; a prompt's samples are consecutive rows
    gamma: float
    lam: float
    values: Tensor | None = None  # [B, T], the critic's, for an estimator with needs_critic

    @property
    def seq_rewards(self) -> Tensor:
        return self.token_rewards.sum(dim=1)


EstimatorFn = Callable[[AdvantageInputs], tuple[Tensor, Tensor | None]]
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Estimator:
    fn: EstimatorFn
    needs_critic: bool = False  # learns a value function: the run starts a critic, trained on `returns`
    needs_groups: bool = False  # compares a prompt's samples: rollout.samples_per_prompt >= 2
    whiten: bool = False  # algorithm.whiten_advantages applies to its advantages
    loss_agg: str | None = None  # the aggregation of its paper, used by algorithm.loss_agg=auto

    def __call__(self, x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        return self.fn(x)


@dataclass(frozen=True)
class PolicyLoss:
    fn: PolicyLossFn
    loss_agg: str | None = None  # the aggregation of its paper, used by algorithm.loss_agg=auto

    def __call__(self, *args, **kwargs) -> tuple[Tensor, dict[str, float]]:
        return self.fn(*args, **kwargs)


ESTIMATORS: dict[str, Estimator] = {}
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_estimator(name: str, **needs) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: `fn` as estimator `name`; `needs` are `Estimator`'s flags (needs_critic=True, ...)."""

    def add(fn: EstimatorFn) -> EstimatorFn:
        _add(ESTIMATORS, "estimator", name, Estimator(fn, **needs))
        return fn

    return add


def register_policy_loss(name: str, loss_agg: str | None = None) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: `fn` as policy loss `name`."""

    def add(fn: PolicyLossFn) -> PolicyLossFn:
        _add(POLICY_LOSSES, "policy_loss", name, PolicyLoss(fn, loss_agg))
        return fn

    return add


def _add(table: dict, kind: str, name: str, entry) -> None:
    if ":" in name:
        raise ValueError(
            f"{kind} name {name!r}: ':' marks 'module:function' specs, so a name cannot hold one"
        )
    if name in table and table[name].fn is not entry.fn:
        raise ValueError(f"{kind} {name!r} is already registered (to {table[name].fn.__qualname__})")
    table[name] = entry


def estimator_names() -> list[str]:
    return sorted(ESTIMATORS)


def policy_loss_names() -> list[str]:
    return sorted(POLICY_LOSSES)


def _resolve(spec: str, table: dict, kind: str, wrap: type):
    if spec in table:
        return table[spec]
    if ":" not in spec:
        raise ValueError(
            f"algorithm.{kind}={spec!r} is not registered: choose one of {', '.join(map(repr, sorted(table)))}, "
            f"or name a function of your own as 'package.module:function'"
        )
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"algorithm.{kind}={spec!r}: cannot load it ({e}); the module must be importable where the run's "
            f"processes start (e.g. in the job's working_dir)"
        ) from e
    if isinstance(obj, wrap):
        return obj
    if not callable(obj):
        raise ValueError(f"algorithm.{kind}={spec!r} is a {type(obj).__name__}, not a function")
    return wrap(obj)


def get_estimator(spec: str) -> Estimator:
    """The estimator `spec` names: a registered name or `'module:function'`; ValueError listing the names."""
    return _resolve(spec, ESTIMATORS, "estimator", Estimator)


def get_policy_loss(spec: str) -> PolicyLoss:
    """The policy loss `spec` names: a registered name or `'module:function'`; ValueError listing the names."""
    return _resolve(spec, POLICY_LOSSES, "policy_loss", PolicyLoss)


def resolve_loss_agg(loss_agg: str, estimator: str, policy_loss: str) -> str:
    """`loss_agg` unless it is 'auto'; then the aggregation the policy loss's paper uses, else the
    estimator's, else 'token-mean'."""
    if loss_agg != "auto":
        return loss_agg
    return get_policy_loss(policy_loss).loss_agg or get_estimator(estimator).loss_agg or "token-mean"


# ---- the built-in estimators: thin adapters of rlhf_ray.algorithms.advantages ---------------------------
@register_estimator("gae", needs_critic=True, whiten=True)
def _gae(x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    return compute_gae(x.token_rewards, x.values, x.mask, x.gamma, x.lam)


@register_estimator("grpo", needs_groups=True)
def _grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    return broadcast_to_tokens(compute_grpo_advantages(x.seq_rewards, x.group_size), x.mask), None


@register_estimator("dr_grpo", needs_groups=True, loss_agg="seq-mean-token-sum-norm")
def _dr_grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    """Dr. GRPO (Liu et al. 2025): the group mean subtracted, no division by the group's std; with the
    length-unbiased seq-mean-token-sum-norm aggregation under loss_agg=auto."""
    seq_adv = compute_grpo_advantages(x.seq_rewards, x.group_size, scale_by_std=False)
    return broadcast_to_tokens(seq_adv, x.mask), None


@register_estimator("rloo", needs_groups=True, whiten=True)
def _rloo(x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    return broadcast_to_tokens(compute_rloo_advantages(x.seq_rewards, x.group_size), x.mask), None


@register_estimator("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    return compute_reinforce_pp_advantages(x.token_rewards, x.mask, gamma=x.gamma), None


register_policy_loss("ppo")(ppo_policy_loss)
register_policy_loss("gspo", loss_agg="seq-mean-token-mean")(gspo_policy_loss)
