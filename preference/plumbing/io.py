"""Atomic file writes and row tables (parquet / jsonl). No pickle anywhere.

Every writer writes to a temporary file in the same folder and renames it into place, so a reader (or a rerun
after a crash) sees either the whole file or none of it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def build_once(folder: str | Path, is_built: Callable[[Path], bool], build: Callable[[], object]) -> Path:
    """Build `folder` once across processes: `build()` runs unless `is_built(folder)`, under an exclusive lock (a
    `.<name>.lock` file beside `folder`). Several processes (parallel test workers, two `curate` commands) may want
    the same cache folder at once; the others wait, then find it built. Returns `folder`."""
    import fcntl

    folder = Path(folder)
    if is_built(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if not is_built(folder):  # another process may have built it while this one waited
                build()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return folder


@contextlib.contextmanager
def sqlite_transaction(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection to the SQLite file `path` whose block is one transaction (committed on success, rolled back on
    an error), closed afterwards; waits up to 30 s for another process's write lock."""
    db = sqlite3.connect(path, timeout=30)
    try:
        with db:
            yield db
    finally:
        db.close()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def open_text(path: str | Path):
    """Open a text file, transparently decompressing `.gz`."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a jsonl file (gz ok). Raises ValueError naming the first bad line."""
    rows = []
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def write_rows(path: str | Path, rows: list[dict], schema: pa.Schema | None = None) -> int:
    """Write rows (list of dicts) as parquet, atomically. Nested lists/dicts are kept as arrow types."""
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema else pa.table({})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def read_rows(path: str | Path) -> list[dict]:
    """Read a parquet file written by `write_rows` back into a list of dicts."""
    return pq.read_table(path).to_pylist()
