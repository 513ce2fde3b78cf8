"""Prompt pools: ingest from jsonl / parquet / a saved HF dataset / Anthropic HH transcripts, normalize, dedup.

Every source is normalized to `preference.schema.Prompt` (id, messages, slice, source, metadata). Malformed
input is never dropped silently: each rejected line is reported with its file and line number, written to the
step's `rejected.jsonl`, and counted in the manifest (with `strict: true` any malformed line fails the ingest).

Accepted row shapes (jsonl lines, parquet rows, dataset rows):
- `{"messages": [{"role": "user", "content": ...}, ...]}` (a conversation ending with a user turn)
- `{"prompt": "text"}` (one user turn) or `{"prompt": [messages]}` (TRL conversational format)
- HH format `{"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...}`: the prompt is the transcript
  up to the last Assistant turn; the two answers are kept as `reference_chosen` / `reference_rejected` metadata
  (the simulated annotator and evaluation use them).
Optional keys: `id` (else a content hash), `slice` or `category` (else the source's `slice`), `metadata`.

`format: traffic`: the log folder (or one file) `curate serve` writes (see `curation.serving.traffic`): served prompts
with the answer users saw (`served_completion` metadata) and their thumbs; thumbs-down items carry
`failure_reason: "feedback: thumbs down"` (error-based candidates). The step also writes `feedback.parquet`
(`preference.schema.Feedback` rows, always, possibly empty) and `traffic.parquet` (the responses it ingested).
Every round reads the traffic its earlier rounds have not seen; a missing traffic folder is no traffic yet.
Corrupt log lines are skipped and reported (file:line) in `rejected.jsonl`.

Dedup: exact (normalized text) and near-duplicates (MinHash over word 3-gram shingles + LSH banding, verified
by Jaccard similarity ≥ `near_duplicate_threshold`); the first occurrence wins and removals are counted.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from curation.serving.traffic import (
    TrafficSeen,
    feedback_schema,
    new_responses,
    read_traffic,
    seen_traffic,
    traffic_files,
    traffic_items,
    traffic_schema,
)
from preference.plumbing.errors import CurateError
from preference.plumbing.io import RowWriter, count_rows, iter_rows, open_text, read_rows, write_rows
from preference.schema import Feedback, Prompt, parse_hh, prompt_text, stable_id, validate_messages

FORMATS = ("auto", "jsonl", "parquet", "hf", "hh", "traffic")


@dataclass
class PoolSource:
    path: Path
    format: Literal["auto", "jsonl", "parquet", "hf", "hh", "traffic"] = "auto"
    slice: str = "default"  # slice for rows that do not name one
    limit: int | None = None  # take at most this many valid rows from this source
    license: str | None = None  # the prompts' licence (an SPDX id such as mit), for `curate export`'s dataset card

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1 or null, got {self.limit}")


@dataclass
class PoolConfig:
    sources: list[PoolSource] = field(default_factory=list)
    dedup: bool = True
    near_duplicate_threshold: float = 0.85  # Jaccard similarity of word 3-gram shingles; 1.0 = exact only
    strict: bool = False  # fail on the first malformed row instead of rejecting it with a report
    max_prompt_chars: int = 8000  # longer prompts are rejected (reported), not truncated

    def __post_init__(self):
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise ValueError(f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold}")


@dataclass
class Rejected:
    source: str  # "file:line" or "file#row"
    reason: str

    def to_row(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason}


@dataclass
class IngestResult:
    prompts: list[Prompt]
    rejected: list[Rejected]
    read: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    feedback: list[Feedback] = field(default_factory=list)  # traffic sources: rated served answers
    traffic: list[dict] = field(default_factory=list)  # traffic sources: the responses ingested
    traffic_counts: dict[str, int] = field(default_factory=dict)
    prompt_count: int | None = None  # prompts written (when they were streamed to a file, not kept in `prompts`)
    seed_prompts_removed: int | None = None  # prompts dropped because imported labels cover them (round 0)

    def counts(self) -> dict[str, int]:
        return {
            **({"seed_prompts_removed": self.seed_prompts_removed} if self.seed_prompts_removed is not None else {}),
            "read": self.read,
            "prompts": len(self.prompts) if self.prompt_count is None else self.prompt_count,
            "rejected": len(self.rejected),
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            **({"feedback": len(self.feedback), **self.traffic_counts} if self.traffic_counts else {}),
        }


# --------------------------------------------------------------------------------------------------- parsing
def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        if traffic_files(path):
            return "traffic"
        raise CurateError(f"{path}: a folder but not a saved HF dataset (no dataset_info.json); pass a file")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        with open_text(path) as fh:
            for line in fh:
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError:
                        return "jsonl"  # the line-level parser reports it
                    is_hh = isinstance(first, dict) and "chosen" in first and "prompt" not in first
                    if isinstance(first, dict) and first.get("type") in ("response", "feedback", "error"):
                        return "traffic"
                    return "hh" if is_hh else "jsonl"
        return "jsonl"
    raise CurateError(
        f"{path}: cannot tell the format from the name; expected .jsonl[.gz], .parquet or a saved HF dataset "
        f"folder, or set `format:` to one of {', '.join(FORMATS[1:])}"
    )


def row_to_prompt(row: Any, *, default_slice: str, source: str, hh: bool = False) -> Prompt:
    """Normalize one input row; raises ValueError with a human reason when it is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    metadata: dict[str, str] = {}
    if hh or ("chosen" in row and "prompt" not in row and "messages" not in row):
        messages, chosen, rejected = parse_hh(row)
        metadata["reference_chosen"] = chosen
        if rejected is not None:
            metadata["reference_rejected"] = rejected
    elif "messages" in row:
        messages = validate_messages(row["messages"])
    elif "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            messages = validate_messages([{"role": "user", "content": prompt}])
        else:
            messages = validate_messages(prompt)
    else:
        raise ValueError(f"no 'messages', 'prompt' or HH 'chosen' key (keys: {', '.join(sorted(row)) or 'none'})")
    extra = row.get("metadata") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"'metadata' must be an object, got {type(extra).__name__}")
    metadata.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    slice_name = row.get("slice") or row.get("category") or default_slice
    if not isinstance(slice_name, str):
        raise ValueError(f"'slice' must be a string, got {type(slice_name).__name__}")
    given_id = row.get("id")
    if given_id is not None and not isinstance(given_id, (str, int)):
        raise ValueError(f"'id' must be a string or integer, got {type(given_id).__name__}")
    prompt_id = str(given_id) if given_id is not None else stable_id(messages, prefix="p")
    return Prompt(id=prompt_id, messages=messages, slice=slice_name, source=source, metadata=metadata)


