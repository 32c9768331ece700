"""Where a run's numbers go: a JSONL file (one object per step, easy to plot), TensorBoard, a console
progress bar, and every `log_interval` steps a table row (step, reward, KL, gold, tokens/s, s/step, ETA)
that stays in the job's log. `plot_metrics` turns the JSONL into a PNG. What the model writes goes beside
them: `log_samples` appends sample completions to samples.jsonl and to TensorBoard's text tab."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_ray.config import LoggingConfig
from rlhf_ray.samples import markdown_table


def extreme(key: str) -> Callable[..., float] | None:
    """How values of the statistic `key` combine over micro-batches and ranks: `max` for keys named
    `*_max`, `min` for `*_min`, None for the rest (they are averaged, weighted where the caller knows by
    what)."""
    return max if key.endswith("_max") else min if key.endswith("_min") else None


BAR_KEYS = {"reward/mean": "reward", "kl": "kl", "eval/gold": "gold", "tokens_per_s": "tok/s"}
ROW_KEYS = {
    "train/loss": "loss",
    "eval/loss": "eval loss",
    "reward/mean": "reward",
    "kl": "kl",
    "policy/entropy": "entropy",
    "eval/gold": "gold",
    "tokens_per_s": "tok/s",
}


class MetricsLogger:
    """The sinks of one run in `output_dir`. `start_step`: the last step already logged (0 for a new run);
    the caller has dropped the JSONL rows after it, and TensorBoard drops its events after it (the writer's
    `purge_step`), so steps done again after a resume or a rollback appear once everywhere. `new_run`: an
    earlier run's metrics.jsonl, samples.jsonl and tensorboard/ in `output_dir` are moved aside first
    (`set_aside`), so the new run's steps do not mix with the old ones."""

    def __init__(
        self,
        output_dir: str | Path,
        cfg: LoggingConfig,
        total_steps: int,
        start_step: int = 0,
        new_run: bool = False,
    ):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if new_run:
            set_aside(self.dir)
        self.cfg = cfg
        self.path = self.dir / "metrics.jsonl"
        self._jsonl = self.path.open("a") if cfg.jsonl else None
        self.samples_path = self.dir / "samples.jsonl"
        self._samples = None  # opened by the first `log_samples`: the offline stages write none
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if new_run else start_step + 1  # TensorBoard discards the old events from there on
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)
        self.total_steps, self.start_step = total_steps, start_step
        self._recent: deque[tuple[int, float]] = deque([(start_step, time.perf_counter())], maxlen=11)
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="rl", unit="step", dynamic_ncols=True
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: plain(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.update(1)
            shown = {
                short: f"{record[k]:.3g}" for k, short in BAR_KEYS.items() if isinstance(record.get(k), float)
            }
            self._bar.set_postfix(shown, refresh=False)
        if self.cfg.log_interval and step % self.cfg.log_interval == 0:
            self._print_row(step, record)

    def log_samples(self, step: int, rows: list[dict[str, Any]], split: str = "train") -> None:
        """Sample completions (`rlhf_ray.samples.sample_rows`) at `step`: one JSON object per row in
        samples.jsonl (`step` and `split` first: "train" for the step's batch, "eval" for held-out answers)
        and a markdown table under the TensorBoard text tag `samples/<split>`."""
        if not rows:
            return
        if self._samples is None:
            self._samples = self.samples_path.open("a")
        for row in rows:
            record = {"step": step, "split": split, **{k: plain(v) for k, v in row.items()}}
            self._samples.write(json.dumps(record) + "\n")
        self._samples.flush()
        if self._tb is not None:
            self._tb.add_text(f"samples/{split}", markdown_table(rows), step)

    def _print_row(self, step: int, record: dict[str, Any]) -> None:
        # Speed over the last few rows, so a slow first step (start-up, evaluation) fades from the ETA.
        self._recent.append((step, time.perf_counter()))
        (s0, t0), (s1, t1) = self._recent[0], self._recent[-1]
        per_step = (t1 - t0) / (s1 - s0) if s1 > s0 else float("nan")
        eta = per_step * (self.total_steps - step)
        known_total = self.total_steps > 0  # the offline stages may not know their step count
        cells = [
            f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}" if known_total else f"step {step}"
        ]
        cells += [
            f"{short} {record[k]:.4g}" for k, short in ROW_KEYS.items() if isinstance(record.get(k), float)
        ]
        if math.isfinite(per_step):
            cells.append(f"{per_step:.2f} s/step")
            if known_total and eta >= 0:
                cells.append(f"ETA {_clock(eta)}")
        line = " | ".join(cells)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._samples is not None:
            self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


RUN_FILES = ("metrics.jsonl", "samples.jsonl", "tensorboard")


def set_aside(output_dir: Path) -> list[Path]:
    """Rename an earlier run's `RUN_FILES` in `output_dir` (empty files stay) with the UTC time, e.g.
    metrics.jsonl -> metrics.20250101T120000Z.jsonl, tensorboard -> tensorboard.20250101T120000Z; says so in
    one printed line. Returns the new paths (none when there was nothing to move)."""
    found = [p for p in (output_dir / name for name in RUN_FILES) if p.is_dir() or _size(p) > 0]
    if not found:
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix, n = stamp, 0
    while any(_stamped(p, suffix).exists() for p in found):  # two new runs within one second
        n += 1
        suffix = f"{stamp}-{n}"
    moved = [p.rename(_stamped(p, suffix)) for p in found]
    print(
        f"{output_dir}: an earlier run's {', '.join(p.name for p in found)} moved aside to "
        f"{', '.join(p.name for p in moved)}",
        flush=True,
    )
    return moved


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _stamped(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}.{suffix}{path.suffix}")


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def plain(v: Any) -> Any:
    """A JSON-friendly number: tensors and numpy scalars unwrapped, NaN as null."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(
    path: str | Path, out_png: str | Path, keys: tuple[str, ...] = ("reward/mean", "kl", "eval/gold")
) -> Path:
    """One panel per metric against the step; steps a metric was not logged at are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    keys = tuple(k for k in keys if any(r.get(k) is not None for r in rows))
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * max(len(keys), 1)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
