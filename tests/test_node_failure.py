"""A worker node removed from the cluster in the middle of an RL run (`ray.cluster_utils.Cluster`: a head
and one worker raylet on this machine).

The head hosts the driver and the policy ranks; the worker node (custom resource `rollout_node`) hosts the
rollout engine, the reference and the reward actor, pinned there by `placement.<role>.resources`.
Removing that node kills those three roles and leaves their placement-group bundles without a node:
- a replacement node with the same resource joins while the recovery waits for it: Ray places the bundles
  there, the roles are restarted on it and the step is retried, so the run finishes with every step
  logged once;
- no node ever joins: the run stops within `run.restart_timeout_s` with a `RecoveryError` that names the
  roles, the missing resources and the checkpoint to resume from, instead of waiting forever.
The rollout engine is the HF one (`rollout.engine=hf`): what is tested is placement, not vLLM, and it starts
in a fraction of vLLM's time on two cores.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import ray

from rlhf_ray.config import RLHFConfig
from rlhf_ray.data.synthetic import write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import PPOTrainer
from rlhf_ray.trainer.recovery import RecoveryError
from tests.ray_fixtures import local_cluster

pytestmark = pytest.mark.slow

STORE = 256 * 1024**2
ROLLOUT_NODE = {"num_cpus": 3, "resources": {"rollout_node": 3}, "object_store_memory": STORE}


@pytest.fixture(scope="module")
def cluster():
    """A head node (the driver and the policy ranks: 2 CPUs, `trainer_node`); tests add worker nodes."""
    with local_cluster(num_cpus=2, resources={"trainer_node": 2}, object_store_memory=STORE) as c:
        yield c


@pytest.fixture
def rollout_node(cluster):
    """A worker node with `rollout_node` resources; every worker node left at the end is removed."""
    node = cluster.add_node(**ROLLOUT_NODE)
    cluster.wait_for_nodes()
    try:
        yield node
    finally:
        for n in list(cluster.worker_nodes):
            cluster.remove_node(n)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=64, n_eval_prompts=8
    )


def config(model_dir, task, out, **run) -> RLHFConfig:
    on_head = {"num_cpus": 1, "resources": {"trainer_node": 1}}
    on_worker = {"num_cpus": 1, "resources": {"rollout_node": 1}}
    return RLHFConfig.from_dict(
        {
            "model": {"policy_path": str(model_dir), "dtype": "float32"},
            "data": {"train_path": str(task["prompts"]), "max_prompt_len": 16},
            "rollout": {"engine": "hf", "max_new_tokens": 8, "samples_per_prompt": 4},
            "algorithm": {"estimator": "grpo", "mini_batch_size": 32},
            "trainer": {"num_ranks": 2, "zero_stage": 2, "lr": 2e-3, "micro_batch_size": 16},
            "placement": {
                "strategy": "PACK",
                "policy": on_head,
                "rollout": on_worker,
                "reference": on_worker,
                "reward": on_worker,
            },
            "reward": {"kind": "rule", "function": "rlhf_ray.data.synthetic:digit_shaped_reward"},
            "run": {
                "output_dir": str(out),
                "prompts_per_step": 8,
                "eval_prompts": 0,
                "call_timeout_s": 300,
                "max_restarts": 3,
            }
            | run,
            "logging": {"tensorboard": False, "progress_bar": False},
            "checkpoint": {"interval": 2, "keep_last": 2},
        }
    )


def node_of(actor) -> str:
    """The node an actor runs on, asked inside the actor itself."""
    return ray.get(
        actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60
    )


class LogSeen(logging.Handler):
    """Sets `event` when a record whose message contains `needle` is logged (from any thread)."""

    def __init__(self, needle: str):
        super().__init__(logging.WARNING)
        self.needle, self.event = needle, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


@pytest.mark.timeout(300)
def test_a_node_removed_mid_run_is_survived_once_a_replacement_joins(
    cluster, rollout_node, tiny_model_dir, task, tmp_path
):
    """The driver runs in a thread; the replacement node joins from this (main) thread, since
    `Cluster.add_node` must, once the driver's recovery is waiting for the lost bundles."""
    out = tmp_path / "run"
    trainer = PPOTrainer(config(tiny_model_dir, task, out, total_steps=6, restart_timeout_s=120))
    events: dict[str, float] = {}
    result: dict = {}

    def on_step(step: int, metrics: dict) -> None:
        if step == 3 and "removed" not in events:  # between steps: step 4 meets the dead roles
            cluster.remove_node(rollout_node)
            events["removed"] = time.monotonic()
        elif step == 4:
            events["step 4 done"] = time.monotonic()

    def run() -> None:
        try:
            result["summary"] = trainer.fit(on_step=on_step)
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    roles_log = logging.getLogger("rlhf_ray.trainer.roles")
    waiting, placed_again = LogSeen("placement: waiting up to"), LogSeen("placed again after")
    roles_log.addHandler(waiting)
    roles_log.addHandler(placed_again)
    driver = threading.Thread(target=run, name="driver")
    try:
        driver.start()
        while not waiting.event.wait(0.5) and driver.is_alive():
            pass
        if waiting.event.is_set():
            time.sleep(2)  # the driver keeps waiting meanwhile
            events["waiting"] = time.monotonic()
            added = cluster.add_node(**ROLLOUT_NODE)
            events["added"] = time.monotonic()
        driver.join(timeout=240)
        assert not driver.is_alive(), "the run did not finish within 240 s of the replacement"
        if "error" in result:
            raise result["error"]
        placed = {
            "rollout engine": node_of(trainer.roles.engines[0]),
            "reference": node_of(trainer.roles.reference[0]),
            "reward": node_of(trainer.roles.reward[0]),
        }
    finally:
        roles_log.removeHandler(waiting)
        roles_log.removeHandler(placed_again)
        trainer.shutdown()

    print(
        f"replacement joined {events['added'] - events['removed']:.1f} s after the removal "
        f"(add_node took {events['added'] - events['waiting']:.1f} s); step 4 done "
        f"{events['step 4 done'] - events['added']:.1f} s after it joined"
    )
    assert placed_again.event.is_set()  # the restart waited for the node, then went on
    summary = result["summary"]
    assert summary["step"] == 6 and summary["restarts"] >= 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 4 was retried, logged once
    assert rows[2]["faults/restarts"] == 0 and rows[-1]["faults/restarts"] >= 1
    assert all(node == added.node_id for node in placed.values()), placed
    assert (out / "policy" / "config.json").exists()