def iter_file_rows(path: Path, fmt: str, *, split: str = "train"):
    """Yield (location, row-or-ValueError) for each input row of a jsonl / parquet / saved HF dataset (`split` of a
    DatasetDict). The one reader of row files: pools and seed labels (`curation.steps.labels`) read through it."""
    if fmt in ("jsonl", "hh"):
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{path}:{lineno}", ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})")
    elif fmt == "parquet":  # streamed a batch at a time
        i = 0
        for rows in iter_rows(path, CHUNK):
            for row in rows:
                yield f"{path}#{i}", row
                i += 1
    elif fmt == "hf":
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise CurateError(f"{path}: a DatasetDict without a {split!r} split (splits: {', '.join(ds)})")
            ds = ds[split]
        for i, row in enumerate(ds):
            yield f"{path}#{i}", row
    else:
        raise CurateError(f"unknown pool format {fmt!r}; expected one of {', '.join(FORMATS)}")


def iter_source(src: PoolSource, *, strict: bool, max_chars: int, rejected: list[Rejected] | None = None,
                on_reject=None, counter: dict | None = None):
    """The valid prompts of one (non-traffic) source, streamed; malformed rows go to `on_reject` (or `rejected`),
    and `counter["read"]` counts the rows read."""
    path = Path(src.path)
    if not path.exists():
        raise CurateError(f"pool source {path} does not exist; fix `pool.sources[].path` (relative to the cwd)")
    fmt = detect_format(path) if src.format == "auto" else src.format
    counter = counter if counter is not None else {}
    counter.setdefault("read", 0)
    reject = on_reject or (rejected.append if rejected is not None else (lambda r: None))
    kept = 0
    for where, row in iter_file_rows(path, fmt):
        counter["read"] += 1
        try:
            if isinstance(row, ValueError):
                raise row
            prompt = row_to_prompt(row, default_slice=src.slice, source=where, hh=fmt == "hh")
            if len(prompt.text) > max_chars:
                raise ValueError(f"prompt has {len(prompt.text)} characters, more than max_prompt_chars={max_chars}")
        except ValueError as exc:
            if strict:
                raise CurateError(f"{where}: {exc} (strict mode; set pool.strict: false to reject and go on)") from exc
            reject(Rejected(where, str(exc)))
            continue
        yield prompt
        kept += 1
        if src.limit is not None and kept >= src.limit:
            break


