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

`format: traffic`: the log folder (or one file) `curate serve` writes (see `curation.traffic`): served prompts
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from curation.labels import seed_prompt_keys
from curation.traffic import (
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
from preference.plumbing.io import open_text, read_rows, write_jsonl, write_rows
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
    seed_prompts_removed: int | None = None  # prompts dropped because imported labels cover them (round 0)

    def counts(self) -> dict[str, int]:
        return {
            **({"seed_prompts_removed": self.seed_prompts_removed} if self.seed_prompts_removed is not None else {}),
            "read": self.read,
            "prompts": len(self.prompts),
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


def iter_rows(path: Path, fmt: str, *, split: str = "train"):
    """Yield (location, row-or-ValueError) for each input row of a jsonl / parquet / saved HF dataset (`split` of a
    DatasetDict). The one reader of row files: pools and seed labels (`curation.labels`) read through it."""
    if fmt in ("jsonl", "hh"):
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{path}:{lineno}", ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})")
    elif fmt == "parquet":
        for i, row in enumerate(read_rows(path)):
            yield f"{path}#{i}", row
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


_iter_rows = iter_rows  # the former private name


def read_source(src: PoolSource, *, strict: bool, max_chars: int) -> tuple[list[Prompt], list[Rejected], int]:
    path = Path(src.path)
    if not path.exists() and src.format != "traffic":  # a traffic folder appears once `curate serve` ran
        raise CurateError(f"pool source {path} does not exist; fix `pool.sources[].path` (relative to the cwd)")
    fmt = detect_format(path) if src.format == "auto" else src.format
    if fmt == "traffic":  # the served prompts only (`ingest` also collects their feedback)
        result = read_traffic_source(src, seen=TrafficSeen(), max_chars=max_chars, round_number=0)
        return result.prompts, result.rejected, result.read
    prompts, rejected, read = [], [], 0
    for where, row in iter_rows(path, fmt):
        read += 1
        try:
            if isinstance(row, ValueError):
                raise row
            prompt = row_to_prompt(row, default_slice=src.slice, source=where, hh=fmt == "hh")
            if len(prompt.text) > max_chars:
                raise ValueError(f"prompt has {len(prompt.text)} characters, more than max_prompt_chars={max_chars}")
        except ValueError as exc:
            if strict:
                raise CurateError(f"{where}: {exc} (strict mode; set pool.strict: false to reject and go on)") from exc
            rejected.append(Rejected(where, str(exc)))
            continue
        prompts.append(prompt)
        if src.limit is not None and len(prompts) >= src.limit:
            break
    return prompts, rejected, read


# ----------------------------------------------------------------------------------------------------- dedup
def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _shingles(text: str, n: int = 3) -> set[str]:
    words = normalize_text(text).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _minhash(shingle_sets: list[set[str]], num_perm: int = 64, seed: int = 1) -> np.ndarray:
    """(N, num_perm) MinHash signatures with universal hashing over 61-bit prime."""
    prime = (1 << 61) - 1
    rng = np.random.default_rng(seed)
    a = rng.integers(1, prime, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, prime, size=num_perm, dtype=np.uint64)
    sigs = np.full((len(shingle_sets), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i, shingles in enumerate(shingle_sets):
        if not shingles:
            continue
        h = np.array(
            [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3 for s in shingles],
            dtype=np.uint64,
        )
        # (a*h + b) mod p with object-free uint64 arithmetic: wraparound is fine for a hash family here.
        sigs[i] = ((h[:, None] * a[None, :] + b[None, :]) % np.uint64(prime)).min(axis=0)
    return sigs


def dedup(prompts: list[Prompt], near_threshold: float) -> tuple[list[Prompt], int, int]:
    """Drop exact and near duplicates (first occurrence wins). Returns (kept, n_exact, n_near)."""
    seen: set[str] = set()
    unique: list[Prompt] = []
    exact = 0
    for p in prompts:
        key = normalize_text(prompt_text(p.messages))
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        unique.append(p)
    if near_threshold >= 1.0 or len(unique) < 2:
        return unique, exact, 0
    shingles = [_shingles(prompt_text(p.messages)) for p in unique]
    sigs = _minhash(shingles)
    bands, rows = 16, 4
    removed: set[int] = set()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i in range(len(unique)):
        for band in range(bands):
            buckets.setdefault((band, sigs[i, band * rows : (band + 1) * rows].tobytes()), []).append(i)
    candidates: set[tuple[int, int]] = set()
    for members in buckets.values():
        if 1 < len(members) <= 200:
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    candidates.add((members[x], members[y]))
    for i, j in sorted(candidates):
        if i in removed or j in removed:
            continue
        si, sj = shingles[i], shingles[j]
        if len(si & sj) / max(1, len(si | sj)) >= near_threshold:
            removed.add(j)
    kept = [p for i, p in enumerate(unique) if i not in removed]
    return kept, exact, len(removed)


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


def ingest(cfg: PoolConfig, *, seen: TrafficSeen | None = None, round_number: int = 0) -> IngestResult:
    if not cfg.sources:
        raise CurateError("pool.sources is empty; list at least one file, e.g. `- path: data/prompts.jsonl`")
    prompts: list[Prompt] = []
    rejected: list[Rejected] = []
    read = 0
    traffic = _merge_traffic([
        read_traffic_source(src, seen=seen or TrafficSeen(), max_chars=cfg.max_prompt_chars, round_number=round_number)
        for src in cfg.sources if is_traffic(src)
    ])
    for src in cfg.sources:
        if is_traffic(src):
            continue
        p, r, n = read_source(src, strict=cfg.strict, max_chars=cfg.max_prompt_chars)
        prompts += p
        rejected += r
        read += n
    prompts = traffic.prompts + prompts  # served items first: they carry feedback, so they win dedup ties
    rejected += traffic.rejected
    read += traffic.read
    ids: dict[str, str] = {}
    for p in prompts:
        if p.id in ids and not cfg.dedup:
            raise CurateError(f"{p.source}: id {p.id!r} already used at {ids[p.id]}; ids must be unique")
        ids.setdefault(p.id, p.source)
    exact = near = 0
    if cfg.dedup:
        prompts, exact, near = dedup(prompts, cfg.near_duplicate_threshold)
    # Same id, different text (after dedup): make ids unique by content instead of failing the whole pool.
    by_id: dict[str, int] = {}
    for p in prompts:
        if p.id in by_id:
            rejected.append(Rejected(p.source, f"id {p.id!r} repeated with different text"))
        by_id[p.id] = by_id.get(p.id, 0) + 1
    seen_ids: set[str] = set()
    unique_ids = []
    for p in prompts:
        if p.id not in seen_ids:
            unique_ids.append(p)
            seen_ids.add(p.id)
    return IngestResult(unique_ids, rejected, read, exact, near, feedback=traffic.feedback, traffic=traffic.traffic,
                        traffic_counts=traffic.traffic_counts)


def run_pool(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Round step `pool`: round 1 ingests `cfg.pool.sources`; later rounds carry the previous pool over, minus
    the items already sent to reviewers, plus the previous round's failures (error-based candidates)."""
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
        if previous is None or not previous.step("pool").done:
            result = ingest(cfg.pool, seen=seen, round_number=rnd.number)
        else:
            result = carry_over(previous)
            new = _merge_traffic([read_traffic_source(src, seen=seen, max_chars=cfg.pool.max_prompt_chars,
                                                      round_number=rnd.number)
                                  for src in cfg.pool.sources if is_traffic(src)])
            fresh = {p.id for p in new.prompts}  # new traffic replaces a carried-over prompt (fresher metadata)
            result.prompts = [p for p in result.prompts if p.id not in fresh] + new.prompts
            result.rejected += new.rejected
            result.feedback, result.traffic, result.traffic_counts = new.feedback, new.traffic, new.traffic_counts
        if seeds is not None and seeds.done:
            drop_seed_prompts(result, seed_prompt_keys(rnd.project.root))
        write_rows(run.path / "prompts.parquet", [p.to_row() for p in result.prompts])
        write_jsonl(run.path / "rejected.jsonl", (r.to_row() for r in result.rejected))
        write_rows(run.path / "feedback.parquet", [f.to_row() for f in result.feedback], schema=feedback_schema())
        if any(is_traffic(src) for src in cfg.pool.sources):
            write_rows(run.path / "traffic.parquet", result.traffic, schema=traffic_schema())
        run.counts.update(result.counts())
        if result.rejected:
            run.extra["rejected_examples"] = [r.to_row() for r in result.rejected[:5]]
    return rnd.step("pool").manifest()


def drop_seed_prompts(result: IngestResult, keys: set[str]) -> None:
    """Remove the prompts the imported seed labels already cover (`curation.labels.seed_prompt_keys`); counted as
    `seed_prompts_removed`."""
    from training.data import prompt_key

    kept = [p for p in result.prompts if prompt_key(p.messages) not in keys]
    result.seed_prompts_removed = len(result.prompts) - len(kept)
    result.prompts = kept


def carry_over(previous) -> IngestResult:
    prompts = load_prompts(previous)
    labelled: set[str] = set()
    if previous.step("select").done:
        labelled = {r["prompt_id"] for r in read_rows(previous.step("select").file("selected.parquet"))}
    kept = [p for p in prompts if p.id not in labelled]
    if previous.step("failures").done:
        failures = [Prompt.from_row(r) for r in read_rows(previous.step("failures").file("prompts.parquet"))]
        have = {p.id for p in kept}
        kept += [f for f in failures if f.id not in have]
    return IngestResult(kept, [], read=len(prompts))


def load_prompts(rnd) -> list[Prompt]:
    """The prompts of a round's finished `pool` step."""
    return [Prompt.from_row(r) for r in read_rows(rnd.step("pool").file("prompts.parquet"))]
