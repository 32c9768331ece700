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


def test_prune_never_deletes_the_new_checkpoint_nor_another_runs_later_ones(tmp_path):
    """A directory that still holds a later step of an earlier run: saving (and pruning) keeps the
    checkpoint just written and leaves the other run's alone."""
    CheckpointManager(tmp_path, config_hash="old").save(100, writer("old run"))
    mgr = CheckpointManager(tmp_path, keep_last=1, config_hash="new")
    for step in (1, 2, 3):
        assert mgr.save(step, writer(f"w{step}")).is_dir()
    assert [p.name for p in mgr.complete()] == ["step-00000003", "step-00000100"]


def test_manifest_names_the_settings_that_differ(tmp_path):
    CheckpointManager(
        tmp_path, config_hash="a", identity={"model.policy_path": "/m1", "trainer.zero_stage": 2}
    ).save(1, writer("x"))
    now = CheckpointManager(
        tmp_path, config_hash="b", identity={"model.policy_path": "/m2", "trainer.zero_stage": 2}
    )
    with pytest.raises(
        CheckpointError, match=r"model.policy_path: '/m1' in the checkpoint, '/m2' now\); refusing"
    ):
        now.verify(now.latest())
