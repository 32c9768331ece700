"""The roles' own compute time per RL step, read from Ray's task timeline (`ray.timeline()`), so that it
is measured from outside the trainer without changing the actors.

Ray records, for every actor method call, a span `task::<Class>.<method>` with three parts: fetching and
deserialising the arguments (`task:deserialize_arguments`: the batch coming out of the object store),
running the method (`task:execute`: the role's own compute), and serialising/putting the result
(`task:store_outputs`). A role's compute time is its `task:execute` time; everything else in a step —
scheduling, transfers, (de)serialisation, glue tasks such as `concat_batches`, the driver's own work and its
waits — is orchestration overhead:

    overhead = step wall time - time during which at least one role was executing (union of spans)

The union (not the sum) is the right measure because reference, reward and policy log-probs run
concurrently: their compute overlaps, and the step is only as long as the overlap allows.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

# actor method (timeline category) -> role; categories not listed (GlueWorker.concat, ping, stats, ...) are glue
ROLE_OF = {
    "task::RolloutEngine.generate": "generate",
    "task::ReferenceModel.logprobs": "reference",
    "task::RewardModel.score": "reward",
    "task::PolicyRank.compute_logprobs": "logprobs",
    "task::CriticRank.compute_values": "critic",
    "task::GlueWorker.experience": "advantages",
    "task::PolicyRank.train": "train_policy",
    "task::CriticRank.train": "train_critic",
    "task::PolicyRank.export_weights": "sync_send",
    "task::PolicyRank.broadcast_weights": "sync_send",
    "task::RolloutEngine.update_weights_from_store": "sync_receive",
    "task::RolloutEngine.receive_broadcast": "sync_receive",
}
ROLES = list(dict.fromkeys(ROLE_OF.values()))


def _parts(events: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, str]]]:
    """Per worker (timeline `tid`), the sub-spans (start µs, end µs, kind) of its task executions."""
    parts: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("task:execute", "task:deserialize_arguments", "task:store_outputs"):
            parts[e["tid"]].append((e["ts"], e["ts"] + e.get("dur", 0.0), e["cat"].split(":")[1]))
    return parts


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def step_breakdown(events: list[dict[str, Any]], start_s: float, end_s: float) -> dict[str, float]:
    """Seconds per role (its `task:execute` time; the max over the actors of a role, which run in
    parallel), the union of all roles' execution, argument fetch and output store times, and the
    overhead, for the RL step that ran from `start_s` to `end_s` (driver `time.time()`)."""
    lo, hi = start_s * 1e6, end_s * 1e6
    parts = _parts(events)
    per_actor: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    busy: list[tuple[float, float]] = []
    fetch = store = glue = 0.0
    for e in events:
        cat = e.get("cat", "")
        if not cat.startswith("task::") or not lo <= e["ts"] <= hi:
            continue
        span_end = e["ts"] + e.get("dur", 0.0)
        role = ROLE_OF.get(cat)
        if role is None:
            glue += e.get("dur", 0.0)
            continue
        for a, b, kind in parts.get(e["tid"], []):
            if a < e["ts"] - 1 or b > span_end + 1:
                continue  # a sub-span of another task of the same worker
            if kind == "execute":
                per_actor[role][e["tid"]] += b - a
                busy.append((max(a, lo), min(b, hi)))
            elif kind == "deserialize_arguments":
                fetch += b - a
            else:
                store += b - a
    out = {f"compute/{r}": max(per_actor[r].values(), default=0.0) / 1e6 for r in ROLES}
    wall = end_s - start_s
    compute = _union(busy) / 1e6
    out |= {
        "wall": wall,
        "compute/union": compute,
        "transfer/fetch_args": fetch / 1e6,
        "transfer/store_outputs": store / 1e6,
        "glue_tasks": glue / 1e6,
        "overhead": wall - compute,
        "overhead_frac": (wall - compute) / wall if wall > 0 else 0.0,
    }
    return out
