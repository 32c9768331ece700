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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


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


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 2, config_hash: str = ""):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.config_hash = config_hash

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
                **(extra or {}),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
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
                f"(hash {manifest.get('config_hash')} vs this run's {self.config_hash}); refusing to resume. "
                f"Use a new run.output_dir (or checkpoint.dir), or set checkpoint.resume=false to start over"
            )
        if check_files:
            for name, info in manifest["files"].items():
                f = path / name
                if not f.is_file() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
                    raise CheckpointError(
                        f"checkpoint {path} is damaged: {name} is missing or changed since it was written"
                    )
        return manifest

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
