"""The metrics sinks: JSONL rows a person can plot, the console table, and the PNG."""

from __future__ import annotations

import math

from rlhf_ray.config import LoggingConfig
from rlhf_ray.metrics import MetricsLogger, plain, plot_metrics, read_metrics


def test_jsonl_table_and_plot(tmp_path, capsys):
    cfg = LoggingConfig(tensorboard=False, progress_bar=False, log_interval=2)
    logger = MetricsLogger(tmp_path, cfg, total_steps=4)
    for step in range(1, 5):
        logger.log(step, {"reward/mean": 0.1 * step, "kl": float("nan") if step == 3 else 0.01 * step})
    logger.close()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["kl"] is None  # NaN is written as null, so the file stays valid JSON
    assert math.isclose(rows[3]["reward/mean"], 0.4)

    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(printed) == 2  # every log_interval=2 steps
    assert printed[0].startswith("step 2/4 | reward 0.2 | kl 0.02")
    assert "ETA" in printed[1] and "s/step" in printed[1]

    png = plot_metrics(
        tmp_path / "metrics.jsonl", tmp_path / "curves.png", keys=("reward/mean", "kl", "absent")
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_unwraps_numbers():
    import numpy as np
    import torch

    assert plain(torch.tensor(2.5)) == 2.5
    assert plain(np.float32(1.5)) == 1.5
    assert plain(float("nan")) is None
    assert plain(float("inf")) == float("inf")
    assert plain("text") == "text"


def test_rows_without_a_known_total(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), total_steps=0)
    logger.log(400, {"train/loss": 0.5})
    logger.close()
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step"))
    assert line.startswith("step 400") and "/0" not in line and "ETA" not in line


def test_a_new_run_moves_an_earlier_runs_files_aside(tmp_path, capsys):
    """checkpoint.resume=false (or no checkpoint yet) in a directory an earlier run wrote to: its rows are
    kept under a stamped name, not mixed with the new run's."""
    cfg = LoggingConfig(tensorboard=False, progress_bar=False, log_interval=0)
    old = MetricsLogger(tmp_path, cfg, total_steps=3)
    for step in range(4):
        old.log(step, {"kl": 0.1})
    old.log_samples(1, [{"prompt": "p", "response": "r"}])
    old.close()

    new = MetricsLogger(tmp_path, cfg, total_steps=3, new_run=True)
    new.log(0, {"kl": 0.0})
    new.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]
    assert not (tmp_path / "samples.jsonl").exists()
    (kept,) = tmp_path.glob("metrics.*Z.jsonl")
    assert [r["step"] for r in read_metrics(kept)] == [0, 1, 2, 3]
    stamp = kept.name.split(".")[1]
    assert (tmp_path / f"samples.{stamp}.jsonl").is_file()
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "moved aside" in x]
    assert kept.name in line

    again = MetricsLogger(tmp_path, cfg, total_steps=3, new_run=True)  # within the same second: no clash
    again.close()
    assert len(list(tmp_path.glob("metrics.*.jsonl"))) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    resumed = MetricsLogger(tmp_path, cfg, total_steps=3, start_step=2)  # a resume moves nothing
    resumed.close()
    assert len(list(tmp_path.glob("metrics.*.jsonl"))) == 2


def test_tensorboard_drops_the_steps_done_again(tmp_path):
    """A resume or rollback to step 2 (start_step=2): TensorBoard shows steps 3 and 4 once, with the new
    values (the writer's purge_step makes it discard the old events after step 2)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(tensorboard=True, progress_bar=False, log_interval=0)
    first = MetricsLogger(tmp_path, cfg, total_steps=4)
    for step in range(1, 5):
        first.log(step, {"kl": 1.0})
    first.close()
    resumed = MetricsLogger(tmp_path, cfg, total_steps=4, start_step=2)
    for step in (3, 4):
        resumed.log(step, {"kl": 2.0})
    resumed.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("kl")] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
