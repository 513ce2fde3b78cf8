"""The data currency: prompts, completions, preference pairs.

Everything that crosses a step boundary is one of these dataclasses, stored as rows (dicts of plain values) in
parquet or jsonl. Vendor objects (vLLM outputs, Argilla records) are converted to these at the edge.

Conversations are lists of `{"role": ..., "content": ...}` dicts, the format chat templates and TRL use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


def stable_id(*parts: Any, prefix: str = "", length: int = 16) -> str:
    """Deterministic id from JSON-able parts (same content → same id, across machines and runs)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return prefix + hashlib.sha256(blob).hexdigest()[:length]


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation; return it as a list of plain {role, content} dicts. Raises ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"expected a non-empty list of {{role, content}} messages, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a mapping with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"the last message of a prompt must be from the user, got {out[-1]['role']!r}")
    if not any(m["content"].strip() for m in out if m["role"] == "user"):
        raise ValueError("the prompt's user messages are all empty")
    return out


def prompt_text(messages: list[dict[str, str]]) -> str:
    """A plain-text rendering of a conversation (for dedup, embeddings and display; not for models)."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


class _Row:
    """Dataclass <-> row (dict) conversion shared by the schema classes."""

    # Free-form mappings (metadata) are stored as JSON strings so that parquet does not widen them into
    # structs with the union of every row's keys.

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in row.items()}

    @classmethod
    def from_row(cls, row: dict[str, Any]):
        out = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in row:
                value = row[f.name]
                if f.name == "metadata" and isinstance(value, str):
                    value = json.loads(value)
                out[f.name] = value
        return cls(**out)


@dataclass
class Prompt(_Row):
    """One item of the pool: a conversation ending with a user turn."""

    id: str
    messages: list[dict[str, str]]
    slice: str = "default"  # category used for quotas and per-slice evaluation
    source: str = ""  # file (and line) it came from, or "failure:<round>" for error-based items
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return prompt_text(self.messages)


@dataclass
class Completion(_Row):
    """One sampled answer to a prompt, with a summary of its token log-probabilities under the generator."""

    id: str
    prompt_id: str
    model: str
    text: str
    sample_index: int = 0
    num_tokens: int = 0
    mean_logprob: float = float("nan")  # mean log p(token) under the generator; higher = more confident
    entropy: float = float("nan")  # mean per-token entropy proxy (-mean logprob of sampled tokens if exact unknown)
    finish_reason: str = ""  # "stop" | "length"
    seed: int = 0

    @staticmethod
    def make_id(prompt_id: str, model: str, sample_index: int, params_key: str) -> str:
        return stable_id(prompt_id, model, sample_index, params_key, prefix="c-")


@dataclass
class PreferencePair(_Row):
    """A TRL-format conversational preference pair with provenance.

    `prompt` is the conversation; `chosen`/`rejected` are single-turn assistant answers as message lists,
    which is exactly what TRL's RewardTrainer and DPOTrainer accept.
    """

    id: str
    prompt_id: str
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    margin: float = 1.0  # strength of the preference (rank gap or aggregated score difference), > 0
    slice: str = "default"
    chosen_id: str = ""
    rejected_id: str = ""
    source: str = ""  # "human:<dataset>", "simulated:<file>", "hh:<file>" ...
    round: int = 0
    annotators: list[str] = field(default_factory=list)
    rejected_harmful: bool = False  # the rejected answer was flagged harmful by a reviewer
    stage: str = "first"  # which review stage decided the pair: "first" | "review" (second-stage override)

    @staticmethod
    def make_id(prompt_id: str, chosen_id: str, rejected_id: str) -> str:
        return stable_id(prompt_id, chosen_id, rejected_id, prefix="p-")


@dataclass
class Feedback(_Row):
    """One unpaired judgement of one answer: a user's thumbs up/down on a served response, or one side of an
    unrolled preference pair. KTO trains on these; the pool turns thumbs-down items into error-based candidates.

    Written by the pool step for `format: traffic` sources (`pool/feedback.parquet`), read by `training.data`.
    """

    id: str
    prompt_id: str
    prompt: list[dict[str, str]]  # the conversation (TRL conversational format)
    completion: list[dict[str, str]]  # the single assistant answer that was judged
    label: bool  # True = desirable (thumbs up / chosen), False = undesirable (thumbs down / rejected)
    source: str = ""  # "traffic:<file>:<line>", "pair:<pair id>", ...
    model_version: str = ""  # the registry version that produced the answer, when known
    comment: str = ""
    round: int = 0

    @staticmethod
    def make_id(prompt_id: str, answer: str, source: str) -> str:
        return stable_id(prompt_id, answer, source, prefix="f-")


def split_hh_transcript(transcript: str) -> tuple[list[dict[str, str]], str]:
    """Split an Anthropic HH transcript into (prompt messages, final assistant answer).

    `"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant: d"` →
    `([user a, assistant b, user c], "d")`. Raises ValueError if it has no Human/Assistant turns.
    """
    if not isinstance(transcript, str):
        raise ValueError(f"expected a transcript string, got {type(transcript).__name__}")
    turns: list[dict[str, str]] = []
    rest = transcript
    markers = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    # Find markers in order; text before the first marker must be blank.
    positions = []
    for marker, role in markers.items():
        start = 0
        while (idx := rest.find(marker, start)) != -1:
            positions.append((idx, marker, role))
            start = idx + len(marker)
    positions.sort()
    if not positions:
        raise ValueError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    if rest[: positions[0][0]].strip():
        raise ValueError("text before the first '\\n\\nHuman:' turn")
    for i, (idx, marker, role) in enumerate(positions):
        end = positions[i + 1][0] if i + 1 < len(positions) else len(rest)
        turns.append({"role": role, "content": rest[idx + len(marker) : end].strip()})
    if turns[-1]["role"] != "assistant":
        return validate_messages(turns), ""
    answer = turns.pop()["content"]
    return validate_messages(turns), answer


def parse_hh(row: Any) -> tuple[list[dict[str, str]], str, str | None]:
    """One Anthropic HH row `{"chosen": transcript, "rejected": transcript}` → (prompt messages, chosen answer,
    rejected answer or None when the row has no `rejected`). The one HH parser: pools, held-out sets, simulated
    reviewers and benchmarks all read HH rows through it (or `parse_hh_pair`).

    Raises ValueError with the reason for a missing or malformed transcript, or when the two transcripts have
    different prompts.
    """
    if not isinstance(row, dict) or "chosen" not in row:
        keys = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"expected an HH row with a 'chosen' (and 'rejected') transcript, got {keys or 'no keys'}")
    messages, chosen = split_hh_transcript(row["chosen"])
    if "rejected" not in row:
        return messages, chosen, None
    rejected_messages, rejected = split_hh_transcript(row["rejected"])
    if rejected_messages != messages:
        raise ValueError("'chosen' and 'rejected' transcripts have different prompts")
    return messages, chosen, rejected


def parse_hh_pair(row: Any) -> tuple[list[dict[str, str]], str, str]:
    """`parse_hh` for a comparison: also a ValueError when `rejected` is missing or gives the same answer."""
    messages, chosen, rejected = parse_hh(row)
    if rejected is None:
        raise ValueError("HH row without a 'rejected' transcript; a preference pair needs both answers")
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' give the same answer; nothing to compare")
    return messages, chosen, rejected


@dataclass
class Response(_Row):
    """One reviewer's answer on one record (a prompt with its candidate completions), backend-neutral.

    Argilla responses and simulated-annotator answers are both converted to this at the edge and stored raw
    (`responses.jsonl`) before any aggregation.
    """

    record_id: str  # == prompt_id of the record
    annotator: str
    status: str  # "submitted" | "discarded" | "draft"
    ranks: dict[str, int] = field(default_factory=dict)  # completion_id -> rank, 1 = best; equal ranks = tie
    harm: dict[str, list[str]] = field(default_factory=dict)  # completion_id -> harm labels ([] = none)
    rating: int | None = None
    correction: str = ""  # a reviewer's corrected answer, if any
    source: str = ""  # "argilla:<dataset>" | "simulated:<file>"
    updated_at: str = ""
    stage: str = "first"  # "first" (first-stage dataset) | "review" (second-stage review dataset)
    extra: dict[str, Any] = field(default_factory=dict)  # answers to other questions, by question name

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        for key in ("ranks", "harm", "extra"):
            row[key] = json.dumps(getattr(self, key), sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Response:
        row = dict(row)
        for key in ("ranks", "harm", "extra"):
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass
class AnnotationRecord:
    """What a reviewer sees: a prompt with its candidate completions, plus acquisition metadata."""

    prompt: Prompt
    completions: list[Completion]
    metadata: dict[str, Any] = field(default_factory=dict)  # acquisition scores, strategy, arm, ...
    vector: list[float] | None = None  # prompt embedding, for similarity search

    @property
    def record_id(self) -> str:
        return self.prompt.id


def pair_schema():
    """Arrow schema of `PreferencePair` rows (so an empty pairs.parquet still has its columns)."""
    import pyarrow as pa

    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.schema([
        ("id", pa.string()), ("prompt_id", pa.string()), ("prompt", msgs), ("chosen", msgs), ("rejected", msgs),
        ("margin", pa.float64()), ("slice", pa.string()), ("chosen_id", pa.string()), ("rejected_id", pa.string()),
        ("source", pa.string()), ("round", pa.int64()), ("annotators", pa.list_(pa.string())),
        ("rejected_harmful", pa.bool_()), ("stage", pa.string()),
    ])
