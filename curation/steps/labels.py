"""Seed labels: preference data a team already has, imported as round 0 (`labels:` section, step `labels`).

    labels:
      sources:
        - path: data/last-quarter.jsonl          # TRL pairs, conversational or plain
          license: cc-by-4.0                     # for `curate export`'s dataset card
        - path: ultrafeedback.parquet            # rating sets: pairs by score, ties dropped
          score_field: overall_score
        - path: exports/argilla-demo-r0003       # a folder Argilla's `Dataset.to_disk` wrote
      train: {reward: {max_steps: 60}}           # the bootstrap's trainer settings (see curation/round.py, round 0)

Storage (`format`): jsonl (gz ok), parquet, a saved HF dataset folder (`split`, default "train", of a
DatasetDict), or `argilla`: a folder written by Argilla's `Dataset.to_disk` (`records.json` +
`.argilla/settings.json`). `auto` tells them apart by name and content.

Row shapes, recognised per row (`SHAPES`; a file whose first row matches none fails with the formats and the
fields that row lacks; later rows that match none are rejected with their file and line):

- TRL pairs: `prompt`, `chosen`, `rejected` — plain strings, or conversational (`prompt` a list of messages,
  `chosen`/`rejected` lists of assistant messages). Optional: `margin` (> 0), `score_chosen`/`score_rejected`
  (margin = their difference; equal scores are a tie and dropped), `rejected_harmful`, `annotators`, `id`,
  `slice`/`category`.
- TRL implicit-prompt pairs: `chosen`, `rejected` as whole conversations sharing their prompt turns.
- Anthropic HH transcripts: `chosen`, `rejected` as `"\\n\\nHuman: …\\n\\nAssistant: …"` strings (`parse_hh_pair`).
- TRL unpaired (KTO): `prompt`, `completion`, `label` (true = desirable) → `Feedback` rows.
- Rating sets (UltraFeedback shape): `prompt` (or `instruction`) and `completions`, a list of objects with the
  answer (`response`, `text`, `completion` or `content`) and its score (`score_field`, default the first of
  `SCORE_FIELDS` present), or a list of strings beside a `scores`/`ratings` list. Pairs by score (`pairs: all`
  every two answers with different scores, `best_vs_rest`, `best_vs_worst`); ties give no pair (counted).
- Argilla records: nested (`fields` + `responses`, as `to_disk`'s records.json or `records.to_list()`) or flat
  (`<question>.responses` / `.users` / `.status` columns, as `records.to_datasets()` / `to_hub`). The ranking
  question's values name the answer fields (this tool's datasets: `completion_1` …); each reviewer's ranking
  (and `harm_<i>` flags) becomes a `Response`, and the configured consensus (`annotation.aggregation`) turns
  them into pairs, exactly as `curate pull` does.

Every imported pair is a `PreferencePair` with `round` 0, `stage` "imported" and `source`
"imported:<name>:<file>:<line>" (name = the source's `name`, default its file name); unpaired judgements are
`Feedback` rows with the same `source`. Bad rows (malformed, chosen == rejected, empty answers, an inconsistent
score) are rejected with file and line into `labels/rejected.jsonl` and counted, as the pool does (`strict: true`
fails on the first one instead). Pairs whose prompt is a held-out prompt (`evaluation.heldout`) are dropped here
(counted): imported labels are never evaluation data. The same pair twice (same prompt and answers) is kept once.

The step writes `labels/pairs.parquet` (`PreferencePair` rows), `labels/feedback.parquet` (`Feedback` rows),
`labels/rejected.jsonl`, and its manifest (counts, and per source: name, path, format, licence, sha256, counts).
Round 0's pairs feed the trainers like any round's (`training.data.load_round_pairs`): the bootstrap trains on
them, later rounds replay them; their prompts leave every round's pool (`curation.steps.pool.seed_prompt_keys`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, write_jsonl, write_rows
from preference.schema import Feedback, PreferencePair, parse_hh_pair, stable_id, validate_messages

IMPORTED = "imported"  # the `stage` of an imported pair
SCORE_FIELDS = ("score", "rating", "overall_score", "fine-grained_score")
ANSWER_FIELDS = ("response", "text", "completion", "content")
PROMPT_FIELDS = ("prompt", "instruction")
ARGILLA_PROMPT_FIELDS = ("prompt", "instruction", "question", "input")
STORAGE = ("auto", "jsonl", "parquet", "hf", "argilla")
# the row shapes and the fields each needs (what an unrecognised file is told it lacks)
SHAPES: dict[str, tuple[str, ...]] = {
    "TRL pairs": ("prompt", "chosen", "rejected"),
    "TRL implicit-prompt pairs / HH transcripts": ("chosen", "rejected"),
    "TRL unpaired (KTO)": ("prompt", "completion", "label"),
    "rating sets": ("prompt|instruction", "completions"),
    "Argilla records": ("fields", "responses"),
}


@dataclass
class LabelSource:
    """One file or folder of existing preference labels."""

    path: Path
    format: Literal["auto", "jsonl", "parquet", "hf", "argilla"] = "auto"  # how it is stored (see the module doc)
    name: str | None = None  # provenance: pairs' source "imported:<name>:…"; default: the file or folder name
    license: str | None = None  # the data's licence (an SPDX id such as mit, apache-2.0), for the dataset card
    slice: str = "default"  # slice for rows that do not name one
    split: str = "train"  # the split to read from a saved DatasetDict
    skip: int = 0  # ignore the first N rows (e.g. the rows another part of the config uses)
    limit: int | None = None  # take at most this many usable rows
    pairs: Literal["all", "best_vs_rest", "best_vs_worst"] = "all"  # rating sets: which pairs a prompt gives
    score_field: str | None = None  # rating sets: the score key of a completion (null: the first of SCORE_FIELDS)

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1 or null, got {self.limit}")
        if self.skip < 0:
            raise ValueError(f"skip must be ≥ 0, got {self.skip}")
        if self.name is not None and (not self.name or ":" in self.name):
            raise ValueError(f"name must be a non-empty string without ':', got {self.name!r}")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


@dataclass
class LabelsConfig:
    """`labels:` section: seed labels imported as round 0, and the bootstrap's trainer settings."""

    sources: list[LabelSource] = field(default_factory=list)
    strict: bool = False  # fail on the first bad row instead of rejecting it with a report
    # answers of at most this many imported pairs (a seeded sample) are embedded by `scoring.embedding_model`
    # (round 0's `embed` step), so round 1's selection can fit its fast reward ensemble on them; 0 = none
    embed_pairs: int = 1000
    # the bootstrap's trainer settings over the trainer sections, e.g. {reward: {max_steps: 60}, dpo: {enabled:
    # false}} (round 0 trains on many more pairs than a round; keys are checked against the trainer sections)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        from dataclasses import fields

        from training.trainers import TRAINERS

        if self.embed_pairs < 0:
            raise ValueError(f"embed_pairs must be ≥ 0 (0 = none), got {self.embed_pairs}")

        for kind, overrides in self.train.items():
            if kind not in TRAINERS:
                raise ValueError(f"train.{kind}: not a trainer section; expected one of {', '.join(TRAINERS)}")
            known = {f.name for f in fields(TRAINERS[kind].config_class)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"train.{kind}.{unknown[0]}: unknown key of the {kind} section; known keys: "
                                 f"{', '.join(sorted(known))}")
        names = [s.label for s in self.sources]
        repeated = sorted(n for n, c in Counter(names).items() if c > 1)
        if repeated:
            raise ValueError(f"sources: two sources are named {repeated[0]!r}; give them distinct `name`s")


