"""The facts that have one home each: a role's typed id and its name, which actors and bundles a role
has in a plan, how the ranks' statistics combine, where a batch's old log-probs come from."""

from __future__ import annotations

import pytest
import torch

from actors import role_id
from actors.placement import RolePlan, layout, needed_cpus, role_options
from actors.role_id import RoleId, RoleKind
from actors.worker_group import combine_rank_stats
from rlhf_ray.batch import Batch
from rlhf_ray.config import RLHFConfig, RoleResources
from rlhf_ray.experience import OldLogprobs, mark_old_logprobs, old_logprobs_of, old_logprobs_source

pytestmark = pytest.mark.timeout(60)


def test_role_ids_read_as_the_names_people_know():
    assert [str(r) for r in (role_id.POLICY, role_id.CRITIC, role_id.REFERENCE, role_id.REWARD)] == [
        "policy",
        "critic",
        "reference model",
        "reward model",
    ]
    assert str(role_id.engine(2)) == "rollout engine 2"
    assert str(role_id.ROLLOUT_ENGINES) == "rollout engines"
    assert str(role_id.rank(role_id.POLICY, 1)) == "policy rank 1"
    assert role_id.engine(0) == RoleId(RoleKind.ROLLOUT, 0) != role_id.engine(1)
    assert role_id.rank(role_id.CRITIC, 0).kind.is_trainer and not role_id.REWARD.kind.is_trainer


def test_a_group_of_scoring_actors_names_each_actor_and_one_actor_keeps_the_plain_name():
    assert role_id.members(role_id.REFERENCE, 1) == [role_id.REFERENCE]
    assert [str(r) for r in role_id.members(role_id.REWARD, 1)] == ["reward model"]
    two = role_id.members(role_id.REFERENCE, 2)
    assert two == [RoleId(RoleKind.REFERENCE, 0), RoleId(RoleKind.REFERENCE, 1)]
    assert [str(r) for r in two] == ["reference model 0", "reference model 1"]
    assert str(role_id.members(role_id.REWARD, 3)[2]) == "reward model 2"
    assert two[1] != role_id.REFERENCE and not two[1].kind.is_trainer
    with pytest.raises(ValueError, match="not a group of scoring actors"):
        role_id.members(role_id.POLICY, 2)


def test_combine_rank_stats_max_of_maxima_min_of_minima_mean_of_the_rest():
    ranks = [
        {"ratio_max": 1.5, "ratio_min": 0.9, "policy_loss": 1.0, "only_here": 3.0},
        {"ratio_max": 1.1, "ratio_min": 0.7, "policy_loss": 3.0},
    ]
    assert combine_rank_stats(ranks) == {
        "only_here": 3.0,  # over the ranks that have it
        "policy_loss": 2.0,
        "ratio_max": 1.5,  # not the mean of maxima (1.3)
        "ratio_min": 0.7,
    }


class _Group:  # what a PlacementGroupSchedulingStrategy holds; the plan only reads the bundle index
    id = None


def test_plan_gives_each_role_its_options_and_bundles():
    res = RoleResources(num_cpus=2, num_gpus=1, resources={"trainer_node": 1})
    assert role_options(res, share=0.5) == {
        "num_cpus": 1.0,
        "num_gpus": 0.5,
        "resources": {"trainer_node": 0.5},
    }
    pg = _Group()
    plan = RolePlan(
        policy=[role_options(res, 1.0, pg, 0), role_options(res, 1.0, pg, 1)],
        rollout=[role_options(res, 0.5, pg, 0), role_options(res, 1.0, pg, 2)],
        reference=[role_options(res, 0.5, pg, 0)],
        reward=[role_options(res, 1.0, pg, 3), role_options(res, 1.0, pg, 4)],
    )
    assert plan.bundles_of(role_id.POLICY) == [0, 1]
    assert plan.bundles_of(role_id.rank(role_id.POLICY, 1)) == [1]
    assert plan.bundles_of(role_id.engine(1)) == [2]
    assert plan.bundles_of(role_id.REFERENCE) == [0]
    # a group of two reward actors: the role as a whole, and each actor by its id
    assert plan.bundles_of(role_id.REWARD) == [3, 4]
    assert [plan.bundles_of(r) for r in role_id.members(role_id.REWARD, 2)] == [[3], [4]]
    assert plan.options_of(role_id.engine(0))[0]["num_gpus"] == 0.5


def test_needed_cpus_counts_colocated_bundles_once():
    base = {"trainer": {"num_ranks": 2}, "rollout": {"num_engines": 2}, "algorithm": {"mini_batch_size": 8}}
    separate = RLHFConfig.from_dict(base)
    assert needed_cpus(separate) == 2 + 2 + 1 + 1  # ranks, engines, reference, reward (grpo: no critic)
    colocated = RLHFConfig.from_dict(base | {"placement": {"mode": "colocate"}})
    assert needed_cpus(colocated) == 2 + 1  # the engines and the reference share the ranks' bundles
    gae = RLHFConfig.from_dict(base | {"algorithm": {"estimator": "gae", "mini_batch_size": 8}})
    assert len(layout(gae)[0]) == len(layout(separate)[0]) + 2  # a critic bundle per rank
    groups = {"reference": {"num_actors": 3}, "reward": {"num_actors": 2}}
    assert needed_cpus(RLHFConfig.from_dict(base | {"placement": groups})) == 2 + 2 + 3 + 2
    # colocated: reference actors 0 and 1 share the ranks' bundles, actor 2 has its own
    both = RLHFConfig.from_dict(base | {"placement": {"mode": "colocate", **groups}})
    assert needed_cpus(both) == 2 + 1 + 2


def _batch(with_logprobs: bool) -> Batch:
    fields = {"response_mask": torch.ones(2, 3)}
    if with_logprobs:
        fields["logprobs"] = torch.zeros(2, 3)
    return Batch(fields)


def test_old_logprobs_decided_once_and_carried_by_the_batch():
    one_step = {"run": {"prompts_per_step": 2}, "rollout": {"samples_per_prompt": 4}}
    one_step["algorithm"] = {"mini_batch_size": 8}
    assert old_logprobs_source(RLHFConfig.from_dict(one_step)) is OldLogprobs.FROM_UPDATE
    two_steps = one_step | {"algorithm": {"mini_batch_size": 4}}
    assert old_logprobs_source(RLHFConfig.from_dict(two_steps)) is OldLogprobs.SCORED
    in_reward = one_step | {"algorithm": {"mini_batch_size": 8, "kl_in": "reward"}}
    assert old_logprobs_source(RLHFConfig.from_dict(in_reward)) is OldLogprobs.SCORED
    recompute = one_step | {"algorithm": {"mini_batch_size": 8, "old_logprobs": "recompute"}}
    assert old_logprobs_source(RLHFConfig.from_dict(recompute)) is OldLogprobs.SCORED

    marked = mark_old_logprobs(_batch(False), OldLogprobs.FROM_UPDATE)
    assert old_logprobs_of(marked) is OldLogprobs.FROM_UPDATE
    assert old_logprobs_of(Batch.concat([marked, marked]).select([0, 3])) is OldLogprobs.FROM_UPDATE
    assert old_logprobs_of(_batch(True)) is OldLogprobs.SCORED  # a hand-made batch with its log-probs
    with pytest.raises(ValueError, match="does not say where they come from"):
        old_logprobs_of(_batch(False))
    with pytest.raises(ValueError, match="SCORED batch needs"):
        mark_old_logprobs(_batch(False), OldLogprobs.SCORED)
