"""`ray job submit` for real: a private Ray head (`ray start --head` on free ports, its own temp dir,
token authentication with its own token), the RL job submitted through the Job Submission API with the
checkout as `working_dir` and `cluster/runtime_env.yaml`'s excludes, then its artifacts and log checked.

Only the head this module started is stopped (its `ray start --block` process, which stops what it
started; then anything left in its process group or running from its temp dir): never `ray stop`, which
would end every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from rlhf_ray.checkpoint import CheckpointManager
from rlhf_ray.metrics import read_metrics
from rlhf_ray.runtime import runtime_env_vars

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "ray-client-server-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(pgid: int, temp_dir: str) -> list[psutil.Process]:
    """Processes of the head's group, or running from / naming its temp dir (job drivers, workers)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:  # a zombie holds nothing
                continue
            if (
                os.getpgid(p.pid) == pgid
                or p.cwd().startswith(temp_dir)
                or any(temp_dir in arg for arg in p.cmdline())
            ):
                found.append(p)
    return found


def stop_head(proc: subprocess.Popen, temp_dir: str, grace_s: float = 60.0) -> list[int]:
    """SIGTERM to `ray start --block` alone: its handler stops the processes it started (GCS, raylet,
    dashboard; the raylet its workers). SIGKILL for whatever of the head's group or temp dir is left after
    `grace_s`. Returns the pids that needed SIGKILL."""
    pgid = proc.pid  # started with start_new_session: its pid is its group id
    deadline = time.monotonic() + grace_s
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    while time.monotonic() < deadline and processes_of(pgid, temp_dir):
        time.sleep(1)
    left = processes_of(pgid, temp_dir)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return [p.pid for p in left]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of our own: 8 logical CPUs, token auth with a token file in its temp dir, dashboard
    (job API) on 127.0.0.1. `python` in a job's entrypoint is this venv's (PATH), as after activating it."""
    temp_dir = tempfile.mkdtemp(prefix="rlhf_head_", dir="/tmp")  # short: Ray's socket paths are limited
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--temp-dir",
        temp_dir,
        "--num-cpus",
        "8",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
        "--object-store-memory",
        str(512 * 1024**2),
        *[f"--{flag}={port}" for flag, port in ports.items()],
    ]
    log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    headers = {"Authorization": f"Bearer {token_file.read_text()}"}
    try:
        client = connect(address, headers, proc, temp_dir, timeout_s=240)
        yield {"client": client, "address": address, "headers": headers, "temp_dir": temp_dir}
    finally:
        killed = stop_head(proc, temp_dir)
        log.close()
        left = processes_of(proc.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's head survived: {[p.pid for p in left]}"
        if killed:
            print(f"needed SIGKILL after the grace period: {killed}")


def connect(address: str, headers: dict, proc: subprocess.Popen, temp_dir: str, timeout_s: float):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"ray start exited ({proc.returncode}): {(Path(temp_dir) / 'ray_start.log').read_text()}"
            )
        try:
            return JobSubmissionClient(address, headers=headers)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_token_is_required(ray_head):
    """The head really enforces the token: a client without it is refused with Ray's own message."""
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="(?i)unauthorized|authentication"):
        JobSubmissionClient(ray_head["address"], headers={"Authorization": "Bearer wrong-token"}).list_jobs()


def test_submit_rl_job(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    client = ray_head["client"]
    out = tmp_path / "rl"
    (runtime_env_file,) = yaml.safe_load_all((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env = {
        "working_dir": str(ROOT),  # what `ray job submit --working-dir .` uploads
        "excludes": runtime_env_file["excludes"],  # the README's runtime env: no .venv, .cache, runs, .git
        # this checkout's caches (compiled DeepSpeed ops are reused); jobs.common re-sends them in ray.init
        "env_vars": {**runtime_env_vars(), "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"},
    }
    where = (
        "import sys, ray, rlhf_ray; ray.init(); "
        "f = ray.remote(num_cpus=1)(lambda: __import__('rlhf_ray').__file__); "
        "print('driver', sys.executable, rlhf_ray.__file__); print('worker', ray.get(f.remote()))"
    )
    entrypoint = (
        f'python -c "{where}" && '
        "python -m jobs.synthetic_task --out runs/tiny-task && "
        "python -m jobs.ppo --config jobs/configs/tiny_ppo.yaml run.total_steps=4 "
        f"run.output_dir={out} logging.progress_bar=false logging.tensorboard=false"
    )
    t0 = time.monotonic()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    deadline = t0 + 900
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    print(f"job {job_id}: {status} after {time.monotonic() - t0:.0f} s")
    assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-4000:]}"

    # the job ran this venv's python on an uploaded copy of the checkout, in the driver and the workers
    lines = logs.splitlines()
    driver = next(line for line in lines if line.startswith("driver "))
    worker = next(line for line in lines if line.startswith("worker "))
    assert driver.split()[1] == sys.executable
    for line in (driver, worker):
        path = line.split()[-1]
        assert path.startswith(ray_head["temp_dir"]) and "working_dir_files" in path, line

    # the per-step rows of the RL job in its log, and its artifacts where the config said
    for step in range(1, 5):
        assert f"step {step}/4 | reward " in logs
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ckpt = CheckpointManager(out / "checkpoints").latest()
    assert ckpt is not None and CheckpointManager(out / "checkpoints").verify(ckpt)["step"] == 4
    assert (out / "policy" / "config.json").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    assert client.get_job_info(job_id).entrypoint == entrypoint

    # Resubmitting resumes: proven, exactly, by tests/test_resume_exact.py::
    # test_resubmitted_job_equals_the_uninterrupted_run (the job's entry point in a new driver process joining
    # the cluster); a second submission here (~60 s) repeated it less precisely.
