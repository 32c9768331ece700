"""What the offline stages (SFT, reward model, DPO) share: their settings, the config their ranks get, the
held-out split, and `fit_epochs`, the epoch loop over shuffled mini-batches with a progress bar, a metrics
JSONL (and TensorBoard), held-out evaluation and a plot.

Settings of a stage (epochs, batch_size, lr; DPO also beta, loss_type) are an `OfflineStageConfig`: the
config section `offline.<stage>` with the driver's keyword arguments (the jobs' --epochs ... flags) put over
it. `lr` None means `trainer.lr`. The ranks get them in their config (`rank_config`): one optimiser step
per `batch_size` rows (see `actors.deepspeed_rank.OfflineRank`).

The driver holds the encoded dataset (it tokenises once, so a bad record fails before any actor starts)
and puts one mini-batch at a time in the object store; the ranks get its reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from rlhf_ray.batch import Batch
from rlhf_ray.config import ConfigError, LoggingConfig, OfflineStageConfig, RLHFConfig
from rlhf_ray.data import DataError, load_records
from rlhf_ray.metrics import MetricsLogger, plot_metrics, read_metrics

log = logging.getLogger(__name__)

STAGES = ("sft", "reward_model", "dpo")


def stage_settings(cfg: RLHFConfig, stage: str, **overrides: Any) -> OfflineStageConfig:
    """`offline.<stage>` with the overrides that are not None put over it, checked (see the module
    docstring). An override that is not a field of the section is a TypeError."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {STAGES}")
    names = [f.name for f in dataclasses.fields(OfflineStageConfig)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"unknown {stage} setting(s) {unknown}; allowed: {names}")
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = dataclasses.replace(getattr(cfg.offline, stage), **given)
    prefix = f"offline.{stage}."
    try:
        settings.check(prefix)
    except ConfigError as exc:
        key = re.match(rf"{re.escape(prefix)}(\w+)=", str(exc))
        if key is None:
            raise
        flag = key.group(1).replace("_", "-")
        raise ConfigError(f"{exc} (set it in the config or with the job's --{flag} flag)") from None
    return settings


def rank_config(cfg: RLHFConfig, stage: str, settings: OfflineStageConfig, **model: Any) -> RLHFConfig:
    """The config the ranks of `stage` get: `settings` (the stage's settings in effect) as `offline.<stage>`,
    which sets their batch plan and learning rate (`actors.deepspeed_rank.OfflineRank`), and the `model`
    paths given (`stage_settings` checked the settings)."""
    offline = dataclasses.replace(cfg.offline, **{stage: settings})
    return dataclasses.replace(cfg, offline=offline, model=dataclasses.replace(cfg.model, **model))


def require_model_dir(path: str | None, key: str) -> str:
    """`path` when it is an existing directory; a ConfigError naming `key` otherwise (before any actor)."""
    if not path:
        raise ConfigError(f"{key} is not set: give the local directory of a save_pretrained model")
    if not Path(path).expanduser().is_dir():
        raise ConfigError(f"{key}={path!r} is not a directory: give the local directory of a saved model")
    return str(path)


# ---- data -----------------------------------------------------------------------------------------
def load_split(cfg: RLHFConfig, fields: Sequence[str]) -> tuple[Any, Any | None]:
    """(train records, held-out records or None): `data.eval_path` when set, else a seeded random
    `data.eval_fraction` of `data.train_path` (none when the fraction is 0)."""
    data = cfg.data
    if not data.train_path:
        raise DataError(f"data.train_path is not set: give a JSONL/Parquet file with fields {list(fields)}")
    records = load_records(data.train_path, fields)
    if data.eval_path:
        return records, load_records(data.eval_path, fields)
    if data.eval_fraction <= 0:
        return records, None
    n_eval = max(1, round(len(records) * data.eval_fraction))
    if n_eval >= len(records):
        raise DataError(
            f"data.train_path={data.train_path!r} has {len(records)} records: too few to hold out "
            f"data.eval_fraction={data.eval_fraction} of them; add records, lower data.eval_fraction or give "
            f"data.eval_path"
        )
    order = np.random.default_rng([cfg.run.seed, 1]).permutation(len(records))
    return records.select(np.sort(order[n_eval:])), records.select(np.sort(order[:n_eval]))


def trim_batch(batch: Batch) -> Batch:
    """Drop the columns that are padding in every row of every `*attention_mask` field."""
    masks = [v for k, v in batch.tensors.items() if k.endswith("attention_mask")]
    if not masks or len(batch) == 0:
        return batch
    width = masks[0].shape[1]
    used = max(int(m.sum(0).nonzero().max()) + 1 for m in masks)
    return Batch(
        {k: (v[:, :used] if v.dim() >= 2 and v.shape[1] == width else v) for k, v in batch.tensors.items()},
        dict(batch.meta),
    )


def count_tokens(batch: Batch) -> int:
    return sum(int(v.sum()) for k, v in batch.tensors.items() if k.endswith("attention_mask"))


# ---- the epoch loop -------------------------------------------------------------------------------
@dataclass
class FitResult:
    steps: int
    seconds: float
    first_eval: dict[str, float]
    last_eval: dict[str, float]
    last_train: dict[str, float]
    metrics: Path
    plot: Path | None


