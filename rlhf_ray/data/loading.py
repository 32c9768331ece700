"""Reading datasets from local files into `datasets.Dataset`: JSONL (one JSON object a line), Parquet, or a
directory written by `Dataset.save_to_disk`. Nothing is fetched from the hub and nothing is cached.

Every failure is a `DataError` naming the file and what is wrong: a line that is not UTF-8 or not a JSON
object (with its line number), a missing field (with the fields that are there), an empty file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (or row), the field and the fix."""


def load_records(path: str | Path, fields: Sequence[str] = ()) -> datasets.Dataset:
    """The records of a JSONL file, a Parquet file or a saved `datasets` directory (a `DatasetDict` gives
    its 'train' split), checked to have every one of `fields`."""
    path = Path(path).expanduser()
    if path.is_dir():
        ds = _load_saved(path)
    elif not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist (check data.train_path / data.eval_path)")
    elif path.suffix.lower() in JSONL_SUFFIXES:
        ds = _load_jsonl(path, fields)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            ds = datasets.Dataset(pq.read_table(path))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"data file {str(path)!r} is not a readable Parquet file: {exc}") from exc
    else:
        raise DataError(
            f"data file {str(path)!r}: unknown format {path.suffix!r}; use JSONL ({', '.join(JSONL_SUFFIXES)}), "
            f"Parquet ({', '.join(PARQUET_SUFFIXES)}) or a directory written by Dataset.save_to_disk"
        )
    if len(ds) == 0:
        raise DataError(f"data file {str(path)!r} holds no records")
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(
            f"data file {str(path)!r} has no field {missing[0]!r} (needed: {', '.join(map(repr, fields))}; "
            f"available fields: {', '.join(map(repr, ds.column_names))}); rename the field in the data or "
            f"point the config at the right one (e.g. data.prompt_field)"
        )
    return ds


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write records as JSONL (UTF-8, one object a line), atomically: a temp file, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_saved(path: Path) -> datasets.Dataset:
    if not (
        (path / "dataset_info.json").exists()
        or (path / "dataset_dict.json").exists()
        or (path / "state.json").exists()
    ):
        raise DataError(
            f"data directory {str(path)!r} is not a saved `datasets` dataset (no dataset_info.json or "
            f"dataset_dict.json); give a JSONL or Parquet file, or a directory written by Dataset.save_to_disk"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, pa.ArrowException) as exc:
        raise DataError(f"data directory {str(path)!r} could not be read as a saved dataset: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"data directory {str(path)!r} is a DatasetDict without a 'train' split (splits: "
                f"{', '.join(ds)}); save the split you want with ds[split].save_to_disk(...)"
            )
        ds = ds["train"]
    return ds


def _load_jsonl(path: Path, fields: Sequence[str]) -> datasets.Dataset:
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{str(path)!r} line {lineno}: not valid UTF-8 ({exc}); re-save the file as UTF-8"
                ) from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{str(path)!r} line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
                ) from exc
            if not isinstance(row, dict):
                raise DataError(
                    f"{str(path)!r} line {lineno}: expected a JSON object, got {type(row).__name__}"
                )
            missing = [f for f in fields if f not in row]
            if missing:
                raise DataError(
                    f"data file {str(path)!r} line {lineno}: no field {missing[0]!r} (needed: "
                    f"{', '.join(map(repr, fields))}; available fields: {', '.join(map(repr, row)) or 'none'}); "
                    f"rename the field in the data or point the config at the right one (e.g. data.prompt_field)"
                )
            rows.append(row)
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, TypeError) as exc:
            raise DataError(f"{str(path)!r}: field {name!r} mixes value types across lines ({exc})") from exc
    return datasets.Dataset(pa.table(columns)) if rows else datasets.Dataset(pa.table({}))
