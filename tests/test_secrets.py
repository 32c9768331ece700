"""Secrets stay secret: with tracker keys and a Ray token in the environment of the driver and every
actor, a short RL run (checkpoints, TensorBoard, the saved policy, the metrics and the config) writes
none of them into any file it makes, nor into the driver's output or the Ray workers' logs; and
`runtime_env_vars()` (what is handed to actors and jobs) carries no secret."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import ray

from rlhf_ray.data.synthetic import write_task
from rlhf_ray.runtime import runtime_env_vars
from rlhf_ray.trainer.ppo import PPOTrainer
from tests.ray_fixtures import start_local_ray
from tests.test_ppo_e2e import tiny_rl_config

SECRETS = {
    "WANDB_API_KEY": "wandb-fake-secret-7f3a9c21e4",
    "HF_TOKEN": "hf_fakeSecretToken5b8d0e",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-fake-secret-93ab",
    "AWS_SECRET_ACCESS_KEY": "aws-fake-secret-k2j4h6",
    "RAY_AUTH_TOKEN": "rayfaketoken0c9d8e7f6a5b4c3d2e1f",
}
SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD)(_|$)")


@pytest.fixture(scope="module")
def ray_with_secrets():
    """A private Ray cluster started with the secrets in the environment, so every actor inherits them."""
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    try:
        start_local_ray()
        try:
            yield Path(ray._private.worker._global_node.get_session_dir_path())
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def files_with_secrets(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits = [name for name, value in SECRETS.items() if value.encode() in data]
            if hits:
                found[str(path)] = hits
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_writes_no_secret_anywhere(ray_with_secrets, tiny_model_dir, tmp_path, capfd):
    session_dir = ray_with_secrets
    task = write_task(tmp_path / "task", seed=0, n_demos=10, n_train_prompts=50, n_eval_prompts=4)
    out = tmp_path / "run"
    cfg = tiny_rl_config(
        tiny_model_dir,
        task,
        out,
        run={"total_steps": 2, "eval_prompts": 4},
        checkpoint={"interval": 1},
        logging={"tensorboard": True, "progress_bar": True},
    )
    # The actors do see the secrets (so the check below is not vacuous).
    probe = ray.remote(lambda: os.environ.get("WANDB_API_KEY"))
    assert ray.get(probe.remote(), timeout=120) == SECRETS["WANDB_API_KEY"]

    trainer = PPOTrainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        trainer.shutdown()

    written = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"metrics.jsonl", "config.yaml", "manifest.json", "driver_state.json", "config.json"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in written)
    assert summary["step"] == 2
    assert files_with_secrets(out) == {}

    captured = capfd.readouterr()
    for name, value in SECRETS.items():
        assert value not in captured.out and value not in captured.err, name
    logs = session_dir / "logs"
    assert any(logs.rglob("worker-*.out")), "no worker logs to check"
    assert files_with_secrets(logs) == {}


def test_runtime_env_vars_carry_no_secret(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    env = runtime_env_vars()
    assert env, "runtime_env_vars() is empty"
    secret_like = [k for k in env if SECRET_NAME.search(k.upper())]
    assert secret_like == []
    assert not set(SECRETS.values()) & set(env.values())
