"""Resume is exact: an RL run interrupted and resumed from its checkpoint ends where the uninterrupted run
ends, bit for bit — every metric that is not a wall-clock time, step by step (evaluations included), and
every tensor of the final policy. Same-seed runs are already identical (`test_reproducible`), so any
difference here is state that a checkpoint failed to carry: the trainers' weights, optimiser and shuffle
position, the data position, the adaptive KL coefficient, the reward normaliser.

One uninterrupted reference run (module fixture) is compared with three interrupted ones:
- the driver stops after step 3 and a new `PPOTrainer` on the same output dir resumes from step 2;
- the same stopped run finished by the job's own entry point (`python -m jobs.ppo`, a new driver
  process joining the cluster, as a resubmitted `ray job submit` would);
- a policy rank killed after step 3: recovery rolls the run back to step 2 and does steps 3-4 again.
The config uses the adaptive KL controller with the penalty in the reward and the reward normaliser (both
change the advantages), several shuffled mini-batches per step and a learning-rate warm-up, so a resume
that lost any of that state would show.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from rlhf_ray import batch as batch_module
from rlhf_ray.data.synthetic import write_task
from rlhf_ray.metrics import read_metrics
from rlhf_ray.trainer.ppo import STATE_FILE, PPOTrainer
from tests.test_faults import kill
from tests.test_ppo_e2e import tiny_rl_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WALL_CLOCK = ("time/", "tokens_per_s")  # every other metric is a function of the seed and the config
STEPS, INTERVAL, STOP_AFTER = 4, 2, 3  # checkpoints at steps 2 and 4; the interruption after step 3
KL_TARGET, KL_HORIZON = 0.05, 32  # 32 samples per step: the coefficient moves by up to 20% a step


class Interrupt(Exception):
    """Stands for a driver that died between steps."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(
        tmp_path_factory.mktemp("task"), seed=0, n_demos=10, n_train_prompts=200, n_eval_prompts=8
    )


def resume_config(model_dir, task, out):
    return tiny_rl_config(
        model_dir,
        task,
        out,
        algorithm={
            "estimator": "grpo",
            "kl_coef": 0.05,
            "kl_target": KL_TARGET,
            "kl_horizon": KL_HORIZON,
            "kl_in": "reward",  # the coefficient enters the advantages (not only a loss term)
            "normalize_reward": True,
            # 2 epochs of 2 mini-batches: 4 optimiser steps per RL step, in an order each rank draws from
            # (seed, its call count, epoch), under a warm-up that spans the run: the shuffle position and
            # the scheduler's state matter after a resume too
            "ppo_epochs": 2,
            "mini_batch_size": 16,
        },
        trainer={"num_ranks": 2, "zero_stage": 2, "lr": 2e-3, "micro_batch_size": 8, "warmup_steps": 16},
        run={"total_steps": STEPS, "eval_prompts": 8, "eval_interval": INTERVAL, "seed": 3},
        checkpoint={"interval": INTERVAL, "keep_last": 2},
        logging={"progress_bar": False, "tensorboard": False},
    )


def train(cfg, on_step=None) -> dict:
    trainer = PPOTrainer(cfg)
    try:
        return trainer.fit(on_step=on_step)
    finally:
        trainer.shutdown()


@pytest.fixture(scope="module")
def reference(ray_local, tiny_model_dir, task, tmp_path_factory) -> Path:
    """The uninterrupted run: its output dir. The driver moved references only: no Batch was ever
    deserialised in this process."""
    out = tmp_path_factory.mktemp("reference")
    before = batch_module.REBUILDS["count"]
    train(resume_config(tiny_model_dir, task, out))
    assert batch_module.REBUILDS["count"] == before
    return out