@dataclass
class Imported:
    """What the sources gave: pairs, unpaired judgements, rejected rows and counts (per source too)."""

    pairs: list[PreferencePair] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"source": "file:line", "reason": ...}
    counts: Counter = field(default_factory=Counter)
    sources: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ row parsing
def _messages(value: Any, what: str) -> list[dict[str, str]]:
    """A prompt: a string (one user turn) or a conversation ending with a user turn."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    try:
        return validate_messages(value)
    except ValueError as exc:
        raise ValueError(f"'{what}': {exc}") from exc


def _answer(value: Any, what: str) -> list[dict[str, str]]:
    """An answer: a string, or a list of assistant messages (TRL conversational); never empty."""
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        messages = []
        for m in value:
            if m.get("role") != "assistant" or not isinstance(m.get("content"), str):
                raise ValueError(f"'{what}' must hold assistant messages with string content, got {m!r:.80}")
            messages.append({"role": "assistant", "content": m["content"]})
    else:
        raise ValueError(f"'{what}' must be a string or a list of assistant messages, got {type(value).__name__}")
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"'{what}' is empty")
    return messages


def messages_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"'{what}' must be a number, got {value!r:.40}")
    return float(value)


def _slice(row: dict, default: str) -> str:
    value = row.get("slice") or row.get("category") or default
    if not isinstance(value, str):
        raise ValueError(f"'slice' must be a string, got {type(value).__name__}")
    return value


def row_shape(row: Any) -> str | None:
    """The shape of one input row (a key of `SHAPES`, or "hh"), or None when it matches none."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if ("fields" in keys and "responses" in keys) or any(str(k).endswith(".responses") for k in keys):
        return "Argilla records"
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "TRL pairs"
        return "hh" if isinstance(row["chosen"], str) else "TRL implicit-prompt pairs / HH transcripts"
    if {"prompt", "completion", "label"} <= keys:
        return "TRL unpaired (KTO)"
    if "completions" in keys and keys & set(PROMPT_FIELDS):
        return "rating sets"
    return None


