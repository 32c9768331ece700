"""CheckpointManager: atomic writes, manifests checked on load, interrupted writes ignored, pruning."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.checkpoint import CheckpointError, CheckpointManager


def writer(payload: str):
    def write(tmp):
        (tmp / "policy").mkdir()
        (tmp / "policy" / "weights.bin").write_text(payload)
        (tmp / "driver_state.json").write_text(json.dumps({"payload": payload}))

    return write


def test_save_latest_verify_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, config_hash="abc")
    for step in (1, 2, 3):
        mgr.save(step, writer(f"w{step}"))
    assert [p.name for p in mgr.complete()] == ["step-00000002", "step-00000003"]
    latest = mgr.latest()
    manifest = mgr.verify(latest)
    assert manifest["step"] == 3
    assert set(manifest["files"]) == {"policy/weights.bin", "driver_state.json"}
    assert manifest["files"]["policy/weights.bin"]["bytes"] == 2


def test_interrupted_write_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, config_hash="abc")
    mgr.save(1, writer("good"))

    def crash(tmp):
        (tmp / "half.bin").write_text("partial")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, crash)
    # a process killed harder leaves a temp dir behind: it must be ignored too
    (tmp_path / ".tmp-step-00000003-1-1").mkdir()
    (tmp_path / "step-00000004").mkdir()  # no manifest: never sealed
    assert mgr.latest().name == "step-00000001"
    assert (mgr.latest() / "policy" / "weights.bin").read_text() == "good"


def test_refuses_other_config_and_damaged_files(tmp_path):
    CheckpointManager(tmp_path, config_hash="abc").save(5, writer("x"))
    other = CheckpointManager(tmp_path, config_hash="def")
    with pytest.raises(CheckpointError, match="different model/algorithm/trainer config"):
        other.verify(other.latest())
    mgr = CheckpointManager(tmp_path, config_hash="abc")
    (mgr.latest() / "policy" / "weights.bin").write_text("tampered")
    with pytest.raises(CheckpointError, match="damaged: policy/weights.bin"):
        mgr.verify(mgr.latest())
