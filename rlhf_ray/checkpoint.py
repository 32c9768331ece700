"""Atomic, verifiable checkpoints: each is written into a temporary directory, described by a manifest
(step, config hash, every file with its size and SHA-256), and renamed into place only when complete.
A process killed mid-write leaves the previous checkpoint untouched; `latest()` skips anything without a
valid manifest, and `verify()` refuses a checkpoint whose files changed or whose config does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def checkpoint_due(
    step: int, total_steps: int, interval: int, interval_minutes: float, minutes_since_save: float
) -> bool:
    """Whether the RL loop saves a checkpoint after training step `step` (from 1): at the last step (the
    run's result), every `interval` steps (0: off), and once `interval_minutes` (0: off) have passed since
    the last save or the start of the run, so a crash costs at most about that much work (plus the step in
    progress) however long a step takes."""
    return (
        step == total_steps
        or (interval > 0 and step % interval == 0)
        or (interval_minutes > 0 and minutes_since_save >= interval_minutes)
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe_files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def writable_dir(path: str | Path, key: str) -> Path:
    """`path` as a directory this process can create files in (made if missing), or a `CheckpointError`
    naming the config `key`, the path and the reason, before any work that would be lost."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise CheckpointError(
            f"{key}={str(path)!r} is not a writable directory ({exc.strerror or exc}); set {key} to a "
            f"directory this user can write to, or fix its permissions"
        ) from exc
    return path


class CheckpointManager:
    """Sealed checkpoints `step-XXXXXXXX/` under `directory`. `config_hash` (and `identity`, the settings
    behind it, see `RLHFConfig.checkpoint_identity`) tie each checkpoint to the run that wrote it."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 2,
        config_hash: str = "",
        identity: dict[str, Any] | None = None,
    ):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.config_hash = config_hash
        self.identity = identity

    def path_for(self, step: int) -> Path:
        return self.dir / f"{PREFIX}{step:08d}"

    def save(self, step: int, write: Callable[[Path], None], extra: dict[str, Any] | None = None) -> Path:
        """Call `write(tmp_dir)` to fill a new checkpoint, then seal it with a manifest and rename it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path_for(step)
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            write(tmp)
            manifest = {
                "step": step,
                "config_hash": self.config_hash,
                "created": time.time(),
                "files": _describe_files(tmp),
                **({"config": self.identity} if self.identity is not None else {}),
                **(extra or {}),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(step)
        return final

    def complete(self) -> list[Path]:
        """Sealed checkpoints, oldest first (a directory without a manifest is an interrupted write)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob(f"{PREFIX}*") if (p / MANIFEST).is_file())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def verify(self, path: Path, check_files: bool = True) -> dict[str, Any]:
        """The manifest of `path`, after checking the config hash and (optionally) every file."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST}: {exc}") from exc
        if self.config_hash and manifest.get("config_hash") != self.config_hash:
            raise CheckpointError(
                f"checkpoint {path} was written by a run with a different model/algorithm/trainer config "
                f"({self._differences(manifest.get('config'))}); refusing to resume. Use a new run.output_dir "
                f"(or checkpoint.dir), restore the old settings, or set checkpoint.resume=false to start over"
            )
        if check_files:
            for name, info in manifest["files"].items():
                f = path / name
                if not f.is_file() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
                    raise CheckpointError(
                        f"checkpoint {path} is damaged: {name} is missing or changed since it was written"
                    )
        return manifest

    def _differences(self, saved: dict[str, Any] | None) -> str:
        if saved is None or self.identity is None:
            return "config hashes differ"
        keys = sorted(set(saved) | set(self.identity))
        diffs = [
            f"{k}: {saved.get(k)!r} in the checkpoint, {self.identity.get(k)!r} now"
            for k in keys
            if saved.get(k) != self.identity.get(k)
        ]
        return "; ".join(diffs) or "config hashes differ"

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last` checkpoints up to `step` (the one just written); checkpoints of
        later steps belong to another run sharing the directory and are not this run's to delete."""
        mine = [p for p in self.complete() if _step_of(p) <= step]
        for old in mine[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix(PREFIX))
    except ValueError:
        return -1