@pytest.fixture(scope="module")
def interrupted(ray_local, tiny_model_dir, task, tmp_path_factory) -> Path:
    """The same run, its driver stopped after step 3 (the newest checkpoint is step 2's): its output dir,
    which tests copy before resuming."""
    out = tmp_path_factory.mktemp("interrupted")

    def stop(step: int, metrics: dict) -> None:
        if step == STOP_AFTER:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(resume_config(tiny_model_dir, task, out), on_step=stop)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(STOP_AFTER + 1))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert not (out / "policy").exists()
    return out


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def assert_same_run(out: Path, ref: Path, ignore: tuple[str, ...] = ()) -> None:
    """metrics.jsonl row by row (the same steps, each once; every non-timing key equal) and every tensor
    of the final policy equal."""
    skip = WALL_CLOCK + ignore
    rows, ref_rows = read_metrics(out / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(STEPS + 1))
    for row, ref_row in zip(rows, ref_rows, strict=True):
        keys = sorted(k for k in row if not k.startswith(skip))
        assert keys == sorted(k for k in ref_row if not k.startswith(skip)), row["step"]
        differing = {k: (row[k], ref_row[k]) for k in keys if not same(row[k], ref_row[k])}
        assert not differing, f"step {row['step']}: {differing}"
    evals = [r["step"] for r in rows if "eval/gold" in r]
    assert evals == [0, 2, 4]  # the evaluations, compared above with the rest of their rows
    files = sorted(p.name for p in (ref / "policy").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (out / "policy").glob("*.safetensors"))
    for name in files:
        got, want = load_file(out / "policy" / name), load_file(ref / "policy" / name)
        assert got.keys() == want.keys()
        unequal = [k for k in want if not torch.equal(got[k], want[k])]
        assert not unequal, f"{name}: tensors differ from the uninterrupted run's: {unequal}"


@pytest.mark.timeout(1200)
def test_resumed_run_equals_the_uninterrupted_one(tiny_model_dir, task, reference, interrupted, tmp_path):
    out = copy_of(interrupted, tmp_path / "run")
    state = json.loads((out / "checkpoints" / "step-00000002" / STATE_FILE).read_text())
    # the step-2 checkpoint carries the driver's state, the normaliser's after 2 steps of 32 samples
    assert state["step"] == 2 and state["normalizer"]["count"] == 64
    summary = train(resume_config(tiny_model_dir, task, out))
    assert summary["step"] == STEPS and summary["restarts"] == 0
    assert_same_run(out, reference)


def test_adaptive_kl_coefficient_moves_toward_its_target(reference):
    """Ziegler et al.'s controller: after each step the coefficient grows if the measured KL was above
    the target and shrinks if below (by at most 20% here), so the KL is pushed toward the target."""
    rows = [r for r in read_metrics(reference / "metrics.jsonl") if "kl_coef" in r]
    assert len(rows) == STEPS and rows[0]["kl_coef"] == 0.05
    for before, after in itertools.pairwise(rows):
        error = min(max(before["kl"] / KL_TARGET - 1, -0.2), 0.2)
        assert error != 0
        assert (after["kl_coef"] > before["kl_coef"]) == (before["kl"] > KL_TARGET), (before, after)
        assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error * 32 / KL_HORIZON), rel=1e-12)
    print("kl:", [round(r["kl"], 4) for r in rows], "kl_coef:", [round(r["kl_coef"], 4) for r in rows])


@pytest.mark.timeout(1200)
def test_resubmitted_job_equals_the_uninterrupted_run(reference, interrupted, tmp_path):
    """The stopped run finished by the job's entry point, `python -m jobs.ppo --config <its config.yaml>`,
    in a new driver process that joins this module's cluster (what a resubmitted Ray job does)."""
    out = copy_of(interrupted, tmp_path / "run")
    address = ray.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "jobs.ppo",
        "--config",
        str(out / "config.yaml"),  # the resolved config the run wrote, as a user would resubmit it
        "--address",
        address,
        f"run.output_dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "resumed from" in proc.stderr and "step-00000002" in proc.stderr
    assert_same_run(out, reference)


@pytest.mark.timeout(1200)
def test_run_rolled_back_by_recovery_equals_the_uninterrupted_one(tiny_model_dir, task, reference, tmp_path):
    """A policy rank killed after step 3: step 4's update meets the dead rank, the worker group is rebuilt
    and the run goes back to the step-2 checkpoint, then does steps 3 and 4 again."""
    out = tmp_path / "run"
    trainer = PPOTrainer(resume_config(tiny_model_dir, task, out))
    killed: list[int] = []

    def on_step(step: int, metrics: dict) -> None:
        if step == STOP_AFTER and not killed:
            killed.append(step)
            kill(trainer.roles.policy.group.actors[1])

    try:
        summary = trainer.fit(on_step=on_step)
    finally:
        trainer.shutdown()
    assert killed and summary["restarts"] == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert [r.get("faults/restarts") for r in rows] == [None, 0, 0, 1, 1]  # steps 3 and 4 were done again
    assert_same_run(out, reference, ignore=("faults/",))
