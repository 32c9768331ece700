"""`python -m bench.gpu_check --dry-run`: every GPU layout of the check is planned and validated without
CUDA (config, placement on declared GPUs, vLLM's engine config, DeepSpeed's parser, the memory plan), so
the script a GPU machine runs cannot fail on a mistake the CPU could have caught."""

from __future__ import annotations

import json

import pytest

from bench.gpu_check import LAYOUTS, main

pytestmark = pytest.mark.timeout(300)


def test_dry_run_validates_every_layout(tmp_path):
    report = main(["--dry-run", "--results", str(tmp_path / "gpu_check.json"), "--out", str(tmp_path)])
    rows = report["layouts"]
    assert set(rows) == {layout.name for layout in LAYOUTS}
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(rows, "pass")
    assert rows["separate_broadcast"]["weight_sync"] == "broadcast"
    assert rows["separate_broadcast_zero3"]["zero_stage"] == 3
    for name in ("colocate_zero2", "colocate_zero3"):
        row = rows[name]
        assert row["weight_sync"] == "object_store"  # two NCCL ranks cannot share the GPU
        assert row["sleep"] is True and row["enable_sleep_mode"] is True
        assert row["optimizer"] == "cpu_adam" and row["gpu_memory_utilization"] == 0.4
    assert rows["separate_store"]["enforce_eager"] is False  # CUDA graphs on GPU
    assert json.loads((tmp_path / "gpu_check.json").read_text())["dry_run"] is True


def test_dry_run_reports_a_machine_too_small(tmp_path):
    report = main(
        ["--dry-run", "--gpus", "1", "--gpu-memory-gib", "3", "--results", str(tmp_path / "r.json")]
    )
    rows = report["layouts"]
    assert rows["separate_broadcast_zero3"]["status"] == "skipped: needs 3 GPUs, 1 here"
    # 0.4 of a 3 GiB GPU for vLLM plus the trainer (2.25 GiB planned) does not fit: the memory plan says so
    assert rows["colocate_zero2"]["status"].startswith("FAIL: AssertionError: memory plan")
