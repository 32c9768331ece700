"""Faults the RL run survives, on real Ray actors and the tiny model.

One run takes three kills: a rollout engine (the engine is restarted with the policy's current weights and
the step is retried), a policy rank (the worker group is rebuilt and the run rolls back to its last
checkpoint by itself), then the reward actor once the restart budget (`run.max_restarts`) is spent (the
run gives up with a message naming the dead role and the checkpoint to resume from). Separately, a
process killed while writing a checkpoint leaves the previous one loadable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ray

from rlhf_ray.checkpoint import CheckpointManager
from rlhf_ray.data.synthetic import write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import PPOTrainer
from rlhf_ray.trainer.recovery import RecoveryError, drop_rows_after
from rlhf_ray.trainer.roles import RoleDied, RoleTimeout, wait_for
from tests.test_ppo_e2e import tiny_rl_config

TIMING = ("time/", "tokens_per_s", "faults/")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=200, n_eval_prompts=8
    )


def kill(actor) -> None:
    """`ray.kill`, then wait until the actor is really gone (the kill is asynchronous)."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{actor} still answers 60 s after ray.kill")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_engine_and_rank_deaths_are_survived_then_the_run_gives_up(ray_local, tiny_model_dir, task, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_rl_config(
        tiny_model_dir,
        task,
        out,
        run={"total_steps": 8, "eval_prompts": 0, "max_restarts": 2},
        checkpoint={"interval": 3, "keep_last": 2},
    )
    trainer = PPOTrainer(cfg)
    seen: list[tuple[int, dict]] = []
    killed: list[str] = []

    def on_step(step: int, metrics: dict) -> None:
        seen.append((step, dict(metrics)))
        roles = trainer.roles
        if step == 2 and "engine" not in killed:  # between steps: step 3's generation meets a dead engine
            killed.append("engine")
            kill(roles.engines[0])
        elif step == 4 and "rank" not in killed:  # the last checkpoint is step 3
            killed.append("rank")
            kill(roles.policy.group.actors[1])
        elif step == 5 and "reward" not in killed:  # a third failure: past run.max_restarts=2
            killed.append("reward")
            kill(roles.reward[0])

    try:
        with pytest.raises(RecoveryError) as info:
            trainer.fit(on_step=on_step)
    finally:
        trainer.shutdown()

    message = str(info.value)
    for needle in ("gave up at step 6", "run.max_restarts=2", "reward model", "step-00000003", "resumes"):
        assert needle in message, (needle, message)

    # Every step appears once in the metrics file, the rolled-back step 4 included.
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["faults/restarts"] for r in rows] == [0, 0, 1, 2, 2]
    # The restarted engine sampled from the trainer's current weights, not the initial ones.
    assert rows[2]["rollout_vs_trainer_logprob_diff"] < 1e-3
    # Step 4 was computed twice (before the rank died and after the rollback to step 3): same numbers.
    first, redone = [m for s, m in seen if s == 4]
    compared = [k for k in first if not k.startswith(TIMING)]
    assert len(compared) > 10
    for key in compared:
        assert redone[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
    # The run's checkpoints are intact and loadable by a resumed run (same config).
    mgr = CheckpointManager(out / "checkpoints", config_hash=cfg.hash())
    assert mgr.verify(mgr.latest())["step"] == 3


@ray.remote(num_cpus=0)
class _Sleeper:
    def ping(self) -> bool:
        return True

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_waits_end_at_the_deadline_and_name_the_role(ray_local):
    """No hang: a role that does not answer fails the wait at `run.call_timeout_s`, naming the role; a
    role whose actor died fails it at once (even while a peer is still busy), naming the role."""
    slow, doomed = _Sleeper.remote(), _Sleeper.remote()
    assert ray.get(doomed.nap.remote(0), timeout=60) == 0
    start = time.perf_counter()
    with pytest.raises(RoleTimeout, match=r"no answer within 1 s from: reward model\. .*run\.call_timeout_s"):
        wait_for({"reference model": doomed.nap.remote(0), "reward model": slow.nap.remote(30)}, 1.0)
    assert time.perf_counter() - start < 10
    kill(doomed)
    start = time.perf_counter()
    with pytest.raises(RoleDied, match=r"^policy rank 1: an actor it depends on died .*ActorDiedError"):
        wait_for({"policy rank 0": slow.nap.remote(20), "policy rank 1": doomed.nap.remote(0)}, 60)
    assert time.perf_counter() - start < 10  # did not wait for the busy peer
    ray.kill(slow, no_restart=True)


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rlhf_ray.checkpoint import CheckpointManager

    mgr = CheckpointManager(sys.argv[1], keep_last=2, config_hash="h")
    def write(tmp: Path, payload: bytes) -> None:
        (tmp / "policy").mkdir()
        with (tmp / "policy" / "weights.bin").open("wb") as f:
            f.write(payload)
            f.flush()
            if payload == b"second":
                print("writing", flush=True)
                time.sleep(600)  # killed here, mid-write
    mgr.save(1, lambda tmp: write(tmp, b"first"))
    mgr.save(2, lambda tmp: write(tmp, b"second"))
    """
)


@pytest.mark.timeout(120)
def test_process_killed_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    ckpt = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(ckpt)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-step-00000002") for p in ckpt.iterdir())  # the half-written one

    mgr = CheckpointManager(ckpt, keep_last=2, config_hash="h")
    latest = mgr.latest()
    assert latest.name == "step-00000001"
    assert mgr.verify(latest)["step"] == 1
    assert (latest / "policy" / "weights.bin").read_bytes() == b"first"
    # The next save seals step 2 and clears the debris of the killed write.
    mgr.save(2, lambda tmp: (tmp / "state.json").write_text(json.dumps({"ok": True})))
    assert [p.name for p in mgr.complete()] == ["step-00000001", "step-00000002"]
    assert not any(p.name.startswith(".tmp-") for p in ckpt.iterdir())


def test_rows_of_undone_steps_are_dropped(tmp_path):
    """Going back to a checkpoint (recovery, or a resubmitted job) drops the metrics rows of the steps
    that will be done again, so every step appears once; nothing is touched when there are none."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in range(6)))
    assert drop_rows_after(path, 3) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    assert drop_rows_after(path, 3) == 0
    assert drop_rows_after(tmp_path / "absent.jsonl", 3) == 0