def unknown_shape_message(where: str, row: Any) -> str:
    """One line: the row matches no format; each format with the fields the row lacks."""
    keys = set(map(str, row)) if isinstance(row, dict) else set()
    parts = []
    for name, needed in SHAPES.items():
        missing = [f for f in needed if not any(alt in keys for alt in f.split("|"))]
        parts.append(f"{name} {{{', '.join(needed)}}}" + (f" lacks {', '.join(missing)}" if missing else ""))
    got = ", ".join(sorted(keys)) if keys else f"a {type(row).__name__}, not an object"
    return (f"{where}: the row matches no seed-label format (its keys: {got}); formats: " + "; ".join(parts)
            + " — convert the file to one of them (see curation/steps/labels.py) or remove it from labels.sources")


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], *, source: str, slice_name: str,
          margin: float = 1.0, rejected_harmful: bool = False, annotators: list[str] | None = None) -> PreferencePair:
    if messages_text(chosen).strip() == messages_text(rejected).strip():
        raise ValueError("chosen and rejected are the same answer; a pair needs two different answers")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    prompt_id = stable_id(prompt, prefix="p")  # the pool's id scheme (curation/steps/pool.py)
    chosen_id = stable_id(prompt_id, messages_text(chosen), prefix="c-")
    rejected_id = stable_id(prompt_id, messages_text(rejected), prefix="c-")
    return PreferencePair(id=PreferencePair.make_id(prompt_id, chosen_id, rejected_id), prompt_id=prompt_id,
                          prompt=prompt, chosen=chosen, rejected=rejected, margin=float(margin), slice=slice_name,
                          chosen_id=chosen_id, rejected_id=rejected_id, source=source, round=0,
                          annotators=list(annotators or []), rejected_harmful=bool(rejected_harmful), stage=IMPORTED)


def _annotators(row: dict) -> list[str]:
    value = row.get("annotators")
    return [str(a) for a in value] if isinstance(value, list) else []


def parse_trl_pair(row: dict, source: str, default_slice: str) -> list[PreferencePair]:
    """A TRL pair row (explicit prompt), plain or conversational."""
    prompt = _messages(row["prompt"], "prompt")
    chosen, rejected = _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")
    margin = 1.0
    if row.get("score_chosen") is not None and row.get("score_rejected") is not None:
        gap = _number(row["score_chosen"], "score_chosen") - _number(row["score_rejected"], "score_rejected")
        if gap < 0:
            raise ValueError(f"score_chosen is below score_rejected ({gap:+g}); the labels contradict the scores")
        if gap == 0:
            return []  # a tie: no preference
        margin = gap
    elif row.get("margin") is not None:
        margin = _number(row["margin"], "margin")
    return [_pair(prompt, chosen, rejected, source=source, slice_name=_slice(row, default_slice), margin=margin,
                  rejected_harmful=bool(row.get("rejected_harmful", False)), annotators=_annotators(row))]


