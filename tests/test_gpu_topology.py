"""The GPU layouts users run, proven on CPU with Ray's simulated GPUs.

A `ray.cluster_utils.Cluster` node may declare GPUs it does not have: Ray's placement, its GPU assignment
and the `CUDA_VISIBLE_DEVICES` it sets are real; only CUDA is absent. For each documented layout (one node
x 8 GPUs separate, 2 x 8 trainer nodes with 16 ranks beside a rollout node, colocated) a probe actor is
started with exactly the `.options()` the placement code gives each role, and reports what its process
sees. The device, `LOCAL_RANK` and backend each rank would take are then decided by the same pure functions
the roles call (`rlhf_ray.runtime.choose_device`, `device_local_rank`, `actors.worker_group.node_local_ranks`)
with CUDA taken as present: what CUDA itself does with them only a GPU machine can show
(`python -m bench.gpu_check`).

The cluster: a CPU-only head (where the driver runs, as in every documented multi-node layout), two
trainer nodes of 8 GPUs and a rollout node of 4, told apart by custom resources.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import ray
import torch

from actors import role_id
from actors.placement import PlacementError, plan_placement
from actors.role_id import RoleId
from actors.worker_group import node_local_ranks
from rlhf_ray.config import RLHFConfig
from rlhf_ray.runtime import choose_device, device_local_rank

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@ray.remote(num_cpus=0)
class Probe:
    """What a role's process is given: its GPU ids, its CUDA_VISIBLE_DEVICES, its node."""

    def report(self) -> dict[str, Any]:
        return {
            "gpu_ids": [int(g) for g in ray.get_gpu_ids()],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node": ray.get_runtime_context().get_node_id(),
        }


def _cfg(**sections: Any) -> RLHFConfig:
    base = {
        "algorithm": {"estimator": "grpo", "mini_batch_size": 16},
        "run": {"prompts_per_step": 16},
        "reward": {"kind": "rule", "function": "rlhf_ray.data.synthetic:gold_reward"},
    }
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value
    return RLHFConfig.from_dict(base)


def _probe(cfg: RLHFConfig) -> dict[RoleId, list[dict[str, Any]]]:
    """Every role's actors as probes on the plan's bundles; each report gains the node-local rank, the
    LOCAL_RANK and the device the role would take."""
    plan = plan_placement(cfg, timeout_s=60)
    try:
        roles = [role_id.POLICY, role_id.ROLLOUT_ENGINES, role_id.REFERENCE, role_id.REWARD]
        refs = {r: [Probe.options(**o).remote().report.remote() for o in plan.options_of(r)] for r in roles}
        reports = {r: ray.get(v, timeout=120) for r, v in refs.items()}
    finally:
        plan.remove()
    for group in reports.values():
        for rep, (node_rank, _) in zip(group, node_local_ranks([g["node"] for g in group])):
            visible = rep["visible"].split(",") if rep["visible"] else []
            rep["node_rank"] = node_rank
            rep["local_rank"] = device_local_rank(rep["gpu_ids"], node_rank)
            rep["device"] = choose_device(rep["gpu_ids"], True, rep["local_rank"], len(visible))
    return reports


@pytest.fixture(scope="module")
def gpu_cluster():
    from tests.ray_fixtures import local_cluster

    with local_cluster(num_cpus=4, num_gpus=0) as cluster:  # the driver's head: no GPU
        nodes = {
            "trainer_a": cluster.add_node(num_cpus=8, num_gpus=8, resources={"trainer": 8}),
            "trainer_b": cluster.add_node(num_cpus=8, num_gpus=8, resources={"trainer": 8}),
            "rollout": cluster.add_node(num_cpus=4, num_gpus=4, resources={"rollout": 4}),
        }
        cluster.wait_for_nodes()
        yield {name: node.node_id for name, node in nodes.items()}


def _on(resource: str, gpus: float = 1.0) -> dict[str, Any]:
    return {"num_cpus": 0.5, "num_gpus": gpus, "resources": {resource: 1}}


def _gpu(rep: dict[str, Any]) -> tuple[str, int]:
    (gpu,) = rep["gpu_ids"]
    return rep["node"], gpu


def _assert_gpu_rank(rep: dict[str, Any]) -> None:
    """A rank given one GPU sees exactly it, is cuda:0 in its own view and carries LOCAL_RANK 0 (DeepSpeed
    puts ZeRO-3 parameters on cuda:LOCAL_RANK)."""
    (gpu,) = rep["gpu_ids"]
    assert rep["visible"] == str(gpu)
    assert rep["local_rank"] == 0
    assert rep["device"] == torch.device("cuda", 0)


