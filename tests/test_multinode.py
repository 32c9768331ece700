"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`: a head and two worker raylets), each
worker with a custom resource; `placement.<role>.resources` pins the policy ranks to one node and the
rollout engine, reference and reward to the other. Three RL steps run, and each actor reports the node
it ran on (from inside the actor), which must be the node the config asked for.
"""

from __future__ import annotations

import pytest
import ray

from rlhf_ray.config import RLHFConfig
from rlhf_ray.data.synthetic import write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import PPOTrainer
from tests.ray_fixtures import local_cluster

pytestmark = pytest.mark.slow

STORE = 256 * 1024**2


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU: the driver's node), a trainer node and a rollout node, all local raylets."""
    with local_cluster(num_cpus=1, object_store_memory=STORE) as c:
        trainer = c.add_node(num_cpus=2, resources={"trainer_node": 2}, object_store_memory=STORE)
        rollout = c.add_node(num_cpus=3, resources={"rollout_node": 3}, object_store_memory=STORE)
        c.wait_for_nodes()
        yield {"head": c.head_node.node_id, "trainer": trainer.node_id, "rollout": rollout.node_id}


def node_of(actor) -> str:
    """The node an actor runs on, asked inside the actor itself."""
    return ray.get(
        actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60
    )


def test_roles_run_where_the_config_pins_them(cluster, tiny_model_dir, tmp_path):
    task = write_task(tmp_path / "task", seed=0, n_demos=10, n_train_prompts=64, n_eval_prompts=8)
    on_trainer = {"num_cpus": 1, "resources": {"trainer_node": 1}}
    on_rollout = {"num_cpus": 1, "resources": {"rollout_node": 1}}
    cfg = RLHFConfig.from_dict(
        {
            "model": {"policy_path": str(tiny_model_dir), "dtype": "float32"},
            "data": {"train_path": str(task["prompts"]), "max_prompt_len": 16},
            "rollout": {
                "engine": "vllm",
                "max_new_tokens": 8,
                "samples_per_prompt": 4,
                "kv_cache_gib": 0.125,
            },
            "algorithm": {"estimator": "grpo", "mini_batch_size": 32},
            "trainer": {"num_ranks": 2, "zero_stage": 2, "lr": 2e-3, "micro_batch_size": 16},
            "placement": {
                "strategy": "PACK",
                "policy": on_trainer,
                "rollout": on_rollout,
                "reference": on_rollout,
                "reward": on_rollout,
            },
            "reward": {"kind": "rule", "function": "rlhf_ray.data.synthetic:digit_shaped_reward"},
            "run": {
                "output_dir": str(tmp_path / "run"),
                "total_steps": 3,
                "prompts_per_step": 8,
                "call_timeout_s": 600,
            },
            "logging": {"tensorboard": False, "progress_bar": False},
            "checkpoint": {"interval": 0},
        }
    )
    trainer = PPOTrainer(cfg)
    try:
        trainer.start()
        roles = trainer.roles
        policy_nodes = ray.get(roles.policy.group.call("node_id"), timeout=60)
        placed = {
            "policy rank 0": policy_nodes[0],
            "policy rank 1": policy_nodes[1],
            "rollout engine": node_of(roles.engines[0]),
            "reference": node_of(roles.reference[0]),
            "reward": node_of(roles.reward[0]),
        }
        summary = trainer.fit()
    finally:
        trainer.shutdown()
    names = {v: k for k, v in cluster.items()}
    print({role: names.get(node, node) for role, node in placed.items()})
    assert len(set(cluster.values())) == 3
    assert placed["policy rank 0"] == placed["policy rank 1"] == cluster["trainer"]
    for role in ("rollout engine", "reference", "reward"):
        assert placed[role] == cluster["rollout"], role
    # and the run trained across the two nodes: three steps, weights synced back to the engine each time
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(r["rollout_vs_trainer_logprob_diff"] for r in rows) < 1e-3
    assert summary["step"] == 3