def parse_implicit_pair(row: dict, source: str, default_slice: str) -> list[PreferencePair]:
    """TRL's implicit-prompt pair: `chosen`/`rejected` whole conversations; the shared turns are the prompt."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise ValueError("'chosen' and 'rejected' must both be conversations (lists of messages)")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("'chosen' and 'rejected' conversations differ before their last turn; a pair answers one "
                         "prompt")
    prompt = _messages(chosen[:-1], "chosen (prompt turns)")
    return [_pair(prompt, _answer(chosen[-1:], "chosen"), _answer(rejected[-1:], "rejected"), source=source,
                  slice_name=_slice(row, default_slice), rejected_harmful=bool(row.get("rejected_harmful", False)),
                  annotators=_annotators(row))]


def parse_hh_row(row: dict, source: str, default_slice: str) -> list[PreferencePair]:
    prompt, chosen, rejected = parse_hh_pair(row)
    return [_pair(prompt, _answer(chosen, "chosen"), _answer(rejected, "rejected"), source=source,
                  slice_name=_slice(row, default_slice), rejected_harmful=bool(row.get("rejected_harmful", False)),
                  annotators=_annotators(row))]


def parse_unpaired(row: dict, source: str) -> Feedback:
    prompt = _messages(row["prompt"], "prompt")
    completion = _answer(row["completion"], "completion")
    if not isinstance(row["label"], bool):
        raise ValueError(f"'label' must be true or false, got {row['label']!r:.40}")
    prompt_id = stable_id(prompt, prefix="p")
    return Feedback(id=Feedback.make_id(prompt_id, messages_text(completion), source), prompt_id=prompt_id, prompt=prompt,
                    completion=completion, label=row["label"], source=source, round=0)


def scored_answers(row: dict, score_field: str | None) -> list[tuple[str, float]]:
    """(answer, score) of a rating-set row: `completions` objects with an answer and a score, or strings beside a
    `scores` / `ratings` list."""
    completions = row["completions"]
    if not isinstance(completions, list):
        raise ValueError(f"'completions' must be a list, got {type(completions).__name__}")
    if all(isinstance(c, str) for c in completions):
        key = next((k for k in ("scores", "ratings") if k in row), None)
        if key is None or not isinstance(row[key], list) or len(row[key]) != len(completions):
            raise ValueError("'completions' is a list of strings: it needs a 'scores' (or 'ratings') list of the "
                             "same length")
        return [(c, _number(s, f"{key}[{i}]")) for i, (c, s) in enumerate(zip(completions, row[key], strict=True))]
    out = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise ValueError(f"completions[{i}] must be an object with an answer and a score")
        answer = next((c[k] for k in ANSWER_FIELDS if isinstance(c.get(k), str)), None)
        if answer is None:
            raise ValueError(f"completions[{i}] has no answer text ({', '.join(ANSWER_FIELDS)})")
        key = score_field or next((k for k in SCORE_FIELDS if c.get(k) is not None), None)
        if key is None or c.get(key) is None:
            raise ValueError(f"completions[{i}] has no score ({score_field or ', '.join(SCORE_FIELDS)}); set "
                             "labels.sources[].score_field")
        out.append((answer, _number(c[key], f"completions[{i}].{key}")))
    return out


def parse_ratings(row: dict, source: str, default_slice: str, mode: str, score_field: str | None,
                  counts: Counter) -> list[PreferencePair]:
    """Pairs from one prompt's scored answers: higher score = chosen; equal scores are ties (no pair)."""
    prompt = _messages(row.get("prompt", row.get("instruction")), "prompt")
    answers: dict[str, float] = {}
    for text, score in scored_answers(row, score_field):
        if text.strip():
            answers.setdefault(text, score)  # an answer listed twice counts once
    ranked = sorted(answers.items(), key=lambda a: -a[1])
    if len(ranked) < 2:
        raise ValueError("fewer than two different non-empty answers; nothing to compare")
    if mode == "all":
        candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]]
    elif mode == "best_vs_rest":
        candidates = [(ranked[0], b) for b in ranked[1:]]
    else:  # best_vs_worst
        candidates = [(ranked[0], ranked[-1])]
    out = []
    for (good, s_good), (bad, s_bad) in candidates:
        if s_good == s_bad:
            counts["ties_dropped"] += 1
            continue
        out.append(_pair(prompt, _answer(good, "completion"), _answer(bad, "completion"), source=source,
                         slice_name=_slice(row, default_slice), margin=s_good - s_bad))
    return out


# ----------------------------------------------------------------------------------------------- Argilla export
def _argilla_prompt(fields: dict) -> list[dict[str, str]]:
    name = next((k for k in ARGILLA_PROMPT_FIELDS if k in fields), None)
    if name is None:
        raise ValueError(f"no prompt field ({', '.join(ARGILLA_PROMPT_FIELDS)}) among the record's fields "
                         f"{', '.join(sorted(fields)) or 'none'}")
    return _messages(fields[name], name)