def test_one_node_of_eight_gpus_separate(gpu_cluster):
    cfg = _cfg(
        trainer={"num_ranks": 4},
        rollout={"num_engines": 2},
        placement={
            "strategy": "STRICT_PACK",
            "policy": _on("trainer"),
            "rollout": _on("trainer"),
            "reference": {**_on("trainer"), "num_actors": 2},  # each scores half the batch
            "reward": {"num_cpus": 0.5},  # a rule: no GPU, no model
        },
    )
    reports = _probe(cfg)
    assert len(reports[role_id.REFERENCE]) == 2
    gpu_roles = [
        r for role in (role_id.POLICY, role_id.ROLLOUT_ENGINES, role_id.REFERENCE) for r in reports[role]
    ]
    assert len({r["node"] for r in gpu_roles}) == 1  # the whole layout on one 8-GPU node
    assert len({_gpu(r) for r in gpu_roles}) == 8  # 4 ranks + 2 engines + 2 reference actors: a GPU each
    for rep in gpu_roles:
        _assert_gpu_rank(rep)
    assert [r["node_rank"] for r in reports[role_id.POLICY]] == [0, 1, 2, 3]
    (reward,) = reports[role_id.REWARD]
    assert reward["gpu_ids"] == [] and reward["device"] == torch.device("cpu")


def test_two_trainer_nodes_of_eight_and_a_rollout_node(gpu_cluster):
    cfg = _cfg(
        trainer={"num_ranks": 16},
        rollout={"num_engines": 2},
        placement={
            "policy": _on("trainer"),
            "rollout": _on("rollout"),
            "reference": _on("rollout"),
            "reward": {"num_cpus": 0.5},
        },
    )
    reports = _probe(cfg)
    policy = reports[role_id.POLICY]
    per_node = Counter(r["node"] for r in policy)
    assert per_node == {gpu_cluster["trainer_a"]: 8, gpu_cluster["trainer_b"]: 8}
    # one NCCL world of 16 ranks: no two on one GPU; node-local ranks 0-7 on each node
    assert len({_gpu(r) for r in policy}) == 16
    for node in per_node:
        assert sorted(r["node_rank"] for r in policy if r["node"] == node) == list(range(8))
    for rep in policy:
        _assert_gpu_rank(rep)
    # the broadcast group (policy rank 0 + each engine): every member on a GPU of its own
    engines = reports[role_id.ROLLOUT_ENGINES]
    assert all(r["node"] == gpu_cluster["rollout"] for r in engines + reports[role_id.REFERENCE])
    assert len({_gpu(policy[0]), *map(_gpu, engines)}) == 1 + len(engines)
    for rep in engines + reports[role_id.REFERENCE]:
        _assert_gpu_rank(rep)


def test_colocated_roles_share_the_policy_ranks_gpus(gpu_cluster):
    cfg = _cfg(
        trainer={"num_ranks": 8},
        rollout={"num_engines": 8},
        placement={
            "mode": "colocate",
            "policy": _on("trainer"),
            "reference": {"num_actors": 8},
            "reward": {"num_cpus": 0.5},
        },
    )
    reports = _probe(cfg)
    policy, engines = reports[role_id.POLICY], reports[role_id.ROLLOUT_ENGINES]
    assert len({r["node"] for r in policy}) == 1  # a rank's bundle holds its engine too, all on one node
    assert len({_gpu(r) for r in policy}) == 8
    for rank, engine in zip(policy, engines):
        assert _gpu(engine) == _gpu(rank)  # engine i on policy rank i's GPU, a fraction of it each
        _assert_gpu_rank(engine)
    for rank, ref in zip(policy, reports[role_id.REFERENCE], strict=True):
        assert _gpu(ref) == _gpu(rank)  # reference actor i on policy rank i's GPU too
        _assert_gpu_rank(ref)
    (reward,) = reports[role_id.REWARD]
    assert reward["device"] == torch.device("cpu")


def test_a_model_role_without_gpus_is_refused_unless_on_purpose(gpu_cluster):
    placement = {"policy": _on("trainer"), "rollout": _on("rollout"), "reference": {"num_cpus": 0.5}}
    with pytest.raises(PlacementError, match=r"placement\.reference\.num_gpus=0.*allow_cpu"):
        _probe(_cfg(placement=placement))
    placement["reference"] = {"num_cpus": 0.5, "allow_cpu": True}
    (ref,) = _probe(_cfg(placement=placement))[role_id.REFERENCE]
    assert ref["gpu_ids"] == [] and ref["device"] == torch.device("cpu")


def test_job_start_checks_the_memory_plan_on_gpu_clusters(gpu_cluster):
    """`jobs.ppo` runs `jobs.plan.check_at_start` before any role: the 7B colocated config on 24 GiB GPUs is
    refused there, on 80 GiB it passes; the GPUs' size is measured by a task on one (None here: Ray's
    simulated GPUs have no CUDA behind them, so a job would log that it skipped the plan)."""
    from pathlib import Path

    from jobs.plan import check_at_start, gpu_memory_of_cluster
    from rlhf_ray.memory_plan import MemoryPlanError

    config = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "gpu_1x8_colocate.yaml"
    cfg = RLHFConfig.from_yaml(config)
    with pytest.raises(
        MemoryPlanError,
        match=r"node0:gpu0 .*policy\[0\], rollout\[0\], reference\[0\] need .* of 24\.0 GiB\. To fit: trainer\.",
    ):
        check_at_start(cfg, gpu_memory_gib=24)
    plan = check_at_start(cfg, gpu_memory_gib=80)
    assert plan is not None and len(plan.gpus) == 8  # 8 GPUs to a node: the busiest node's count
    assert gpu_memory_of_cluster(timeout_s=60) is None
