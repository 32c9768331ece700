"""Placement layouts: bundles per role for separate and colocated modes; over-asking fails clearly; inside
a placement group made for the run (a Tune trial's) the roles fill its bundles instead of a new group."""

from __future__ import annotations

import pytest
import ray
from ray.util.placement_group import (
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.placement import PlacementError, check_fits, layout, plan_placement
from rlhf_ray.config import RLHFConfig


def cfg(**over) -> RLHFConfig:
    base = {"trainer": {"num_ranks": 2}, "rollout": {"num_engines": 2}, "algorithm": {"mini_batch_size": 8}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return RLHFConfig.from_dict(base)


def test_separate_gives_every_actor_its_bundle():
    bundles, slots = layout(cfg(placement={"policy": {"num_gpus": 1}}), need_critic=True)
    assert len(bundles) == 2 + 2 + 1 + 2 + 1  # policy, rollout, reference, critic, reward
    indices = [idx for role in slots.values() for idx, _, _ in role]
    assert sorted(indices) == list(range(len(bundles)))
    assert all(share == 1.0 for role in slots.values() for _, share, _ in role)
    assert bundles[slots["policy"][0][0]] == {"CPU": 1.0, "GPU": 1.0}


def test_colocate_shares_policy_bundles():
    c = cfg(placement={"mode": "colocate", "policy": {"num_cpus": 2, "num_gpus": 1}})
    bundles, slots = layout(c, need_critic=False)
    assert len(bundles) == 2 + 1  # two shared policy bundles + reward
    policy_bundles = [idx for idx, _, _ in slots["policy"]]
    assert [idx for idx, _, _ in slots["rollout"]] == policy_bundles
    assert slots["reference"][0][0] == policy_bundles[0]
    # bundle 0 holds policy rank 0, engine 0 and the reference: a third each; bundle 1 halves
    assert slots["policy"][0][1] == pytest.approx(1 / 3)
    assert slots["policy"][1][1] == pytest.approx(1 / 2)
    for role in ("policy", "rollout", "reference"):
        for idx, share, res in slots[role]:
            assert res.num_gpus * share <= bundles[idx]["GPU"]


def test_separate_gives_each_reference_and_reward_actor_its_bundle():
    groups = {"reference": {"num_actors": 2, "num_cpus": 2}, "reward": {"num_actors": 2, "num_gpus": 1}}
    bundles, slots = layout(cfg(placement=groups), need_critic=False)
    # policy ranks 0-1, engines 2-3, reference actors 4-5, reward actors 6-7, in actor order
    assert len(bundles) == 8
    assert [(idx, share) for idx, share, _ in slots["reference"]] == [(4, 1.0), (5, 1.0)]
    assert [(idx, share) for idx, share, _ in slots["reward"]] == [(6, 1.0), (7, 1.0)]
    assert bundles[4] == bundles[5] == {"CPU": 2.0}
    assert bundles[6] == bundles[7] == {"CPU": 1.0, "GPU": 1.0}


def test_colocate_puts_reference_actor_j_on_policy_rank_j():
    c = cfg(
        placement={
            "mode": "colocate",
            "policy": {"num_cpus": 2, "num_gpus": 1},
            "reference": {"num_actors": 3},
            "reward": {"num_actors": 2},
        }
    )
    bundles, slots = layout(c, need_critic=True)
    # bundles: ranks' 0-1 (each: rank, engine, reference actor), reference actor 2's own, critic 3-4,
    # reward 5-6
    assert bundles == [
        {"CPU": 2.0, "GPU": 1.0},
        {"CPU": 2.0, "GPU": 1.0},
        {"CPU": 1.0},
        {"CPU": 1.0},
        {"CPU": 1.0},
        {"CPU": 1.0},
        {"CPU": 1.0},
    ]
    third = pytest.approx(1 / 3)
    assert [(idx, share) for idx, share, _ in slots["policy"]] == [(0, third), (1, third)]
    assert [(idx, share) for idx, share, _ in slots["rollout"]] == [(0, third), (1, third)]
    assert [(idx, share) for idx, share, _ in slots["reference"]] == [(0, third), (1, third), (2, 1.0)]
    assert [idx for idx, _, _ in slots["critic"]] == [3, 4]
    assert [(idx, share) for idx, share, _ in slots["reward"]] == [(5, 1.0), (6, 1.0)]
    # a shared reference actor takes its share of the policy's bundle, its own one the reference's resources
    (_, _, shared_res), _, (_, _, own_res) = slots["reference"]
    assert shared_res is c.placement.policy and own_res is c.placement.reference


def test_check_fits_names_the_shortfall():
    bundles, _ = layout(cfg(placement={"rollout": {"num_gpus": 1}}), need_critic=False)
    with pytest.raises(PlacementError, match="GPU: needs 2, cluster has 0"):
        check_fits(bundles, {"CPU": 64.0})
    check_fits(bundles, {"CPU": 64.0, "GPU": 2.0})


# ---- inside a placement group made for us (a Ray Tune trial's) ------------------------------------------
@ray.remote(num_cpus=0)
def _plan_inside(c: RLHFConfig) -> dict:
    """What a trial's driver does: plan the roles while running in the trial's placement group."""
    plan = plan_placement(c, need_critic=False)
    options = [*plan.policy, *plan.rollout, *plan.reference, *plan.reward]
    current = get_current_placement_group()
    out = {
        "owned": plan.owned,
        "same_group": plan.placement_group.id == current.id,
        "indices": [o["scheduling_strategy"].placement_group_bundle_index for o in options],
    }
    plan.remove()  # must leave the trial's group alone
    return out


@pytest.mark.slow
def test_plan_uses_the_current_placement_group(ray_local):
    c = cfg(trainer={"num_ranks": 2}, rollout={"num_engines": 1})
    bundles, _ = layout(c, need_critic=False)
    pg = placement_group([{"CPU": 1}, *bundles])  # bundle 0: the trial's driver, as Tune lays it out
    ray.get(pg.ready(), timeout=60)
    try:
        inside = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        out = ray.get(_plan_inside.options(scheduling_strategy=inside).remote(c), timeout=60)
        assert out["owned"] is False and out["same_group"] is True
        # policy ranks, engine, reference, reward in the bundles after the driver's, in layout order
        assert out["indices"] == [1, 2, 3, 4, 5]
        assert placement_group_table(pg)["state"] == "CREATED"  # remove() did not free the trial's group

        wrong = placement_group([{"CPU": 1}, {"CPU": 1}])  # too few bundles for the roles
        ray.get(wrong.ready(), timeout=60)
        try:
            strategy = PlacementGroupSchedulingStrategy(wrong, placement_group_bundle_index=0)
            with pytest.raises(PlacementError, match="does not end with the 5 bundles"):
                ray.get(_plan_inside.options(scheduling_strategy=strategy).remote(c), timeout=60)
        finally:
            remove_placement_group(wrong)
    finally:
        remove_placement_group(pg)


@pytest.mark.slow
def test_plan_outside_a_group_makes_and_removes_its_own(ray_local):
    c = cfg(trainer={"num_ranks": 2}, rollout={"num_engines": 1})
    plan = plan_placement(c, need_critic=False)
    pg = plan.placement_group
    assert plan.owned and placement_group_table(pg)["state"] == "CREATED"
    assert [o["scheduling_strategy"].placement_group_bundle_index for o in plan.policy] == [0, 1]
    plan.remove()
    assert placement_group_table(pg)["state"] == "REMOVED"
