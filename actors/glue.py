"""The glue worker: one long-lived actor that combines the roles' outputs inside the cluster (joins the
engines' rollouts and the ranks' shards, slices a rollout for the reference and reward actors and joins
their answers, makes the experience, scores evaluations, picks the few rows a run shows as samples), so the driver holds only refs. It lives here, below both the worker groups that join shards on it and the RL driver.

The combinations run on one actor, not as Ray tasks: a task needs an idle
worker process, and on a cluster whose CPUs are all reserved by the roles Ray stops idle task workers
within a second, so every step of a real model paid a new Python process (measured: 1.8 s per step,
`time/advantages` on SmolLM2-135M). The functions are plain, for tests and for use outside Ray.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

from rlhf_ray.batch import Batch, RankShard, rank_shards
from rlhf_ray.config import AlgorithmConfig
from rlhf_ray.experience import OldLogprobs, RewardNormalizer, make_experience, mark_old_logprobs
from rlhf_ray.rewards import fields_of, load_rule_function, score_with_rule
from rlhf_ray.samples import pick_rows, sample_rows


def concat_batches(*batches: Batch) -> Batch:
    """Concatenate the engines' rollouts; prompt_index is renumbered to stay unique across engines."""
    offset, parts = 0, []
    for b in batches:
        if "prompt_index" in b.meta:
            b.meta["prompt_index"] = [i + offset for i in b.meta["prompt_index"]]
            offset = max(b.meta["prompt_index"], default=offset - 1) + 1
        parts.append(b)
    return Batch.concat(parts)


def experience(
    rollout: Batch,
    logprobs: Batch | None,
    ref: Batch,
    scores: Batch,
    values: Batch | None,
    algo: AlgorithmConfig,
    kl_coef: float,
    group_size: int,
    normalizer: RewardNormalizer | None,
    max_len: int | None = None,
) -> tuple[Batch, dict[str, float], RewardNormalizer | None]:
    """The training batch, its stats and the updated normaliser from the roles' outputs."""
    batch = rollout.union(ref).union(scores)
    if logprobs is not None:  # None: the update uses its own (OldLogprobs.FROM_UPDATE)
        batch = batch.union(logprobs)
    mark_old_logprobs(batch, OldLogprobs.FROM_UPDATE if logprobs is None else OldLogprobs.SCORED)
    if values is not None:
        batch = batch.union(values)
    batch, stats = make_experience(batch, algo, kl_coef, group_size, normalizer, max_len)
    stats["tokens"] = float(batch["response_mask"].sum())
    return batch, stats, normalizer


def eval_scores(function: str, batch: Batch, scores: Batch) -> dict[str, float]:
    """Mean reward-model score and mean `function` score (e.g. the gold labeler) of an eval rollout."""
    out = {
        "eval/reward": float(scores["scores"].mean()),
        "eval/response_length": float(batch["response_mask"].sum(1).float().mean()),
    }
    if function:
        values = gold_scores(function, batch)
        out["eval/gold"] = sum(values) / max(len(values), 1)
    return out


def gold_scores(function: str, batch: Batch) -> list[float]:
    """The score `function` (e.g. the hidden gold labeler, `run.eval_function`) gives each row of `batch`."""
    fn = load_rule_function(function)  # it gets the prompt-record fields it takes, e.g. the answer
    prompts, responses = batch.meta["prompt"], batch.meta["response"]
    return score_with_rule(fn, prompts, responses, function, fields_of(batch.meta))


def samples(batch: Batch, n: int, function: str, scores: Batch | None = None) -> list[dict[str, Any]]:
    """`n` rows of `batch` a person can read (`rlhf_ray.samples`), with their `function` (gold) scores when
    `function` is set, computed on those rows only; `scores`: the reward of an eval batch, kept apart."""
    if scores is not None:
        batch = batch.union(scores)
    rows = pick_rows(batch.meta.get("prompt_index"), len(batch), n)
    gold = gold_scores(function, batch.select(rows)) if function and rows else None
    return sample_rows(batch, rows, gold)


# ---- runs in the glue worker's process ---------------------------------------------------------------------
@ray.remote(num_cpus=0)
class GlueWorker:
    """The actor the functions above run on (arguments that are refs are resolved by Ray)."""

    def __init__(self) -> None:
        from rlhf_ray.runtime import set_threads, setup_process_env

        setup_process_env()
        set_threads(1)  # small tensors; leave the cores to the roles

    def concat(self, *batches: Batch) -> Batch:
        return concat_batches(*batches)

    def split(self, batch: Batch, n: int) -> list[Batch]:
        """`n` contiguous slices of `batch` in order (`Batch.split`; some empty when `n > len(batch)`), one
        per scoring actor; the caller sets `num_returns=n`, so each slice is its own object."""
        return batch.split(n)

    def shards(self, batch: Batch, world: int) -> list[RankShard]:
        """Each trainer rank's `RankShard` of `batch`; the caller sets `num_returns=world`, so that each
        rank pulls only its own rows."""
        return rank_shards(batch, world)

    def join(self, *parts: Batch) -> Batch:
        """The scoring actors' answers on the slices, back in one batch in slice order."""
        return Batch.concat(parts)

    @ray.method(num_returns=3)
    def experience(self, *args: Any) -> tuple[Batch, dict[str, float], RewardNormalizer | None]:
        return experience(*args)

    def eval_scores(self, function: str, batch: Batch, scores: Batch) -> dict[str, float]:
        return eval_scores(function, batch, scores)

    def samples(
        self, batch: Batch, n: int, function: str, scores: Batch | None = None
    ) -> list[dict[str, Any]]:
        return samples(batch, n, function, scores)

    def ping(self) -> bool:
        return True


# ---- runs on the driver ------------------------------------------------------------------------------------
_glue: tuple[tuple[str, str], Any] | None = None  # ((Ray session, job), handle)


def glue() -> Any:
    """This process's glue worker in the current Ray session (started on first use, on this node, outside
    any placement group)."""
    global _glue
    ctx = ray.get_runtime_context()
    key = (ctx.get_session_name(), ctx.get_job_id())
    if _glue is None or _glue[0] != key:  # none yet, or one of an earlier `ray.init` (gone with it)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=ctx.get_node_id(), soft=True)
        _glue = (key, GlueWorker.options(scheduling_strategy=strategy).remote())
    return _glue[1]


def reset_glue() -> None:
    """Stop the glue worker (after a failure, or at shutdown); the next `glue()` starts a fresh one."""
    global _glue
    if _glue is not None:
        with contextlib.suppress(Exception):  # already dead, or Ray already shut down
            ray.kill(_glue[1], no_restart=True)
    _glue = None
