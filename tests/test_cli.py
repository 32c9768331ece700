"""The installed `rlhf-ray` console script: subcommands that run the jobs, and help that lists the config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS

SCRIPT = Path(sys.executable).parent / "rlhf-ray"


def rlhf_ray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is not installed: run `.venv/bin/python -m pip install --no-deps -e .`")
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=110, cwd=cwd)


@pytest.mark.timeout(120)
def test_help_lists_every_subcommand():
    out = rlhf_ray("--help")
    assert out.returncode == 0, out.stderr
    for name in ("sft", "reward-model", "dpo", "ppo", "pipeline", "sweep", "convert-smollm2"):
        assert name in COMMANDS
        assert f"\n    {name}" in out.stdout, f"{name} missing from:\n{out.stdout}"


@pytest.mark.timeout(120)
def test_job_help_lists_the_config_keys_with_defaults():
    out = rlhf_ray("ppo", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: rlhf-ray ppo")
    assert "--config" in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.strip().startswith("algorithm.kl_coef:"))
    assert "float" in line and "0.05" in line
    assert "placement.rollout.num_threads: int | None = null" in out.stdout
    assert "offline.dpo.beta: float = 0.1" in out.stdout


@pytest.mark.timeout(120)
def test_unknown_subcommand_names_the_choices():
    out = rlhf_ray("train")
    assert out.returncode != 0
    assert "invalid choice: 'train'" in out.stderr
    assert "'ppo'" in out.stderr and "'reward-model'" in out.stderr


@pytest.mark.timeout(120)
def test_missing_config_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    out = rlhf_ray("sft", "--config", str(missing), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert f"config error: config file {str(missing)!r} does not exist" in out.stderr
