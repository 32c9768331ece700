"""The one wait-with-deadline over Ray refs: every wait of the driver (a worker group's call, the roles'
answers, a probe's pings) is this loop, with its own message for what was late."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import ray


class DeadlinePassed(TimeoutError):
    """Refs that were not ready when the deadline passed (`pending`)."""

    def __init__(self, pending: list[ray.ObjectRef]):
        super().__init__(f"{len(pending)} refs not ready before the deadline")
        self.pending = pending


def as_ready(
    refs: Iterable[ray.ObjectRef],
    timeout_s: float | None,
    fetch: bool = True,
    keep: Callable[[ray.ObjectRef], bool] | None = None,
) -> Iterator[ray.ObjectRef]:
    """Yield each ref as soon as it is ready; past `timeout_s` seconds (None: no limit) for them all,
    raise `DeadlinePassed` with the rest. `fetch=False` only waits (the value stays where it is: for
    batches the driver must not pull). `keep(ref)`, asked after each yield, drops refs no longer wanted."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left, fetch_local=fetch)
        if not ready:
            raise DeadlinePassed(pending)
        yield ready[0]
        if keep is not None:
            pending = [r for r in pending if keep(r)]
