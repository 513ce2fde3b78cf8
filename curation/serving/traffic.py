"""Served traffic: the append-only JSONL log `curate serve` writes, and reading it back as pool items.

The log is a folder of files `traffic-000001.jsonl`, `traffic-000002.jsonl`, … (a new file per server start and
whenever the current one passes `rotate_bytes`), one JSON object per line:

    {"type": "response", "id": "chatcmpl-…", "time": "2026-…Z", "model_version": "v0003", "served_model": "v0003",
     "messages": [{"role": "user", "content": "…"}], "completion": "…", "finish_reason": "stop",
     "slice": "billing" | null, "user": "…" | null, "params": {"max_tokens": 128, …}, "usage": {…},
     "latency_ms": 812.5}
    {"type": "feedback", "id": "fb-…", "time": "…", "response_id": "chatcmpl-…", "rating": "up" | "down",
     "comment": "…", "model_version": "v0003"}
    {"type": "error", "time": "…", "status": 400, "reason": "…", "messages": […]}   (a request the model refused)

Durability: `TrafficLog.append` writes the whole line with one `write`, then fsyncs, before it returns; the
serving layer answers only after that, so an acknowledged request or feedback is on disk. A file is never
appended to after a restart, so a line cut by a crash stays the last line of its file; readers skip it (and any
other corrupt line) and report it with its file and line number.

As a pool source (`format: traffic`, see `curation.steps.pool`): every served response is a prompt (grouped by
conversation), with
- metadata `served_completion` (the answer users saw: the thumbs-down one if any, else the latest), which the
  generate step adds to the candidates as the completion of model "served" (`generation.include_references`),
  plus `served_response_id`, `model_version`, `thumbs_up`, `thumbs_down`, `feedback_comment`;
- metadata `failure_reason: "feedback: thumbs down"` when a user rated an answer down: an error-based candidate
  (`curation.steps.select.failure_reasons` gives it `error_score` 1.0);
- one `preference.schema.Feedback` row per rated response (the latest rating wins), label True = thumbs up.
Each round ingests only what earlier rounds' pools have not seen (`seen_traffic`): new responses, and old
responses that received new feedback.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preference.plumbing.io import open_text, read_rows
from preference.schema import Feedback, Prompt, stable_id, validate_messages

FILE_GLOB = "traffic-*.jsonl*"
RATINGS = ("up", "down")
THUMBS_DOWN_REASON = "feedback: thumbs down"
SERVED_KEY = "served_completion"  # metadata key generate turns into a completion of model "served"


# ------------------------------------------------------------------------------------------------- records
def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def response_record(*, response_id: str, messages: list[dict[str, str]], completion: str, model_version: str,
                    served_model: str, finish_reason: str = "", slice: str | None = None, user: str | None = None,
                    params: dict | None = None, usage: dict | None = None, latency_ms: float = 0.0) -> dict:
    """The log line of one served answer (written by the serving layer before it answers)."""
    return {"type": "response", "id": response_id, "time": now(), "model_version": model_version,
            "served_model": served_model, "messages": messages, "completion": completion,
            "finish_reason": finish_reason, "slice": slice, "user": user, "params": params or {},
            "usage": usage or {}, "latency_ms": round(latency_ms, 1)}


def feedback_record(*, feedback_id: str, response_id: str, rating: str, comment: str = "",
                    model_version: str = "") -> dict:
    """The log line of one user rating of a served answer."""
    return {"type": "feedback", "id": feedback_id, "time": now(), "response_id": response_id, "rating": rating,
            "comment": comment, "model_version": model_version}


def error_record(*, status: int, reason: str, messages: Any = None) -> dict:
    """The log line of a request that got no answer (the model server refused it or did not answer)."""
    return {"type": "error", "time": now(), "status": status, "reason": reason, "messages": messages}


# ------------------------------------------------------------------------------------------------- writing
class TrafficLog:
    """Append-only, fsynced, size-rotated JSONL log (thread-safe; one instance per process)."""

    def __init__(self, folder: str | Path, rotate_bytes: int = 64 * 2**20):
        if rotate_bytes < 1:
            raise ValueError(f"rotate_bytes must be ≥ 1, got {rotate_bytes}")
        self.folder = Path(folder)
        self.rotate_bytes = rotate_bytes
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0
        self._lock = threading.Lock()

    def _open_next(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        number = max((_file_number(p) for p in self.folder.glob(FILE_GLOB)), default=0) + 1
        while True:  # O_EXCL: another writer process may take the same number first
            path = self.folder / f"traffic-{number:06d}.jsonl"
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                break
            except FileExistsError:
                number += 1
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name is durable too
        finally:
            os.close(dir_fd)
        self.path, self._size = path, 0

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line and fsync it; when this returns, the record survives a crash."""
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is None or (self._size and self._size + len(line) > self.rotate_bytes):
                self._open_next()
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            self._size += len(line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _file_number(path: Path) -> int:
    digits = path.name.removeprefix("traffic-").split(".")[0]
    return int(digits) if digits.isdigit() else 0


# ------------------------------------------------------------------------------------------------- reading
@dataclass
class Served:
    """One served response, with the latest user rating of it (if any)."""

    id: str
    messages: list[dict[str, str]]
    completion: str
    model_version: str
    slice: str | None
    time: str
    where: str  # "file:line"
    finish_reason: str = ""
    rating: str | None = None  # "up" | "down" | None (no feedback)
    comment: str = ""
    feedback_where: str = ""  # "file:line" of the latest feedback
    feedback_ids: list[str] = field(default_factory=list)  # every feedback record on this response

    @property
    def prompt_id(self) -> str:
        return stable_id(self.messages, prefix="p")  # the id any pool source gives this conversation


@dataclass
class TrafficRead:
    responses: dict[str, Served]  # response id → response, in log order
    corrupt: list[tuple[str, str]]  # ("file:line", reason) of lines that could not be read
    lines: int = 0
    errors: int = 0  # logged failed requests (type "error")
    orphan_feedback: int = 0  # feedback whose response is not in the log

    def counts(self) -> dict[str, int]:
        rated = [r for r in self.responses.values() if r.rating]
        return {
            "traffic_lines": self.lines, "traffic_responses": len(self.responses),
            "traffic_rated": len(rated), "traffic_thumbs_down": sum(r.rating == "down" for r in rated),
            "traffic_corrupt_lines": len(self.corrupt), "traffic_orphan_feedback": self.orphan_feedback,
            "traffic_errors": self.errors,
        }


def traffic_files(path: str | Path) -> list[Path]:
    """The log files of a traffic folder (in write order), or the one file given; [] when it does not exist."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.glob(FILE_GLOB), key=lambda p: (_file_number(p), p.name))
    return []


def _lines(files: list[Path]) -> Iterator[tuple[str, str]]:
    for f in files:
        with open_text(f) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield f"{f}:{lineno}", line


def _check_response(rec: dict) -> tuple[str, list[dict[str, str]], str]:
    rid, completion = rec.get("id"), rec.get("completion")
    if not isinstance(rid, str) or not rid:
        raise ValueError("response record without a string 'id'")
    if not isinstance(completion, str):
        raise ValueError(f"response {rid}: 'completion' must be a string")
    return rid, validate_messages(rec.get("messages")), completion


def read_traffic(path: str | Path) -> TrafficRead:
    """Read a traffic log (folder or file). Corrupt lines are skipped and reported with their position."""
    out = TrafficRead(responses={}, corrupt=[])
    for where, line in _lines(traffic_files(path)):
        out.lines += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            out.corrupt.append((where, f"not valid JSON ({exc.msg} at column {exc.colno}); a line cut by a crash?"))
            continue
        try:
            kind = rec.get("type") if isinstance(rec, dict) else None
            if kind == "response":
                rid, messages, completion = _check_response(rec)
                slice_name = rec.get("slice")
                out.responses[rid] = Served(
                    id=rid, messages=messages, completion=completion, model_version=str(rec.get("model_version", "")),
                    slice=slice_name if isinstance(slice_name, str) and slice_name else None,
                    time=str(rec.get("time", "")), where=where, finish_reason=str(rec.get("finish_reason", "")),
                )
            elif kind == "feedback":
                rid, rating = rec.get("response_id"), rec.get("rating")
                if rating not in RATINGS or not isinstance(rid, str):
                    raise ValueError(f"feedback needs 'response_id' and 'rating' in {RATINGS}, got {rating!r}")
                served = out.responses.get(rid)
                if served is None:
                    out.orphan_feedback += 1
                    continue
                served.rating, served.comment = rating, str(rec.get("comment") or "")
                served.feedback_where = where
                served.feedback_ids.append(str(rec.get("id") or where))
            elif kind == "error":
                out.errors += 1
            else:
                raise ValueError(f"unknown record type {kind!r}; expected response, feedback or error")
        except ValueError as exc:
            out.corrupt.append((where, str(exc)))
    return out


# ---------------------------------------------------------------------------------------------- as a pool
@dataclass
class TrafficSeen:
    """What earlier rounds' pools already ingested: response ids and feedback ids."""

    responses: set[str] = field(default_factory=set)
    feedback: set[str] = field(default_factory=set)


def seen_traffic(rounds: Iterable) -> TrafficSeen:
    """Response and feedback ids in the finished `pool/traffic.parquet` of these rounds (e.g. `rnd.earlier()`)."""
    seen = TrafficSeen()
    for r in rounds:
        path = r.step("pool").path / "traffic.parquet"
        if r.step("pool").done and path.is_file():
            for row in read_rows(path):
                seen.responses.add(row["response_id"])
                seen.feedback.update(row.get("feedback_ids") or [])
    return seen


def new_responses(read: TrafficRead, seen: TrafficSeen) -> list[Served]:
    """Responses not ingested yet, or with feedback not ingested yet (a late thumbs-down comes back)."""
    return [r for r in read.responses.values()
            if r.id not in seen.responses or any(f not in seen.feedback for f in r.feedback_ids)]


@dataclass
class TrafficItems:
    prompts: list[Prompt]
    feedback: list[Feedback]
    rows: list[dict]  # pool/traffic.parquet: one row per ingested response


def traffic_items(responses: list[Served], *, default_slice: str, round_number: int = 0) -> TrafficItems:
    """Pool prompts (one per conversation), Feedback rows (one per rated response) and traffic rows."""
    by_prompt: dict[str, list[Served]] = {}
    for r in responses:
        by_prompt.setdefault(r.prompt_id, []).append(r)
    prompts, feedback, rows = [], [], []
    for pid, served in by_prompt.items():
        down = [r for r in served if r.rating == "down"]
        shown = (down or served)[-1]
        metadata = {
            SERVED_KEY: shown.completion, "served_response_id": shown.id, "model_version": shown.model_version,
            "thumbs_up": str(sum(r.rating == "up" for r in served)), "thumbs_down": str(len(down)),
        }
        if down:
            metadata["failure_reason"] = THUMBS_DOWN_REASON
            comments = [r.comment for r in down if r.comment]
            if comments:
                metadata["feedback_comment"] = comments[-1]
        prompts.append(Prompt(id=pid, messages=served[0].messages, slice=served[0].slice or default_slice,
                              source=f"traffic:{served[0].where}", metadata=metadata))
    for r in responses:
        if r.rating is not None:
            source = f"traffic:{r.feedback_where}"
            feedback.append(Feedback(
                id=Feedback.make_id(r.prompt_id, r.completion, source), prompt_id=r.prompt_id, prompt=r.messages,
                completion=[{"role": "assistant", "content": r.completion}], label=r.rating == "up", source=source,
                model_version=r.model_version, comment=r.comment, round=round_number,
            ))
        rows.append({"response_id": r.id, "prompt_id": r.prompt_id, "slice": r.slice or default_slice,
                     "model_version": r.model_version, "time": r.time, "rating": r.rating or "",
                     "feedback_ids": list(r.feedback_ids), "source": r.where})
    return TrafficItems(prompts, feedback, rows)


def feedback_schema():
    """Arrow schema of Feedback rows (so an empty `pool/feedback.parquet` still has its columns)."""
    import pyarrow as pa

    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("prompt", msgs), ("completion", msgs),
                      ("label", pa.bool_()), ("source", pa.string()), ("model_version", pa.string()),
                      ("comment", pa.string()), ("round", pa.int64())])


def traffic_schema():
    """Arrow schema of `pool/traffic.parquet` rows."""
    import pyarrow as pa

    return pa.schema([("response_id", pa.string()), ("prompt_id", pa.string()), ("slice", pa.string()),
                      ("model_version", pa.string()), ("time", pa.string()), ("rating", pa.string()),
                      ("feedback_ids", pa.list_(pa.string())), ("source", pa.string())])


__all__ = ["TrafficLog", "error_record", "feedback_record", "response_record", "TrafficRead", "TrafficSeen", "Served", "new_responses", "read_traffic", "seen_traffic",
           "traffic_files", "traffic_items"]
