"""The before/after table the RL job prints at its end (`rlhf_ray.report.eval_before_after`)."""

from __future__ import annotations

import pytest

from rlhf_ray.report import eval_before_after


@pytest.mark.timeout(30)
def test_first_and_last_evaluations_side_by_side():
    rows = [
        {"step": 0, "eval/gold": 0.06, "eval/reward": 0.08},
        {"step": 1, "reward/mean": 0.1},
        {"step": 20, "eval/gold": 0.09, "eval/reward": 0.1},
        {"step": 60, "eval/gold": 0.14, "eval/reward": 0.2, "reward/mean": 0.3},
    ]
    lines = eval_before_after(rows).splitlines()
    assert lines[0].split() == ["held-out", "step", "0", "step", "60", "change"]
    assert lines[2].split() == ["eval/gold", "0.06", "0.14", "+0.08"]
    assert lines[3].split() == ["eval/reward", "0.08", "0.2", "+0.12"]
    assert len(lines) == 4  # training keys are not in it


@pytest.mark.timeout(30)
def test_no_table_without_two_evaluations():
    assert eval_before_after([{"step": 1, "reward/mean": 0.1}]) == ""
    assert eval_before_after([{"step": 0, "eval/gold": 0.1}, {"step": 1, "reward/mean": 0.1}]) == ""