def read_source(src: PoolSource, *, strict: bool, max_chars: int) -> tuple[list[Prompt], list[Rejected], int]:
    path = Path(src.path)
    if not path.exists() and src.format != "traffic":  # a traffic folder appears once `curate serve` ran
        raise CurateError(f"pool source {path} does not exist; fix `pool.sources[].path` (relative to the cwd)")
    fmt = detect_format(path) if src.format == "auto" else src.format
    if fmt == "traffic":  # the served prompts only (`ingest` also collects their feedback)
        result = read_traffic_source(src, seen=TrafficSeen(), max_chars=max_chars, round_number=0)
        return result.prompts, result.rejected, result.read
    rejected: list[Rejected] = []
    counter: dict = {}
    prompts = list(iter_source(src, strict=strict, max_chars=max_chars, rejected=rejected, counter=counter))
    return prompts, rejected, counter["read"]


# ----------------------------------------------------------------------------------------------------- dedup
CHUNK = 4096  # prompts per streamed batch (MinHash, parquet writes)
NUM_PERM, BANDS, ROWS = 64, 16, 4  # MinHash permutations = LSH bands × rows per band
MAX_BUCKET = 200  # LSH buckets larger than this are not compared pairwise (a common boilerplate prompt)


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _shingles(text: str, n: int = 3) -> set[str]:
    words = normalize_text(text).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _hash_family(num_perm: int = NUM_PERM, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    prime = (1 << 61) - 1
    rng = np.random.default_rng(seed)
    return rng.integers(1, prime, size=num_perm, dtype=np.uint64), rng.integers(0, prime, size=num_perm, dtype=np.uint64)


def _minhash(shingle_sets: list[set[str]], num_perm: int = NUM_PERM, seed: int = 1) -> np.ndarray:
    """(N, num_perm) MinHash signatures with universal hashing over a 61-bit prime, computed for all the sets'
    shingles at once (one array op per batch, not per prompt)."""
    prime = np.uint64((1 << 61) - 1)
    a, b = _hash_family(num_perm, seed)
    sigs = np.full((len(shingle_sets), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    sizes = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=len(shingle_sets))
    if not sizes.sum():
        return sigs
    h = np.fromiter((int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "little") >> 3
                     for shingles in shingle_sets for x in shingles), dtype=np.uint64, count=int(sizes.sum()))
    # (a*h + b) mod p with object-free uint64 arithmetic: wraparound is fine for a hash family here.
    values = (h[:, None] * a[None, :] + b[None, :]) % prime
    nonempty = np.flatnonzero(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[nonempty]
    sigs[nonempty] = np.minimum.reduceat(values, starts, axis=0)
    return sigs


def _band_keys(sigs: np.ndarray) -> np.ndarray:
    """(N, BANDS) uint64: one key per LSH band (its ROWS signature values mixed into one word; a collision of
    the mix only adds a candidate pair, which the Jaccard check then refuses)."""
    keys = np.zeros((len(sigs), BANDS), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(ROWS):
            keys = keys * np.uint64(0x9E3779B97F4A7C15) + sigs[:, r::ROWS][:, :BANDS]
    return keys


class NearDuplicates:
    """Near-duplicate detection with bounded memory: MinHash over word 3-gram shingles, LSH banding with the band
    keys kept on disk (one file per band, 8 bytes per prompt), candidate pairs found by sorting one band at a
    time, then verified by the exact Jaccard similarity of the two prompts' shingles (read back only for the
    candidates). The first occurrence wins: candidate pairs are visited in (earlier, later) order and the later
    one is removed when neither was removed before.

        near = NearDuplicates(folder, threshold)
        near.add(texts)                       # in pool order, any batch size
        removed = near.removed(texts_of)      # texts_of(indices) -> {index: text}
    """

    def __init__(self, folder: Path, threshold: float):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.threshold = threshold
        self.count = 0
        self._files = [self.folder / f"band-{b:02d}.u64" for b in range(BANDS)]
        for f in self._files:
            f.write_bytes(b"")

    def add(self, texts: list[str]) -> None:
        keys = _band_keys(_minhash([_shingles(t) for t in texts]))
        for b, f in enumerate(self._files):
            with open(f, "ab") as fh:
                fh.write(np.ascontiguousarray(keys[:, b]).tobytes())
        self.count += len(texts)

    def candidates(self) -> np.ndarray:
        """Sorted unique (i, j), i < j, sharing an LSH bucket of 2..MAX_BUCKET prompts, encoded as i·N + j."""
        n = self.count
        found: list[np.ndarray] = []
        for f in self._files:
            keys = np.fromfile(f, dtype=np.uint64)
            order = np.argsort(keys, kind="stable")
            ordered = keys[order]
            edges = np.flatnonzero(np.diff(ordered)) + 1
            starts = np.concatenate([[0], edges])
            sizes = np.diff(np.concatenate([starts, [len(keys)]]))
            for start, size in zip(starts[(sizes > 1) & (sizes <= MAX_BUCKET)].tolist(),
                                   sizes[(sizes > 1) & (sizes <= MAX_BUCKET)].tolist(), strict=True):
                members = np.sort(order[start : start + size]).astype(np.int64)
                i, j = np.triu_indices(size, k=1)
                found.append(members[i] * n + members[j])
            del keys, order, ordered
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

    def removed(self, texts_of) -> set[int]:
        pairs = self.candidates()
        if not len(pairs):
            return set()
        n = self.count
        shingles = {i: _shingles(t) for i, t in texts_of(set(np.unique(np.concatenate([pairs // n, pairs % n]))
                                                          .tolist())).items()}
        removed: set[int] = set()
        for i, j in zip((pairs // n).tolist(), (pairs % n).tolist(), strict=True):
            if i in removed or j in removed:
                continue
            si, sj = shingles[i], shingles[j]
            if len(si & sj) / max(1, len(si | sj)) >= self.threshold:
                removed.add(j)
        return removed


def _exact_key(p: Prompt) -> bytes:
    return hashlib.blake2b(normalize_text(prompt_text(p.messages)).encode(), digest_size=16).digest()


def dedup(prompts: list[Prompt], near_threshold: float) -> tuple[list[Prompt], int, int]:
    """Drop exact and near duplicates (first occurrence wins). Returns (kept, n_exact, n_near)."""
    import tempfile

    seen: set[bytes] = set()
    unique: list[Prompt] = []
    for p in prompts:
        key = _exact_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    exact = len(prompts) - len(unique)
    if near_threshold >= 1.0 or len(unique) < 2:
        return unique, exact, 0
    with tempfile.TemporaryDirectory(prefix="curate-dedup-") as tmp:
        near = NearDuplicates(Path(tmp), near_threshold)
        for start in range(0, len(unique), CHUNK):
            near.add([prompt_text(p.messages) for p in unique[start : start + CHUNK]])
        removed = near.removed(lambda idx: {i: prompt_text(unique[i].messages) for i in idx})
    return [p for i, p in enumerate(unique) if i not in removed], exact, len(removed)


def is_traffic(src: PoolSource) -> bool:
    return src.format == "traffic" or (src.format == "auto" and Path(src.path).exists()
                                       and detect_format(Path(src.path)) == "traffic")


def read_traffic_source(src: PoolSource, *, seen: TrafficSeen, max_chars: int, round_number: int) -> IngestResult:
    """A `format: traffic` source: the responses (and feedback) earlier rounds have not ingested."""
    log = read_traffic(src.path)
    responses = new_responses(log, seen)
    rejected = [Rejected(where, reason) for where, reason in log.corrupt]
    kept = []
    for r in responses:
        if len(prompt_text(r.messages)) > max_chars:
            rejected.append(Rejected(r.where, f"prompt longer than max_prompt_chars={max_chars}"))
        else:
            kept.append(r)
    if src.limit is not None:
        kept = kept[-src.limit :]  # the most recent traffic
    items = traffic_items(kept, default_slice=src.slice, round_number=round_number)
    counts = {"traffic_responses": len(kept), "thumbs_down": sum(r.rating == "down" for r in kept),
              "traffic_corrupt_lines": len(log.corrupt)}
    if log.orphan_feedback:
        counts["traffic_orphan_feedback"] = log.orphan_feedback
    return IngestResult(items.prompts, rejected, read=log.lines, feedback=items.feedback, traffic=items.rows,
                        traffic_counts=counts)


def _merge_traffic(results: list[IngestResult]) -> IngestResult:
    out = IngestResult([], [])
    for r in results:
        out.prompts += r.prompts
        out.rejected += r.rejected
        out.read += r.read
        out.feedback += r.feedback
        out.traffic += r.traffic
        for k, v in r.traffic_counts.items():
            out.traffic_counts[k] = out.traffic_counts.get(k, 0) + v
    return out


class _Sink:
    """Where ingestion puts its prompts and rejected rows: lists (`ingest`) or streamed files (`run_pool`)."""

    def __init__(self, prompts_path: Path | None = None, rejected_path: Path | None = None,
                 drop_keys: set[str] | None = None):
        self.drop_keys = drop_keys  # prompt keys the imported seed labels cover (`training.data.prompt_key`)
        self.dropped = 0
        self.prompts: list[Prompt] = []
        self.rejected: list[Rejected] = []
        self.rejected_count = 0
        self._writer = RowWriter(prompts_path, prompt_schema()) if prompts_path is not None else None
        self._rejected_fh = open(rejected_path, "w") if rejected_path is not None else None  # noqa: SIM115

    def prompt(self, rows: list[dict]) -> None:
        if self.drop_keys:
            from training.data import prompt_key

            kept = [r for r in rows if prompt_key(r["messages"]) not in self.drop_keys]
            self.dropped += len(rows) - len(kept)
            rows = kept
        if self._writer is not None:
            self._writer.write(rows)
        else:
            self.prompts += [Prompt.from_row(r) for r in rows]

    def reject(self, r: Rejected) -> None:
        self.rejected_count += 1
        if self._rejected_fh is not None:
            self._rejected_fh.write(json.dumps(r.to_row(), ensure_ascii=False) + "\n")
            if len(self.rejected) < 5:
                self.rejected.append(r)  # examples for the manifest
        else:
            self.rejected.append(r)

    def __enter__(self) -> _Sink:
        if self._writer is not None:
            self._writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.__exit__(*exc)
        if self._rejected_fh is not None:
            self._rejected_fh.close()


def prompt_schema():
    """Arrow schema of `pool/prompts.parquet` (`Prompt.to_row()`: metadata as a JSON string)."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("messages", pa.list_(pa.struct([("role", pa.string()),
                                                                            ("content", pa.string())]))),
                      ("slice", pa.string()), ("source", pa.string()), ("metadata", pa.string())])


def _stream_dedup(stream, cfg: PoolConfig, sink: _Sink, work: Path, counts: dict) -> None:
    """Prompts of `stream` (in pool order) → `sink`, without exact and near duplicates and with unique ids.

    Three passes in bounded memory: (1) exact duplicates by a 16-byte hash of the normalized text (a set of
    hashes), the first occurrences staged to `work/staged.parquet`, their MinHash band keys to disk
    (`NearDuplicates`); (2) near-duplicate candidates from the bands, verified by Jaccard; (3) the staged prompts
    streamed to the sink minus the near duplicates and minus later prompts reusing an id (rejected)."""
    near_on = cfg.dedup and cfg.near_duplicate_threshold < 1.0
    near = NearDuplicates(work / "lsh", cfg.near_duplicate_threshold) if near_on else None
    staged = work / "staged.parquet"
    seen: set[bytes] = set()
    ids: dict[str, str] = {}
    counts.update(exact_duplicates=0, near_duplicates=0)
    with RowWriter(staged, prompt_schema()) as out:
        batch: list[Prompt] = []

        def flush():
            out.write([p.to_row() for p in batch])
            if near is not None:
                near.add([prompt_text(p.messages) for p in batch])
            batch.clear()

        for p in stream:
            if cfg.dedup:
                key = _exact_key(p)
                if key in seen:
                    counts["exact_duplicates"] += 1
                    continue
                seen.add(key)
            elif p.id in ids:
                raise CurateError(f"{p.source}: id {p.id!r} already used at {ids[p.id]}; ids must be unique")
            else:
                ids[p.id] = p.source
            batch.append(p)
            if len(batch) >= CHUNK:
                flush()
        flush()
    del seen, ids
    removed: set[int] = set()
    if near is not None and near.count >= 2:
        def texts_of(wanted: set[int]) -> dict[int, str]:
            out, offset = {}, 0
            for rows in iter_rows(staged, CHUNK, columns=["messages"]):
                for i, row in enumerate(rows, offset):
                    if i in wanted:
                        out[i] = prompt_text(row["messages"])
                offset += len(rows)
            return out

        removed = near.removed(texts_of)
    counts["near_duplicates"] = len(removed)
    # Same id, different text (after dedup): keep the first, reject the others (instead of failing the pool).
    kept_ids: set[str] = set()
    offset = 0
    for rows in iter_rows(staged, CHUNK):
        keep = []
        for i, row in enumerate(rows, offset):
            if i in removed:
                continue
            if row["id"] in kept_ids:
                sink.reject(Rejected(row["source"], f"id {row['id']!r} repeated with different text"))
                continue
            kept_ids.add(row["id"])
            keep.append(row)
        offset += len(rows)
        sink.prompt(keep)
    counts["prompts"] = len(kept_ids)
    staged.unlink()
    shutil.rmtree(work / "lsh", ignore_errors=True)


def _ingest(cfg: PoolConfig, sink: _Sink, work: Path, *, seen: TrafficSeen | None, round_number: int
            ) -> IngestResult:
    """`pool.sources` → `sink` (served traffic first: it carries feedback, so it wins dedup ties). Returns the
    counts, and the traffic sources' feedback and responses (prompts and rejected rows went to the sink)."""
    if not cfg.sources:
        raise CurateError("pool.sources is empty; list at least one file, e.g. `- path: data/prompts.jsonl`")
    traffic = _merge_traffic([
        read_traffic_source(src, seen=seen or TrafficSeen(), max_chars=cfg.max_prompt_chars, round_number=round_number)
        for src in cfg.sources if is_traffic(src)
    ])
    counter = {"read": traffic.read}
    files = [src for src in cfg.sources if not is_traffic(src)]
    for src in files:  # fail on a missing file before reading anything
        if not Path(src.path).exists():
            raise CurateError(f"pool source {src.path} does not exist; fix `pool.sources[].path` (relative to the cwd)")

    def stream():
        yield from traffic.prompts
        for src in files:
            yield from iter_source(src, strict=cfg.strict, max_chars=cfg.max_prompt_chars, on_reject=sink.reject,
                                   counter=counter)

    counts: dict[str, int] = {}
    _stream_dedup(stream(), cfg, sink, work, counts)
    for r in traffic.rejected:
        sink.reject(r)
    result = IngestResult([], [], counter["read"], counts["exact_duplicates"], counts["near_duplicates"],
                          feedback=traffic.feedback, traffic=traffic.traffic, traffic_counts=traffic.traffic_counts)
    result.prompt_count = counts["prompts"]
    return result


def ingest(cfg: PoolConfig, *, seen: TrafficSeen | None = None, round_number: int = 0) -> IngestResult:
    """The pool in memory (`run_pool` streams the same to files): prompts without duplicates, rejected rows."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="curate-pool-") as tmp, _Sink() as sink:
        result = _ingest(cfg, sink, Path(tmp), seen=seen, round_number=round_number)
    result.prompts, result.rejected = sink.prompts, sink.rejected
    return result


def run_pool(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Round step `pool`: round 1 ingests `cfg.pool.sources`; later rounds carry the previous pool over, minus
    the items already sent to reviewers, plus the previous round's failures (error-based candidates). Prompts
    and rejected rows are streamed to their files (bounded memory, whatever the pool's size)."""
    previous = rnd.previous()
    inputs = ()
    if previous is not None:
        inputs = tuple(s for s in (previous.step("pool"), previous.step("select"), previous.step("failures")) if s.done)
    seeds = rnd.project.bootstrap_round().step("labels") if 0 in rnd.project.rounds() else None
    if seeds is not None and seeds.done:  # imported labels (round 0): their prompts leave the pool
        inputs += (seeds,)
    run = rnd.start_step("pool", cfg.pool, inputs=inputs, seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("pool").manifest()
    with run:
        seen = seen_traffic(rnd.earlier())
        work = run.parts_dir
        drop = seed_prompt_keys(rnd.project.root) if seeds is not None and seeds.done else None
        with _Sink(run.path / "prompts.parquet", run.path / "rejected.jsonl", drop_keys=drop) as sink:
            if previous is None or not previous.step("pool").done:
                result = _ingest(cfg.pool, sink, work, seen=seen, round_number=rnd.number)
            else:
                new = _merge_traffic([read_traffic_source(src, seen=seen, max_chars=cfg.pool.max_prompt_chars,
                                                          round_number=rnd.number)
                                      for src in cfg.pool.sources if is_traffic(src)])
                result = _carry_over(previous, new, sink)
        shutil.rmtree(work, ignore_errors=True)
        write_rows(run.path / "feedback.parquet", [f.to_row() for f in result.feedback], schema=feedback_schema())
        if any(is_traffic(src) for src in cfg.pool.sources):
            write_rows(run.path / "traffic.parquet", result.traffic, schema=traffic_schema())
        if drop is not None:
            result.seed_prompts_removed = sink.dropped
        run.counts.update(result.counts())
        run.counts.update(prompts=result.prompt_count - sink.dropped, rejected=sink.rejected_count)
        if sink.rejected:
            run.extra["rejected_examples"] = [r.to_row() for r in sink.rejected[:5]]
    return rnd.step("pool").manifest()


def _carry_over(previous, new: IngestResult, sink: _Sink) -> IngestResult:
    """The previous pool minus its selected items and minus prompts new traffic replaces (fresher metadata), plus
    the previous round's failures, plus the new traffic — streamed into `sink`."""
    labelled: set[str] = set()
    if previous.step("select").done:
        labelled = {r["prompt_id"] for rows in iter_rows(previous.step("select").file("selected.parquet"),
                                                         columns=["prompt_id"]) for r in rows}
    failures = []
    if previous.step("failures").done:
        failures = [Prompt.from_row(r) for r in read_rows(previous.step("failures").file("prompts.parquet"))]
    fresh = {p.id for p in new.prompts}
    failure_ids = {f.id for f in failures}
    present: set[str] = set()
    read = kept = 0
    for rows in iter_rows(previous.step("pool").file("prompts.parquet"), CHUNK):
        read += len(rows)
        keep = [r for r in rows if r["id"] not in labelled]
        present.update(r["id"] for r in keep if r["id"] in failure_ids)
        keep = [r for r in keep if r["id"] not in fresh]
        kept += len(keep)
        sink.prompt(keep)
    extra = [f for f in failures if f.id not in present and f.id not in fresh] + new.prompts
    sink.prompt([p.to_row() for p in extra])
    for r in new.rejected:
        sink.reject(r)
    result = IngestResult([], [], read=read, feedback=new.feedback, traffic=new.traffic,
                          traffic_counts=new.traffic_counts)
    result.prompt_count = kept + len(extra)
    return result


def seed_prompt_keys(project_root: Path) -> set[str]:
    """Content keys (`training.data.prompt_key`) of the prompts round 0 imported labels for; empty without."""
    from training.data import prompt_key

    step = Path(project_root) / "round-0000" / "labels"
    if not (step / "manifest.json").is_file():
        return set()
    keys = set()
    for name in ("pairs.parquet", "feedback.parquet"):
        if (step / name).is_file():
            keys |= {prompt_key(r["prompt"]) for r in read_rows(step / name)}
    return keys


def load_prompts(rnd) -> list[Prompt]:
    """The prompts of a round's finished `pool` step (the whole pool in memory: `iter_prompts` streams it)."""
    return [Prompt.from_row(r) for r in read_rows(rnd.step("pool").file("prompts.parquet"))]


def iter_prompts(rnd, batch_size: int = CHUNK, columns: list[str] | None = None):
    """The prompts of a round's finished `pool` step, `batch_size` at a time (lists of `Prompt`), in pool order."""
    for rows in iter_rows(rnd.step("pool").file("prompts.parquet"), batch_size, columns):
        yield [Prompt.from_row(r) for r in rows]


def count_prompts(rnd) -> int:
    return count_rows(rnd.step("pool").file("prompts.parquet"))
