"""WorkerGroup start-up: a start that lost its rendezvous port to another process is tried again on a new
port (a bounded number of times); any other failure is raised at once. Real Ray actors; the rank class is
a stand-in for a DeepSpeed rank that records its starts in files."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.worker_group import START_ATTEMPTS, WorkerGroup, wait_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # starts a local Ray
BASE_PORT = 20000


class FlakyRank:
    """`init` fails like a lost port (or with another error) for the first `failures` group starts."""

    def __init__(self, cfg: dict, rank: int, world: int, addr: str | None, port: int | None):
        self.cfg, self.rank = cfg, rank
        if port is None:  # rank 0 of a new start: the n-th start gets port BASE + n, and records itself
            starts = Path(cfg["dir"])
            port = BASE_PORT + len(list(starts.glob("start-*")))
            (starts / f"start-{port}").touch()
        self.port = port

    def master_address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def node_id(self) -> str:
        return "node"

    def init(self, local_rank: int, local_size: int) -> None:
        if self.port - BASE_PORT < self.cfg["failures"]:  # every rank of a start decides alike
            raise OSError(f"[rank {self.rank}] {self.cfg['error']}")

    def ping(self) -> int:
        return self.rank


def starts(tmp_path: Path) -> int:
    return len(list(tmp_path.glob("start-*")))


def test_a_lost_port_is_retried_on_a_new_port(ray_local, tmp_path):
    cfg = {
        "dir": str(tmp_path),
        "failures": 1,
        "error": "The server socket has failed to listen on "
        "any local network address. port: 29500, useIpv6: 0, code: -98, name: EADDRINUSE, message: "
        "address already in use",
    }
    group = WorkerGroup(FlakyRank, cfg, 2, init_timeout=60)
    try:
        assert wait_all(group.call("ping"), 60) == [0, 1]
        assert starts(tmp_path) == 2  # the first start failed, the second (on a new port) joined
    finally:
        group.kill()


def test_retries_are_bounded_and_other_errors_are_not_retried(ray_local, tmp_path):
    always = {"dir": str(tmp_path / "a"), "failures": 99, "error": "Address already in use"}
    Path(always["dir"]).mkdir()
    with pytest.raises(Exception, match="Address already in use"):
        WorkerGroup(FlakyRank, always, 2, init_timeout=60)
    assert starts(tmp_path / "a") == START_ATTEMPTS

    other = {"dir": str(tmp_path / "b"), "failures": 99, "error": "out of memory"}
    Path(other["dir"]).mkdir()
    with pytest.raises(Exception, match="out of memory"):
        WorkerGroup(FlakyRank, other, 2, init_timeout=60)
    assert starts(tmp_path / "b") == 1