def fit_epochs(
    stage: str,
    cfg: RLHFConfig,
    settings: OfflineStageConfig,
    train: Batch,
    train_step: Callable[[ray.ObjectRef], dict[str, float]],
    evaluate: Callable[[], dict[str, float]] | None,
    log_dir: Path,
    bar_keys: dict[str, str],
    plot_keys: tuple[str, ...],
) -> FitResult:
    """`settings.epochs` passes over `train` in shuffled mini-batches of `settings.batch_size` (the last
    one of an epoch may be smaller); `train_step(ref)` trains on one and returns its stats. Evaluates
    before the first step, every `run.eval_interval` steps and after every epoch; logs `train/<stat>`,
    `eval/...` (as `evaluate` names them), `tokens_per_s`, `epoch` to `<log_dir>/metrics.jsonl`.
    `FitResult.last_train`: the train stats of the last epoch, averaged over its steps by batch size."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "metrics.jsonl").unlink(missing_ok=True)  # one run per directory: start a fresh file
    (log_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    per_epoch = math.ceil(len(train) / settings.batch_size)
    total = settings.epochs * per_epoch
    sinks = LoggingConfig(
        jsonl=cfg.logging.jsonl,
        tensorboard=cfg.logging.tensorboard,
        progress_bar=False,  # the stage shows its own bar
        log_interval=cfg.logging.log_interval,
    )
    logger = MetricsLogger(log_dir, sinks, total_steps=total)
    bar = _progress(stage, total, cfg.logging.progress_bar)
    start = time.perf_counter()
    first_eval = last_eval = evaluate() if evaluate else {}
    last_train: dict[str, float] = {}
    step = 0
    try:
        if first_eval:
            logger.log(0, first_eval)
            bar.set_postfix(_shown(first_eval, bar_keys), refresh=False)
        for epoch in range(settings.epochs):
            order = np.random.default_rng([cfg.run.seed, 2, epoch]).permutation(len(train))
            epoch_stats: list[tuple[int, dict[str, float]]] = []
            for i in range(per_epoch):
                mini = trim_batch(
                    train.select(order[i * settings.batch_size : (i + 1) * settings.batch_size])
                )
                t = time.perf_counter()
                stats = train_step(ray.put(mini))
                seconds = time.perf_counter() - t
                step += 1
                epoch_stats.append((len(mini), stats))
                metrics = {f"train/{k}": v for k, v in stats.items()} | {
                    "tokens_per_s": count_tokens(mini) / max(seconds, 1e-9),
                    "time/step": seconds,
                    "epoch": epoch + (i + 1) / per_epoch,
                }
                interval = cfg.run.eval_interval
                evaluated = bool(evaluate) and (i == per_epoch - 1 or (interval and step % interval == 0))
                if evaluated:
                    last_eval = evaluate()
                    metrics |= last_eval
                if evaluated or step % cfg.logging.log_interval == 0 or step == total:
                    logger.log(step, metrics)
                bar.update(1)
                bar.set_postfix(_shown(metrics | last_eval, bar_keys), refresh=False)
            last_train = _weighted_mean(epoch_stats, prefix="train/")
    finally:
        bar.close()
        logger.close()
    seconds = time.perf_counter() - start
    plot = None
    if cfg.logging.jsonl and any(r.get(k) is not None for r in read_metrics(logger.path) for k in plot_keys):
        plot = plot_metrics(logger.path, log_dir / "curves.png", keys=plot_keys)
    return FitResult(step, seconds, first_eval, last_eval, last_train, logger.path, plot)


def _weighted_mean(stats: list[tuple[int, dict[str, float]]], prefix: str) -> dict[str, float]:
    keys = {k for _, d in stats for k in d}
    out = {}
    for k in sorted(keys):
        pairs = [(n, d[k]) for n, d in stats if k in d]
        out[prefix + k] = sum(n * v for n, v in pairs) / max(sum(n for n, _ in pairs), 1)
    return out


def _progress(stage: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=stage, unit="step", dynamic_ncols=True, disable=not enabled)


def _shown(metrics: dict[str, Any], keys: dict[str, str]) -> dict[str, str]:
    return {short: f"{metrics[k]:.3g}" for k, short in keys.items() if isinstance(metrics.get(k), float)}


def summary(stage: str, model_dir: str, result: FitResult, n_train: int, n_eval: int, t0: float) -> dict:
    """The dict a driver returns (and a job prints): paths, sizes, timings, first and last evaluation."""
    out: dict[str, Any] = {
        "stage": stage,
        "model": model_dir,
        "metrics": str(result.metrics),
        "plot": str(result.plot) if result.plot else None,
        "train_examples": n_train,
        "eval_examples": n_eval,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out |= result.last_train
    out |= {f"{k}_initial": v for k, v in result.first_eval.items()}
    return out | result.last_eval


# ---- job flags ------------------------------------------------------------------------------------
def parse_stage_flags(argv: list[str] | None, dpo: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The stage flags of a job (--epochs, --batch-size, --lr; DPO: --beta, --loss-type) as driver
    keyword arguments (None when not given), and the rest of argv for `jobs.common.parse_args`."""
    import sys

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    if dpo:
        parser.add_argument("--beta", type=float, default=None)
        parser.add_argument("--loss-type", choices=["sigmoid", "ipo"], default=None)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return vars(known), rest