@pytest.mark.timeout(300)
def test_a_node_that_never_comes_back_stops_the_run_with_a_clear_error(
    cluster, rollout_node, tiny_model_dir, task, tmp_path
):
    out = tmp_path / "run"
    trainer = PPOTrainer(config(tiny_model_dir, task, out, total_steps=6, restart_timeout_s=20))
    removed: list[float] = []

    def on_step(step: int, metrics: dict) -> None:
        if step == 2 and not removed:
            cluster.remove_node(rollout_node)
            removed.append(time.monotonic())

    try:
        with pytest.raises(RecoveryError) as info:
            trainer.fit(on_step=on_step)
        stopped = time.monotonic() - removed[0]
    finally:
        trainer.shutdown()

    message = str(info.value)
    print(f"stopped {stopped:.1f} s after the removal: {message}")
    assert 20 <= stopped < 60  # waited run.restart_timeout_s for a node, not run.call_timeout_s (300 s)
    for needle in (
        "stopped at step 3",
        "could not restart rollout engine 0, reference model, reward model",
        "within 20 s (run.restart_timeout_s)",
        "rollout_node: 3",  # what is missing: the three roles' bundles
        "free in the cluster now",
        "Add a node",
        "placement.<role> resources",
        "raise run.restart_timeout_s",
        "step-00000002",  # the checkpoint a re-run resumes from
    ):
        assert needle in message, (needle, message)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