def _user_values(row: dict) -> tuple[dict[str, dict[str, dict]], dict[str, Any]]:
    """Per reviewer: {question: {"value": ...}} (Argilla's response values), and the record's fields. Nested
    records (`to_disk`, `to_list()`) or flat ones (`<question>.responses` columns)."""
    per_user: dict[str, dict[str, dict]] = {}
    if "responses" in row and isinstance(row.get("fields"), dict):
        for question, answers in (row.get("responses") or {}).items():
            for a in answers or []:
                if isinstance(a, dict) and a.get("status", "submitted") == "submitted":
                    per_user.setdefault(str(a.get("user_id")), {})[question] = {"value": a.get("value")}
        return per_user, row["fields"]
    fields = {k: v for k, v in row.items() if "." not in str(k)}
    for key, values in row.items():
        if not str(key).endswith(".responses") or values is None:
            continue
        question = str(key)[: -len(".responses")]
        users = row.get(f"{key}.users") or [f"annotator-{i}" for i in range(len(values))]
        status = row.get(f"{key}.status") or ["submitted"] * len(values)
        for user, value, state in zip(users, values, status, strict=False):
            if state in (None, "submitted"):
                per_user.setdefault(str(user), {})[question] = {"value": value}
    return per_user, fields


def parse_argilla(row: dict, source: str, default_slice: str, questions, aggregation) -> list[PreferencePair]:
    """One Argilla record with its reviewers' answers → pairs by the configured consensus (as `curate pull`).
    The ranking question's values name the answer fields; they map onto this tool's slots `completion_<i>`."""
    from preference.aggregate import aggregate
    from preference.questions import read_response, slot
    from preference.schema import AnnotationRecord, Completion, Prompt, Response

    per_user, fields = _user_values(row)
    prompt = _argilla_prompt(fields)
    rankings = {u: v["ranking"]["value"] for u, v in per_user.items() if (v.get("ranking") or {}).get("value")}
    if not rankings:
        raise ValueError("no submitted answer to a 'ranking' question; nothing to build pairs from")
    names: list[str] = []
    for value in rankings.values():
        for item in value:
            name = item.get("value") if isinstance(item, dict) else item
            if name not in names:
                names.append(name)
    answers = [n for n in names if isinstance(fields.get(n), str) and fields[n].strip()]
    if len(answers) < 2:
        raise ValueError(f"the ranking names {', '.join(map(str, names))}, which are not two or more non-empty "
                         "text fields of the record")
    prompt_id = stable_id(prompt, prefix="p")
    comps = [Completion(id=stable_id(prompt_id, fields[n], prefix="c-"), prompt_id=prompt_id, model=f"argilla:{n}",
                        text=fields[n]) for n in answers]
    slot_of = {n: slot(i) for i, n in enumerate(answers, 1)}
    record = AnnotationRecord(prompt=Prompt(id=prompt_id, messages=prompt, slice=_slice(row, default_slice),
                                            source=source), completions=comps)
    responses = []
    for user, given in per_user.items():
        # answer field names → this tool's slots (its Ranking question reads `completion_<j>`, its Harm question
        # `harm_<j>`): the j-th answer's harm question is the one named after its field (`completion_3` → `harm_3`)
        values = {q: v for q, v in given.items() if q != "ranking" and not q.startswith("harm_")}
        values["ranking"] = {"value": [
            {**item, "value": slot_of.get(item.get("value"))} if isinstance(item, dict) else slot_of.get(item)
            for item in (given.get("ranking") or {}).get("value") or []]}
        for j, n in enumerate(answers, 1):
            harm = given.get(f"harm_{n.rsplit('_', 1)[-1]}") if "_" in n else None
            if harm is not None:
                values[f"harm_{j}"] = harm
        responses.append(read_response(questions, values, [c.id for c in comps],
                                       Response(record_id=prompt_id, annotator=user, status="submitted",
                                                source=source)))
    pairs = aggregate([record], responses, aggregation, source=source, round_number=0)
    return [PreferencePair(**{**p.__dict__, "stage": IMPORTED, "source": source}) for p in pairs]


