"""Secrets stay secret: with tracker keys and a Ray token in the environment of the driver and every
actor, a short RL run (checkpoints, TensorBoard, the saved policy, the metrics and the config) writes
none of them into any file it makes, nor into the driver's output or the Ray workers' logs; and
`runtime_env_vars()` (what is handed to actors and jobs) carries no secret."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_ray.data.synthetic import write_task
from rlhf_ray.runtime import runtime_env_vars
from tests.test_ppo_e2e import tiny_rl_config

SECRETS = {
    "WANDB_API_KEY": "wandb-fake-secret-7f3a9c21e4",
    "HF_TOKEN": "hf_fakeSecretToken5b8d0e",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-fake-secret-93ab",
    "AWS_SECRET_ACCESS_KEY": "aws-fake-secret-k2j4h6",
    "RAY_AUTH_TOKEN": "rayfaketoken0c9d8e7f6a5b4c3d2e1f",
}
SECRET_NAME = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD)(_|$)")


RUN = textwrap.dedent(
    """
    import json, os, sys
    import ray
    from rlhf_ray.config import RLHFConfig
    from rlhf_ray.runtime import setup_process_env
    from rlhf_ray.trainer.ppo import PPOTrainer
    from tests.ray_fixtures import start_local_ray

    setup_process_env()
    start_local_ray()
    seen = ray.get(ray.remote(lambda: os.environ.get("WANDB_API_KEY")).remote(), timeout=300)
    seen = seen is not None and seen == os.environ["WANDB_API_KEY"]  # never print the value itself
    trainer = PPOTrainer(RLHFConfig.from_dict(json.loads(sys.argv[1])))
    try:
        summary = trainer.fit()
    finally:
        trainer.shutdown()
    session = ray._private.worker._global_node.get_session_dir_path()
    ray.shutdown()
    print("RESULT " + json.dumps({"session": session, "step": summary["step"], "actor_saw": seen}))
    """
)


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
def test_a_run_writes_no_secret_anywhere(tiny_model_dir, tmp_path):
    """The run is its own process (driver, its Ray cluster and every actor carry the secrets), so that
    the secrets, the fake Ray token above all, never reach this test process's later Ray sessions."""
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
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(cfg.to_dict())],
        cwd=root,
        env={**os.environ, **SECRETS, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["actor_saw"] is True  # the actors had the secrets: the search below is not vacuous
    assert result["step"] == 2

    written = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"metrics.jsonl", "config.yaml", "manifest.json", "driver_state.json", "config.json"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in written)
    assert files_with_secrets(out) == {}
    for name, value in SECRETS.items():
        assert value not in proc.stdout and value not in proc.stderr, name
    logs = Path(result["session"]) / "logs"
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
