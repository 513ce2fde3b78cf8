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
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import numpy as np


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


# ------------------------------------------------------------------------------------------- streaming tables
ROW_GROUP = 16_384  # rows per parquet row group written by `RowWriter` (the unit readers stream)


class RowWriter:
    """Write a parquet file in row groups, atomically (temporary file renamed on success), with bounded memory:
    `write(rows)` buffers dicts and flushes a row group every `row_group` rows. The schema is `schema`, else the
    first batch's (later batches are cast to it). A file with no rows gets `schema`'s columns (or none).

        with RowWriter(path, schema) as out:
            for chunk in chunks:
                out.write(rows_of(chunk))
    """

    def __init__(self, path: str | Path, schema: pa.Schema | None = None, row_group: int = ROW_GROUP):
        self.path = Path(path)
        self.schema = schema
        self.row_group = row_group
        self.rows = 0
        self._buffer: list[dict] = []
        self._tables: list[pa.Table] = []
        self._table_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._atomic = atomic_path(self.path)
        self._tmp: Path | None = None

    def __enter__(self) -> RowWriter:
        self._tmp = self._atomic.__enter__()
        return self

    def write(self, rows: Iterable[dict]) -> None:
        self._flush_tables()  # tables given before these rows go first
        self._buffer.extend(rows)
        if len(self._buffer) >= self.row_group:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append an Arrow table (cast to the file's schema); small tables are gathered into full row groups
        (a file of thousands of tiny row groups has a footer that every reader parses)."""
        self._flush()  # rows given as dicts before this table go first
        if table.num_rows:
            self._open(table.schema)
            self._tables.append(table.cast(self.schema) if table.schema != self.schema else table)
            self._table_rows += table.num_rows
            if self._table_rows >= self.row_group:
                self._flush_tables()

    def _open(self, schema: pa.Schema) -> None:
        if self._writer is None:
            self.schema = self.schema or schema
            self._writer = pq.ParquetWriter(self._tmp, self.schema)

    def _flush_tables(self) -> None:
        if self._tables:
            table = pa.concat_tables(self._tables)
            self._tables, self._table_rows = [], 0
            self._writer.write_table(table, row_group_size=self.row_group)
            self.rows += table.num_rows

    def _flush(self) -> None:
        self._flush_tables()
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._buffer = []
        self._open(table.schema)
        self._writer.write_table(table, row_group_size=self.row_group)
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is None:
                self._flush()
                if self._writer is None:  # no rows at all: an empty file with the schema's columns (or none)
                    pq.write_table(pa.Table.from_pylist([], schema=self.schema) if self.schema else pa.table({}),
                                   self._tmp)
                else:
                    self._writer.close()
            elif self._writer is not None:
                self._writer.close()
        finally:
            self._atomic.__exit__(exc_type, exc, tb)
        return False


def iter_batches(path: str | Path, batch_size: int = ROW_GROUP, columns: list[str] | None = None
                 ) -> Iterator[pa.RecordBatch]:
    """The parquet file's rows as Arrow record batches of at most `batch_size` rows (bounded memory)."""
    handle = pq.ParquetFile(path)
    if handle.metadata.num_columns == 0 or handle.metadata.num_rows == 0:
        return
    yield from handle.iter_batches(batch_size=batch_size, columns=columns)


def iter_rows(path: str | Path, batch_size: int = ROW_GROUP, columns: list[str] | None = None
              ) -> Iterator[list[dict]]:
    """The parquet file's rows as lists of dicts, `batch_size` at a time (`read_rows` in bounded memory)."""
    for batch in iter_batches(path, batch_size, columns):
        yield batch.to_pylist()


def count_rows(path: str | Path) -> int:
    """Rows of a parquet file (from its footer, nothing else read)."""
    return pq.ParquetFile(path).metadata.num_rows


def iter_row_range(path: str | Path, start: int, stop: int, batch_size: int = ROW_GROUP) -> Iterator[pa.Table]:
    """Rows [start, stop) of a parquet file as Arrow tables of at most `batch_size` rows, reading only the row
    groups that hold them (a shard of a file on shared storage, read by the worker that processes it)."""
    handle = pq.ParquetFile(path)
    meta = handle.metadata
    first = 0
    pending: list[pa.Table] = []
    size = 0
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + rows)
        if lo < hi:
            pending.append(handle.read_row_group(g).slice(lo - first, hi - lo))
            size += hi - lo
            while size >= batch_size:
                table = pa.concat_tables(pending)
                yield table.slice(0, batch_size)
                rest = table.slice(batch_size)
                pending, size = ([rest] if rest.num_rows else []), rest.num_rows
        first += rows
        if first >= stop:
            break
    if size:
        yield pa.concat_tables(pending)


def read_scores(path: Path) -> tuple[pa.Table, np.ndarray | None]:
    """A scores parquet → (table without the embedding column, (N, D) float32 embeddings or None). The
    embeddings are read batch by batch into one preallocated array (no Arrow or Python copy of them)."""
    import numpy as np
    import pyarrow.compute as pc

    from preference.plumbing.errors import CurateError

    handle = pq.ParquetFile(path)
    names = handle.schema_arrow.names
    if handle.metadata.num_rows == 0 and not names:  # an empty step output written without a schema
        return pq.read_table(path), None
    if "prompt_id" not in names and "completion_id" not in names:
        raise CurateError(f"{path}: no prompt_id/completion_id column (columns: {', '.join(names)})")
    table = pq.read_table(path, columns=[c for c in names if c != "embedding"])
    if "embedding" not in names:
        return table, None
    out: np.ndarray | None = None
    row = 0
    for batch in handle.iter_batches(batch_size=ROW_GROUP, columns=["embedding"]):
        col = batch.column(0)
        if col.null_count:
            raise CurateError(f"{path}: {col.null_count} rows have no embedding; rerun `curate score`")
        lengths = np.asarray(pc.list_value_length(col))
        if out is None:
            dim = int(lengths[0]) if len(lengths) else 0
            out = np.empty((table.num_rows, dim), dtype=np.float32)
        if len(lengths) and (lengths != out.shape[1]).any():
            raise CurateError(f"{path}: embeddings have different lengths "
                              f"({sorted({out.shape[1], *lengths.tolist()})[:4]})")
        out[row : row + len(col)] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), out.shape[1])
        row += len(col)
    return table, out if out is not None else np.zeros((0, 0), dtype=np.float32)