def _argilla_rows(path: Path):
    """(location, record) of an Argilla `to_disk` folder's records.json."""
    records = path / "records.json"
    if not records.is_file():
        raise CurateError(f"{path}: an Argilla export folder needs records.json (written by Dataset.to_disk with "
                          "with_records=True); export it again with its records")
    try:
        data = json.loads(records.read_text())
    except json.JSONDecodeError as exc:
        raise CurateError(f"{records}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, list):
        raise CurateError(f"{records}: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{records}#{i}", rec


# ------------------------------------------------------------------------------------------------- reading
def storage_format(src: LabelSource) -> str:
    """jsonl, parquet, hf or argilla for a source (its `format`, or told from the path)."""
    from curation.steps.pool import detect_format

    path = Path(src.path)
    if src.format != "auto":
        return src.format
    if path.is_dir() and ((path / ".argilla").is_dir() or (path / "records.json").is_file()):
        return "argilla"
    fmt = detect_format(path)
    return "jsonl" if fmt in ("hh", "traffic") else fmt


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes): what the step's key depends on."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        digest.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_label_source(src: LabelSource, *, strict: bool, questions, aggregation) -> Imported:
    """One source's pairs and feedback (rows that fail are rejected with file:line, or raise with `strict`)."""
    from curation.steps.pool import iter_file_rows

    path = Path(src.path)
    if not path.exists():
        raise CurateError(f"labels source {path} does not exist; fix `labels.sources[].path` (relative to the cwd)")
    fmt = storage_format(src)
    rows = _argilla_rows(path) if fmt == "argilla" else iter_file_rows(path, fmt, split=src.split)
    out = Imported()
    usable = seen = 0
    first = True
    for where, row in rows:
        seen += 1
        if seen <= src.skip:
            continue
        out.counts["read"] += 1
        source = f"{IMPORTED}:{src.label}:{where}"
        try:
            if isinstance(row, ValueError):
                raise row
            shape = row_shape(row)
            if shape is None:
                if first:  # the file as a whole is in a shape we do not know: one line, exit 2
                    raise CurateError(unknown_shape_message(where, row))
                raise ValueError(unknown_shape_message("this row", row).removeprefix("this row: "))
            first = False
            if shape == "TRL unpaired (KTO)":
                out.feedback.append(parse_unpaired(row, source))
            else:
                if shape == "TRL pairs":
                    pairs = parse_trl_pair(row, source, src.slice)
                elif shape == "hh":
                    pairs = parse_hh_row(row, source, src.slice)
                elif shape == "rating sets":
                    pairs = parse_ratings(row, source, src.slice, src.pairs, src.score_field, out.counts)
                elif shape == "Argilla records":
                    pairs = parse_argilla(row, source, src.slice, questions, aggregation)
                else:
                    pairs = parse_implicit_pair(row, source, src.slice)
                if not pairs:
                    out.counts["rows_without_pairs"] += 1  # ties only
                out.pairs += pairs
            out.counts[shape] += 1
        except (ValueError, KeyError, TypeError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            if strict:
                raise CurateError(f"{where}: {reason} (labels.strict; set labels.strict: false to reject such rows "
                                  "and go on)") from exc
            out.rejected.append({"source": where, "reason": reason})
            continue
        usable += 1
        if src.limit is not None and usable >= src.limit:
            break
    if first and out.counts["read"]:
        raise CurateError(f"{path}: none of its {out.counts['read']} rows could be read (first: "
                          f"{out.rejected[0]['source']}: {out.rejected[0]['reason']}); fix the file or remove it "
                          "from labels.sources")
    if not out.counts["read"]:
        raise CurateError(f"{path}: no rows" + (f" after skip: {src.skip}" if src.skip else "")
                          + "; point labels.sources[].path at a file with preference labels")
    out.counts["rejected"] = len(out.rejected)
    return out


def import_labels(cfg) -> Imported:
    """Every `labels.sources` entry read, deduplicated (first occurrence wins), held-out prompts dropped."""
    from curation.steps.train import heldout_pairs
    from training.data import prompt_key

    lab: LabelsConfig = cfg.labels
    if not lab.sources:
        raise CurateError("labels.sources is empty; list the preference files to import, e.g. "
                          "`labels: {sources: [{path: data/pairs.jsonl}]}`")
    held = {prompt_key(p.prompt) for p in heldout_pairs(cfg)}
    out = Imported()
    pair_ids: set[str] = set()
    feedback_ids: set[str] = set()
    for src in lab.sources:
        got = read_label_source(src, strict=lab.strict, questions=cfg.annotation.argilla.questions(),
                                aggregation=cfg.annotation.aggregation)
        counts = Counter(got.counts)
        for p in got.pairs:
            if prompt_key(p.prompt) in held:
                counts["heldout_prompts_dropped"] += 1
            elif p.id in pair_ids:
                counts["duplicates"] += 1
            else:
                pair_ids.add(p.id)
                out.pairs.append(p)
                counts["pairs"] += 1
        for f in got.feedback:
            key = (f.prompt_id, messages_text(f.completion), f.label)
            if prompt_key(f.prompt) in held:
                counts["heldout_prompts_dropped"] += 1
            elif stable_id(*key) in feedback_ids:
                counts["duplicates"] += 1
            else:
                feedback_ids.add(stable_id(*key))
                out.feedback.append(f)
                counts["feedback"] += 1
        out.rejected += got.rejected
        path = Path(src.path)
        out.sources.append({"name": src.label, "path": str(path), "format": storage_format(src),
                            "license": src.license, "sha256": file_digest(path),
                            "counts": {k: int(v) for k, v in sorted(counts.items())}})
        out.counts.update(counts)
    if not out.pairs and not out.feedback:
        raise CurateError("labels.sources gave no usable pairs or judgements (" + ", ".join(
            f"{k}={v}" for k, v in sorted(out.counts.items())) + "); see labels/rejected.jsonl-style reasons above")
    return out


def _key(cfg) -> dict:
    """What the labels step depends on: the sources (and their bytes), strictness, the held-out set and the
    consensus settings Argilla exports are aggregated with."""
    from curation.steps.train import _heldout_key

    lab: LabelsConfig = cfg.labels
    return {"sources": lab.sources, "strict": lab.strict, **_heldout_key(cfg),
            "sha256": [file_digest(Path(s.path)) if Path(s.path).exists() else None for s in lab.sources],
            "aggregation": cfg.annotation.aggregation}


def run_labels(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Step `labels` of round 0: import `labels.sources` → pairs.parquet, feedback.parquet, rejected.jsonl."""
    from curation.serving.traffic import feedback_schema
    from preference.schema import pair_schema

    if rnd.number != 0:
        raise CurateError(f"the labels step belongs to round 0 (the bootstrap), not round {rnd.number}; run "
                          "`curate bootstrap -c …`")
    run = rnd.start_step("labels", _key(cfg), seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("labels").manifest()
    with run:
        got = import_labels(cfg)
        write_rows(run.path / "pairs.parquet", [p.to_row() for p in got.pairs], schema=pair_schema())
        write_rows(run.path / "feedback.parquet", [f.to_row() for f in got.feedback], schema=feedback_schema())
        write_jsonl(run.path / "rejected.jsonl", got.rejected)
        prompts = {p.prompt_id for p in got.pairs} | {f.prompt_id for f in got.feedback}
        # "records": the labelled prompts, what a loop round's pull counts as its records (the learning curve's x)
        run.counts.update(records=len(prompts), pairs=len(got.pairs), feedback=len(got.feedback),
                          rejected=len(got.rejected), read=int(got.counts["read"]),
                          duplicates=int(got.counts["duplicates"]),
                          heldout_prompts_dropped=int(got.counts["heldout_prompts_dropped"]),
                          ties_dropped=int(got.counts["ties_dropped"]))
        run.extra["sources"] = got.sources
        if got.rejected:
            run.extra["rejected_examples"] = got.rejected[:5]
            if progress:
                first = got.rejected[0]
                print(f"labels: {len(got.rejected)} rows rejected (first: {first['source']}: {first['reason']}); "
                      f"all in {run.path / 'rejected.jsonl'}", flush=True)
    return rnd.step("labels").manifest()


# ------------------------------------------------------------------------------------------------- consumers
def imported_sources(project_root: Path) -> list[dict]:
    """The label sources round 0 imported (name, path, format, licence, sha256, counts); [] without."""
    manifest = Path(project_root) / "round-0000" / "labels" / "manifest.json"
    return read_json(manifest).get("sources", []) if manifest.is_file() else []


__all__ = ["IMPORTED", "LabelSource", "LabelsConfig", "import_labels", "imported_sources", "row_shape",
           "run_labels"]
