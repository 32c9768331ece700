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
