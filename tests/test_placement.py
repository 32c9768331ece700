"""Placement layouts: bundles per role for separate and colocated modes; over-asking fails clearly."""

from __future__ import annotations

import pytest

from actors.placement import PlacementError, check_fits, layout
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


def test_check_fits_names_the_shortfall():
    bundles, _ = layout(cfg(placement={"rollout": {"num_gpus": 1}}), need_critic=False)
    with pytest.raises(PlacementError, match="GPU: needs 2, cluster has 0"):
        check_fits(bundles, {"CPU": 64.0})
    check_fits(bundles, {"CPU": 64.0, "GPU": 2.0})
