"""When the RL loop saves a checkpoint (`rlhf_ray.checkpoint.checkpoint_due`): at the last step, every
`checkpoint.interval` steps and once `checkpoint.interval_minutes` (default 30) have passed since the last
save, so that by default a crash costs at most about 30 minutes of work, not the whole run. Fast: the rule
itself, then the driver loop's step with its roles stubbed and a fake clock."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from rlhf_ray.checkpoint import checkpoint_due
from rlhf_ray.config import CheckpointConfig, ConfigError, RLHFConfig


@pytest.mark.parametrize(
    ("step", "interval", "interval_minutes", "minutes_since_save", "due"),
    [
        (100, 0, 0.0, 0.0, True),  # the last step always saves
        (5, 0, 0.0, 1e9, False),  # both off: only the last step
        (20, 10, 0.0, 0.0, True),  # every 10 steps
        (21, 10, 0.0, 0.0, False),
        (7, 0, 30.0, 29.9, False),  # by time
        (7, 0, 30.0, 30.0, True),
        (7, 10, 30.0, 45.0, True),  # whichever comes first
        (10, 10, 30.0, 1.0, True),
        (11, 10, 30.0, 1.0, False),
    ],
)
def test_checkpoint_due(step, interval, interval_minutes, minutes_since_save, due):
    assert checkpoint_due(step, 100, interval, interval_minutes, minutes_since_save) is due


def test_a_crash_costs_at_most_30_minutes_by_default():
    cfg = RLHFConfig()
    assert cfg.checkpoint.interval_minutes == 30.0
    assert not checkpoint_due(3, 1000, cfg.checkpoint.interval, cfg.checkpoint.interval_minutes, 29.0)
    assert checkpoint_due(3, 1000, cfg.checkpoint.interval, cfg.checkpoint.interval_minutes, 30.5)
    with pytest.raises(ConfigError, match=r"checkpoint.interval_minutes=-1"):
        RLHFConfig.from_dict({"checkpoint": {"interval_minutes": -1}})
    assert RLHFConfig.from_dict({"checkpoint": {"interval_minutes": 0}}).checkpoint == CheckpointConfig(
        interval_minutes=0.0
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = staticmethod(time.perf_counter)


def run_loop(monkeypatch, steps: int, minutes_per_step: float, **checkpoint) -> list[int]:
    """`PPOTrainer.fit`'s steps (`_one_step`) with the roles stubbed: each step takes `minutes_per_step` on
    a fake clock; returns the steps after which a checkpoint was saved."""
    import rlhf_ray.trainer.ppo as ppo

    clock = FakeClock()
    monkeypatch.setattr(ppo, "time", clock)
    cfg = RLHFConfig.from_dict({"run": {"total_steps": steps}, "checkpoint": checkpoint})
    trainer = ppo.PPOTrainer.__new__(ppo.PPOTrainer)  # no roles: only what _one_step touches
    saved: list[int] = []

    def train_step() -> dict:
        clock.now += minutes_per_step * 60
        return {}

    def save_checkpoint() -> None:
        saved.append(trainer.step)
        trainer._saved_at = clock.monotonic()

    trainer.cfg, trainer.step, trainer.eval_prompts, trainer._samples = cfg, 0, None, None
    trainer.recovery = SimpleNamespace(attempt=lambda fn, what, *again: fn(), restarts=0)
    trainer._logger = SimpleNamespace(log=lambda step, metrics: None)
    trainer.train_step, trainer.save_checkpoint = train_step, save_checkpoint
    trainer._saved_at = clock.monotonic()  # as fit() sets it before the first step
    while trainer.step < steps:
        trainer._one_step(None)
    return saved


def test_the_rl_loop_saves_by_time_and_by_steps(monkeypatch):
    # 7 minutes a step: the default saves after 35, 70, 105... minutes of training, and at the end
    assert run_loop(monkeypatch, 20, 7.0) == [5, 10, 15, 20]
    assert run_loop(monkeypatch, 20, 7.0, interval_minutes=0) == [20]  # off: only the end
    assert run_loop(monkeypatch, 20, 7.0, interval=4, interval_minutes=0) == [4, 8, 12, 16, 20]
    # fast steps (the test suite's runs): the default adds no checkpoint
    assert run_loop(monkeypatch, 50, 0.01, interval=20) == [20, 40, 50]
