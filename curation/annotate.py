"""`curate push` / `curate pull`: send the selected items to reviewers (Argilla or simulated), collect answers.

push (step `push`):
    select/selected.parquet + the round's prompts + generate/completions.parquet (+ score/prompt_scores.parquet
    for embeddings, + rewards/completion_rewards.parquet for suggestions) → `AnnotationRecord`s, one per selected
    prompt. Its completions: the selection's `completion_ids` (in that display order) when the select step chose
    them, else up to `completions_per_record` round-robin over the models, shown in a seeded per-record random
    order so position says nothing. With `gold`, known-answer records from a labelled set are mixed into the
    queue at seeded positions (they look like any other record to reviewers; their answers measure the reviewers
    and never become training pairs). Saved to `push/records.jsonl`. Backend `argilla`: the dataset is created
    or reused (guidelines and distribution synced in place; other setting changes need `--new-version`), records
    upserted by id (answered ones untouched; a rerun after a crash resumes), and the champion reward model's
    ranking (the round's `rewards` step) is each record's suggestion (agent = the registry version). Backend
    `simulated`: nothing else to do.

pull (step `pull`):
    1. fetch: Argilla records with their responses (the current dataset version and earlier versions of it), or
       the simulated annotator's answers; saved as received to `pull/raw/` before anything else; an annotator
       who answered a record twice (e.g. in two dataset versions) counts once: the latest answer is kept;
    2. wait mode (Argilla): unless enough submitted responses are in (`argilla.min_responses`, polled for
       `argilla.poll_timeout_s`), stop with an error saying how many are in; the manifest is not written;
    3. `agreement.json` (Kendall τ on rankings, Krippendorff α on harm flags overall and per label, α per other
       question), `annotators.json` (per annotator: answers, gold accuracy, agreement with the consensus,
       Dawid–Skene reliability, seconds per record, unreliable flag, drift against earlier rounds);
    4. second stage: harm-flagged and low-agreement records → `review.parquet` and a `<dataset>-review` Argilla
       dataset; its answers are read back (`review_responses.jsonl`; waited for with `review.wait`) and override
       the first stage (`preference.aggregate`: drop / keep / fix, the reviewers' harm flags win);
    5. pairs: `pull/pairs/` (HF dataset, TRL conversational format + provenance, `stage` = which stage decided)
       and `pull/pairs.parquet` (`PreferencePair` rows); the other questions' answers per record, combined by each
       question type's consensus, in `pull/answers.jsonl`. Gold records, low-agreement records nobody reviewed
       (`review.exclude_low_agreement`) and, with `aggregation.exclude_unreliable`, unreliable annotators' answers
       stay out.

Step identity: the push step's key is a hash of the annotation section without its operational fields
(`OPERATIONAL` metadata: url, env names, timeouts, retries, polling, batch size) and without the sections only
the pull reads (`PULL_ONLY`), plus the dataset settings the config puts on the server. A changed setting makes
the push stale (`--force` re-pushes and syncs); an operational change does not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any, Literal

import numpy as np

from preference.aggregate import (
    AggregationConfig,
    aggregate,
    consensus_scores,
    question_consensus,
    review_decision,
    save_pairs,
)
from preference.agreement import (
    ReviewConfig,
    agreement_report,
    annotator_stats,
    by_record,
    item_tau,
    route_for_review,
    submitted,
)
from preference.argilla import (
    QUEUE,
    ArgillaClient,
    ArgillaConfig,
    annotation_spec,
    ensure_dataset,
    latest_version,
    queue_url,
    responses_from_raw,
    review_spec,
    upsert_records,
    versioned,
)
from preference.plumbing.errors import CurateError, WaitingForReviewers
from preference.plumbing.io import atomic_path, read_json, read_jsonl, read_rows, write_json, write_jsonl, write_rows
from preference.questions import review_questions
from preference.reliability import annotator_quality
from preference.schema import AnnotationRecord, Completion, Prompt, Response, stable_id
from preference.simulated import SimulatedAnnotator, SimulatedConfig, load_labelled

KNOWN_SELECT_COLUMNS = {"prompt_id", "slice", "arm", "strategy", "score", "rank", "reason", "embedding",
                        "completion_ids"}
PULL_ONLY = {"pull_only": True}  # field metadata: read by the pull step only, not part of the push's identity
GOLD_CHOSEN, GOLD_REJECTED = "gold:chosen", "gold:rejected"  # model names of gold completions (never shown)


@dataclass
class GoldConfig:
    """Known-answer records mixed into the queue to measure reviewers (never used as training pairs)."""

    source: Path = Path("data/hh-harmless-dev.jsonl.gz")  # labelled pairs: HH transcripts or {prompt,chosen,rejected}
    share: float = 0.1  # share of the queue that is gold

    def __post_init__(self):
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"gold.share must be in (0, 1) (share of the queue), got {self.share}")


@dataclass
class AnnotationConfig:
    backend: Literal["simulated", "argilla"] = "simulated"
    completions_per_record: int = 4  # k: completion slots per record (the dataset's layout; fixed per round)
    models: list[str] = field(default_factory=list)  # only completions of these models (empty = all)
    shuffle: bool = True  # show a record's completions in a seeded random order (no position bias)
    gold: GoldConfig | None = None  # known-answer records mixed into the queue
    # backend argilla only: simulated reviewers (from `simulated:`) answer through the real server's API before
    # each pull, as users of their own — for unattended demos and end-to-end tests of the Argilla path.
    simulate_reviewers: bool = field(default=False, metadata=PULL_ONLY)
    argilla: ArgillaConfig = field(default_factory=ArgillaConfig)
    simulated: SimulatedConfig = field(default_factory=SimulatedConfig, metadata=PULL_ONLY)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig, metadata=PULL_ONLY)
    review: ReviewConfig = field(default_factory=ReviewConfig, metadata=PULL_ONLY)

    def __post_init__(self):
        if not 2 <= self.completions_per_record <= 16:
            raise ValueError(f"completions_per_record must be in 2..16, got {self.completions_per_record}")


# ---------------------------------------------------------------------------------------------------------------
# step identity


def identity(obj: Any, skip: tuple[str, ...] = ("operational",)) -> Any:
    """A config as plain data without the dataclass fields whose metadata carries any of the `skip` tags."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: identity(getattr(obj, f.name), skip) for f in dataclasses.fields(obj)
                if not any(f.metadata.get(tag) for tag in skip)}
    if isinstance(obj, dict):
        return {k: identity(v, skip) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [identity(v, skip) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def push_key(ann: AnnotationConfig) -> dict:
    """What the push step's result depends on: the annotation settings and the dataset settings they produce."""
    out = {"annotation": identity(ann, skip=("operational", "pull_only"))}
    if ann.backend != "argilla":
        del out["annotation"]["argilla"]  # the simulated backend pushes nothing to a server
    else:
        spec = annotation_spec(ann.argilla, ann.completions_per_record)
        out["dataset_settings"] = {k: spec[k] for k in ("guidelines", "min_submitted", "fields", "questions")}
    return out


def pull_key(ann: AnnotationConfig) -> dict:
    return {"annotation": identity(ann, skip=("operational",)),
            "review_settings": review_spec(ann.argilla, ann.completions_per_record)["questions"]
            if ann.backend == "argilla" else None}


# ---------------------------------------------------------------------------------------------------------------
# building records


def _pick_completions(comps: list[Completion], k: int, rng: np.random.Generator | None) -> list[Completion]:
    """Up to k completions, round-robin over models (sorted), samples in order; then shuffled if `rng`."""
    per_model: dict[str, list[Completion]] = defaultdict(list)
    for c in sorted(comps, key=lambda c: (c.model, c.sample_index, c.id)):
        per_model[c.model].append(c)
    picked: list[Completion] = []
    seen_texts: set[str] = set()
    queues = [per_model[m] for m in sorted(per_model)]
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                c = q.pop(0)
                if c.text.strip() not in seen_texts:  # identical answers cannot be ranked against each other
                    seen_texts.add(c.text.strip())
                    picked.append(c)
    if rng is not None:
        picked = [picked[i] for i in rng.permutation(len(picked))]
    return picked


def load_rewards(rnd) -> tuple[dict[str, float], str | None]:
    """The champion reward model's scores of this round's completions (the `rewards` step, contract 2):
    completion id → reward_mean, and the registry version that scored them (None: no step or no champion)."""
    step = rnd.step("rewards")
    if not step.done:
        return {}, None
    info = step.manifest().get("reward_model")
    if not info:
        return {}, None
    rows = read_rows(step.file("completion_rewards.parquet"))
    rewards = {str(r["completion_id"]): float(r["reward_mean"]) for r in rows
               if r.get("reward_mean") is not None and np.isfinite(r["reward_mean"])}
    return rewards, str(info["version"])


def build_records(cfg, rnd) -> tuple[list[AnnotationRecord], dict[str, float], str, dict[str, int]]:
    """The round's annotation records (selection order, gold mixed in), rewards by completion id, the reward
    agent (registry version), counts."""
    from curation.pool import load_prompts

    ann: AnnotationConfig = cfg.annotation
    selected = read_rows(rnd.step("select").file("selected.parquet"))
    prompts = {p.id: p for p in load_prompts(rnd)}
    comp_rows = read_rows(rnd.step("generate").file("completions.parquet"))
    embeddings: dict[str, list[float]] = {}
    if rnd.step("score").done and (rnd.step("score").path / "prompt_scores.parquet").is_file():
        for row in read_rows(rnd.step("score").file("prompt_scores.parquet")):
            if row.get("embedding") is not None:
                embeddings[row["prompt_id"]] = row["embedding"]
    by_prompt: dict[str, list[Completion]] = defaultdict(list)
    by_id: dict[str, Completion] = {}
    for row in comp_rows:
        c = Completion.from_row(row)
        by_id[c.id] = c
        if ann.models and c.model not in ann.models:
            continue
        by_prompt[c.prompt_id].append(c)
    rewards, agent = load_rewards(rnd)
    missing = [r["prompt_id"] for r in selected if r["prompt_id"] not in prompts]
    if missing:
        raise CurateError(
            f"round {rnd.number}: {len(missing)} selected prompt(s) are not in the round's pool (e.g. {missing[0]}); "
            "the select step is stale: rerun `curate select --force`"
        )
    records, few = [], 0
    for row in sorted(selected, key=lambda r: (r.get("rank") if r.get("rank") is not None else 1 << 30,
                                                -(r.get("score") or 0.0), r["prompt_id"])):
        pid = row["prompt_id"]
        chosen = row.get("completion_ids")
        if chosen is not None and len(chosen):  # the select step chose the completions and their order
            unknown = [cid for cid in chosen if cid not in by_id]
            if unknown or len(chosen) > ann.completions_per_record:
                raise CurateError(
                    f"select/selected.parquet gives prompt {pid} the completions {list(chosen)[:6]}: "
                    + (f"{unknown[0]} is not in generate/completions.parquet" if unknown else
                       f"{len(chosen)} > annotation.completions_per_record ({ann.completions_per_record})")
                    + "; rerun `curate select --force` (or raise annotation.completions_per_record)")
            comps = [by_id[cid] for cid in chosen]
        else:
            rng = np.random.default_rng([cfg.seed, int(stable_id(pid, length=12), 16)]) if ann.shuffle else None
            comps = _pick_completions(by_prompt.get(pid, []), ann.completions_per_record, rng)
        if len(comps) < 2:
            few += 1
            continue
        meta: dict[str, Any] = {k: row.get(k) for k in ("score", "rank", "strategy", "arm", "reason")}
        meta["slice"] = row.get("slice") or prompts[pid].slice
        for key, value in row.items():
            if key not in KNOWN_SELECT_COLUMNS and isinstance(value, (int, float)) and not isinstance(value, bool):
                meta[key] = float(value)
        vector = row.get("embedding") if row.get("embedding") is not None else embeddings.get(pid)
        records.append(AnnotationRecord(prompt=prompts[pid], completions=comps, metadata=meta,
                                        vector=[float(x) for x in vector] if vector is not None else None))
    counts = {"selected": len(selected), "skipped_fewer_than_2_completions": few, "gold": 0}
    if ann.gold is not None and records:
        records, counts["gold"] = mix_gold(records, ann.gold, prompts, seed=cfg.seed, round_number=rnd.number)
    for position, record in enumerate(records, 1):  # the reviewers' queue: acquisition priority, gold spread in
        record.metadata[QUEUE] = position
        if agent is not None and counts["gold"]:  # gold records get the champion's suggestion too: no tell
            from curation.rewards import version_rewards

            gold = [(c.id, [*r.prompt.messages, {"role": "assistant", "content": c.text}])
                    for r in records if "gold" in r.metadata for c in r.completions]
            ids, conversations = zip(*gold, strict=True)
            rewards = {**rewards, **dict(zip(ids, version_rewards(cfg, agent, list(conversations)), strict=True))}
    return records, rewards, agent or "reward-model", counts


def mix_gold(records: list[AnnotationRecord], gold, pool: dict[str, Prompt], *, seed: int,
             round_number: int) -> tuple[list[AnnotationRecord], int]:
    """`records` with gold records (known chosen > rejected) at seeded positions; they share the prompts' id
    scheme and completion id scheme, so nothing tells them apart in the reviewers' queue."""
    real = [r for r in records if "gold" not in r.metadata]
    n = max(1, round(gold.share * len(real) / (1.0 - gold.share)))
    pool_texts = {p.text.strip() for p in pool.values()}
    candidates = []
    for messages, chosen, rejected in load_labelled(gold.source, key="annotation.gold.source"):
        pid = stable_id(messages, prefix="p")  # the pool's id scheme (curation/pool.py)
        prompt = Prompt(id=pid, messages=messages, slice="default", source=f"gold:{Path(gold.source).name}")
        if pid not in pool and prompt.text.strip() not in pool_texts:
            candidates.append((prompt, chosen, rejected))
    if len(candidates) < n:
        raise CurateError(
            f"annotation.gold: {gold.source} has {len(candidates)} labelled pairs whose prompts are not in this round's "
            f"pool, the queue needs {n} (share {gold.share} of {len(real)} records); point annotation.gold.source at "
            "a larger labelled set (HH transcripts or {prompt, chosen, rejected} rows) or lower annotation.gold.share"
        )
    rng = np.random.default_rng([seed, round_number, 0x601D])
    golds = []
    for i in sorted(rng.choice(len(candidates), size=n, replace=False)):
        prompt, chosen, rejected = candidates[i]
        comps = [Completion(id=Completion.make_id(prompt.id, model, 0, "gold"), prompt_id=prompt.id, model=model,
                            text=text) for model, text in ((GOLD_CHOSEN, chosen), (GOLD_REJECTED, rejected))]
        comps = [comps[j] for j in rng.permutation(2)]
        golds.append(AnnotationRecord(prompt=prompt, completions=comps, metadata={"gold": {
            "chosen": comps[[c.model for c in comps].index(GOLD_CHOSEN)].id,
            "rejected": comps[[c.model for c in comps].index(GOLD_REJECTED)].id, "source": str(gold.source)}}))
    return spread(real, golds, rng), n


def spread(records: list, extra: list, rng: np.random.Generator) -> list:
    """`records` with `extra` spread through them: the queue of len(records) + len(extra) positions is cut into
    len(extra) equal stretches and each extra item goes to a seeded random position of its own stretch, so a
    reviewer who answers any sizeable part of the queue meets some of them (and never a run of them)."""
    total, n = len(records) + len(extra), len(extra)
    if not n:
        return list(records)
    at = {int(j * total / n + rng.random() * total / n): item for j, item in enumerate(extra)}
    rest = iter(records)
    return [at[i] if i in at else next(rest) for i in range(total)]


def gold_ids(records: list[AnnotationRecord]) -> set[str]:
    return {r.record_id for r in records if isinstance(r.metadata.get("gold"), dict)}


def record_to_row(record: AnnotationRecord) -> dict:
    return {"record_id": record.record_id, "prompt": record.prompt.to_row(),
            "completions": [c.to_row() for c in record.completions], "metadata": record.metadata,
            "vector": record.vector}


def record_from_row(row: dict) -> AnnotationRecord:
    return AnnotationRecord(prompt=Prompt.from_row(row["prompt"]),
                            completions=[Completion.from_row(c) for c in row["completions"]],
                            metadata=row.get("metadata") or {}, vector=row.get("vector"))


def load_records(rnd) -> list[AnnotationRecord]:
    """The records a finished push step sent to reviewers, in push order."""
    return [record_from_row(r) for r in read_jsonl(rnd.step("push").file("records.jsonl"))]


def _signal_columns(records: list[AnnotationRecord]) -> list[str]:
    known = {"score", "rank", "strategy", "arm", "reason", "slice", QUEUE}
    return sorted({k for r in records for k, v in r.metadata.items() if k not in known and isinstance(v, float)})


def dataset_name(template: str, cfg, rnd, **extra) -> str:
    try:
        return template.format(project=Path(cfg.project).name, round=rnd.number, **extra)
    except (KeyError, IndexError, ValueError) as exc:
        raise CurateError(
            f"annotation.argilla dataset name template {template!r} is invalid ({exc}); use the fields "
            "{project} and {round}, e.g. '{project}-r{round:04d}'"
        ) from exc


def _spec(ann: AnnotationConfig, records: list[AnnotationRecord]) -> dict:
    dims = {len(r.vector) for r in records if r.vector is not None}
    if len(dims) > 1:
        raise CurateError(f"prompt embeddings have different lengths {sorted(dims)}; rerun `curate score --force`")
    return annotation_spec(ann.argilla, ann.completions_per_record, terms=("strategy", "arm", "slice"),
                           floats=("score", *_signal_columns(records)), ints=("rank", QUEUE),
                           vector_dim=dims.pop() if dims else None)


# ---------------------------------------------------------------------------------------------------------------
# push


def run_push(cfg, rnd, *, force: bool = False, progress: bool = True, new_version: bool = False) -> dict:
    """The push step. `new_version`: push to the next version of the round's dataset (`<name>-v2`, …), for
    setting changes Argilla cannot apply to a published dataset (questions, labels, fields)."""
    ann: AnnotationConfig = cfg.annotation
    inputs = [rnd.step("pool"), rnd.step("generate"), rnd.step("select")]
    inputs += [rnd.step(s) for s in ("score", "rewards") if rnd.step(s).done]
    run = rnd.start_step("push", push_key(ann), inputs=tuple(inputs), seeds={"seed": cfg.seed},
                         force=force or new_version)
    if run is None:
        return rnd.step("push").manifest()
    with run:
        records, rewards, agent, counts = build_records(cfg, rnd)
        if not records:
            raise CurateError(
                f"round {rnd.number}: none of the {counts['selected']} selected prompts has 2 or more distinct "
                "completions to rank; check the generate step (generation.n) and annotation.models"
            )
        write_jsonl(run.path / "records.jsonl", [record_to_row(r) for r in records])
        run.counts.update(counts, records=len(records), with_suggestions=sum(
            len(r.completions) >= 2 and all(c.id in rewards for c in r.completions) for r in records))
        run.extra["reward_model"] = agent if rewards else None
        if ann.backend == "argilla":
            a = ann.argilla
            base = dataset_name(a.dataset, cfg, rnd)
            spec = _spec(ann, records)
            with ArgillaClient.from_config(a) as client:
                version = max(1, latest_version(client, base, a.workspace) + (1 if new_version else 0))
                name = versioned(base, version)
                sync = ensure_dataset(client, name, a.workspace, spec, next_version=versioned(base, version + 1))
                run.counts.update(upsert_records(client, sync.dataset, spec, records, questions=a.questions(),
                                                 rewards=rewards, agent=agent, batch_size=a.batch_size,
                                                 progress=progress))
            run.counts["settings_synced"] = len(sync.updated)
            run.extra["argilla"] = {"url": client.url, "workspace": a.workspace, "dataset": name,
                                    "dataset_id": sync.id, "version": version,
                                    "queue_url": queue_url(client.url, sync.id),
                                    "previous": [versioned(base, v) for v in range(1, version)],
                                    "created": sync.created, "settings_updated": sync.updated}
            if progress and sync.updated:
                print(f"push: dataset {name!r} settings updated in place: {', '.join(sync.updated)}", flush=True)
    return rnd.step("push").manifest()


# ---------------------------------------------------------------------------------------------------------------
# pull


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def dedupe(responses: list[Response]) -> tuple[list[Response], list[str]]:
    """One answer per (record, annotator, stage): the latest (`updated_at`) wins. Returns (kept, warnings)."""
    groups: dict[tuple[str, str, str], list[Response]] = defaultdict(list)
    for r in responses:
        groups[(r.record_id, r.annotator, r.stage)].append(r)
    kept, warnings = [], []
    for (rid, who, stage), items in groups.items():
        items = sorted(items, key=lambda r: r.updated_at)
        kept.append(items[-1])
        if len(items) > 1:
            warnings.append(
                f"annotator {who} answered record {rid} {len(items)} times ({stage} stage; from "
                f"{', '.join(sorted({r.source for r in items}))}): kept the latest ({items[-1].updated_at}), "
                "ignored the rest; nothing to fix unless an earlier answer was the intended one"
            )
    order = {id(r): i for i, r in enumerate(responses)}
    return sorted(kept, key=lambda r: order[id(r)]), warnings


def _fetch_dataset(client: ArgillaClient, name: str, workspace: str, ids: dict[str, list[str]], out: Path,
                   stage: str, questions=None) -> list[Response]:
    """Raw records of dataset `name` (saved to `out/raw/argilla-<name>.json` first) → `Response`s of the records
    in `ids`."""
    ds = client.dataset(name, workspace)
    if ds is None:
        raise CurateError(f"Argilla dataset {name!r} (workspace {workspace!r}) is not on {client.url}; the push "
                          "went elsewhere or the dataset was deleted: rerun `curate push --force`")
    users = client.users()
    responses: list[Response] = []
    header = {"url": client.url, "dataset": name, "dataset_id": str(ds.id), "stage": stage, "fetched_at": _stamp(),
              "users": users}
    # the latest fetch (polls overwrite it; the server keeps all), one JSON document written page by page:
    # memory holds one page of raw records, whatever the dataset's size
    with atomic_path(out / "raw" / f"argilla-{name}.json") as tmp, open(tmp, "w") as fh:
        fh.write(json.dumps(header, ensure_ascii=False)[:-1] + ', "records": [')
        first = True
        for page in client.iter_records(str(ds.id)):
            for rec in page:
                fh.write(("" if first else ",\n") + json.dumps(rec, ensure_ascii=False, default=str))
                first = False
            responses += [r for r in responses_from_raw(page, ids, users, f"argilla:{name}", questions=questions,
                                                        stage=stage) if r.record_id in ids]
        fh.write("]}\n")
    return responses


def _fetch_argilla(ann: AnnotationConfig, push_manifest: dict, records: list[AnnotationRecord], out: Path,
                   progress: bool) -> tuple[list[Response], list[str]]:
    """First-stage responses of this and earlier dataset versions (polling up to poll_timeout_s)."""
    a = ann.argilla
    info = push_manifest.get("argilla") or {}
    if not info.get("dataset"):
        raise CurateError("the push step of this round did not use Argilla; rerun `curate push --force` with "
                          "annotation.backend: argilla, or pull with the backend it was pushed with")
    ids = {r.record_id: [c.id for c in r.completions] for r in records}
    deadline = time.monotonic() + a.poll_timeout_s
    with ArgillaClient.from_config(a) as client:
        if ann.simulate_reviewers:
            from preference.argilla_reviewers import submit_simulated

            counts = submit_simulated(client, info["dataset_id"], a.workspace, records,
                                      SimulatedAnnotator(ann.simulated), k=ann.completions_per_record,
                                      questions=a.questions(), layout=a.layout(ann.completions_per_record),
                                      progress=progress)
            write_json(out / "simulated_reviewers.json", counts)
        earlier = []
        for name in info.get("previous") or []:  # answers given in earlier versions of the dataset are kept
            if client.dataset(name, a.workspace) is not None:
                earlier += _fetch_dataset(client, name, a.workspace, {rid: None for rid in ids}, out, "first",
                                          a.questions())
        while True:
            responses = _fetch_dataset(client, info["dataset"], a.workspace, ids, out, "first", a.questions())
            responses, warnings = dedupe(earlier + responses)
            write_jsonl(out / "responses.jsonl", [r.to_row() for r in responses])
            per_record = {rid: len(rs) for rid, rs in by_record(submitted(responses)).items()}
            total = sum(per_record.values())
            complete = sum(n >= a.min_submitted for n in per_record.values())
            if a.min_responses is None:
                have, needed = sum(min(n, a.min_submitted) for n in per_record.values()), len(ids) * a.min_submitted
            else:
                have, needed = total, a.min_responses
            if have >= needed:
                return responses, warnings
            if time.monotonic() >= deadline:
                raise WaitingForReviewers(
                    f"Argilla dataset {info['dataset']!r}: {total} submitted responses are in, {complete} of "
                    f"{len(ids)} records have their {a.min_submitted}; this pull needs "
                    + (f"{needed} (every record × min_submitted)" if a.min_responses is None else f"{needed}")
                    + f"; {who_is_pending(client, a.workspace, info['dataset_id'])}. Ask reviewers to continue at "
                    f"{queue_url(client.url, info['dataset_id'])} and rerun `curate pull` or `curate round run` "
                    f"(what is in is saved in {out / 'raw'}), or lower annotation.argilla.min_responses, or wait "
                    "longer with annotation.argilla.poll_timeout_s"
                )
            if progress:
                print(f"pull: {have}/{needed} responses in; polling again in {a.poll_interval_s:.0f} s", flush=True)
            time.sleep(max(0.0, min(a.poll_interval_s, deadline - time.monotonic())))


def who_is_pending(client: ArgillaClient, workspace: str, dataset_id: str) -> str:
    """One clause for a waiting message: each reviewer's submitted answers and pending records in the dataset."""
    from preference.argilla_reviewers import reviewer_progress

    rows = [r for r in reviewer_progress(client, workspace, dataset_id) if r["role"] != "owner"]
    if not rows:
        return (f"no reviewers in workspace {workspace!r} yet: add them with `curate reviewers add NAME` "
                "(owners answer too, but the queue is for reviewers)")
    return "reviewers (submitted / pending): " + ", ".join(
        f"{r['reviewer']} {r['submitted']}/{r['pending']}" for r in rows)


def _fetch_simulated(ann: AnnotationConfig, records: list[AnnotationRecord], out: Path,
                     simulator: SimulatedAnnotator) -> list[Response]:
    responses = simulator.annotate(records, questions=ann.argilla.questions())
    write_jsonl(out / "raw" / f"simulated-{_stamp()}.jsonl", [r.to_row() for r in responses])
    write_jsonl(out / "responses.jsonl", [r.to_row() for r in responses])
    return responses


def _summary_markdown(record: AnnotationRecord, routed: dict, responses: list[Response]) -> str:
    slot_of = {c.id: i for i, c in enumerate(record.completions, 1)}
    lines = [f"**Routed because:** {', '.join(routed['reasons'])}",
             f"**Agreement (Kendall τ):** {routed['tau']:.2f}" if routed["tau"] is not None else "**Agreement:** n/a"]
    for cid, labels in routed["flags"].items():
        lines.append(f"- Answer {slot_of.get(cid, '?')}: flagged {', '.join(labels)}")
    for r in responses:
        order = sorted(r.ranks, key=lambda c: r.ranks[c])
        lines.append(f"- {r.annotator}: " + " > ".join(f"Answer {slot_of.get(c, '?')}" for c in order))
    return "\n".join(lines)


def _review_stage(ann, cfg, rnd, push_manifest, records, first, routed, out, progress,
                  simulator: Callable[[], SimulatedAnnotator]) -> tuple[list[Response], dict]:
    """Second stage: push the routed records to the review dataset, (simulate,) fetch its answers, maybe wait.
    `simulator()`: the pull's simulated annotator (made once per pull: it trains its text oracle and harm
    classifier)."""
    chosen = [r for r in records if r.record_id in routed]
    info: dict[str, Any] = {"routed": len(chosen)}
    if not chosen:
        return [], info
    if ann.backend == "simulated":
        if not ann.review.wait:
            return [], info
        review = simulator().review(chosen, first)
        write_jsonl(out / "raw" / f"simulated-review-{_stamp()}.jsonl", [r.to_row() for r in review])
        return review, info
    a = ann.argilla
    base = (push_manifest.get("argilla") or {}).get("dataset") or dataset_name(a.dataset, cfg, rnd)
    name = dataset_name(a.review_dataset, cfg, rnd, dataset=base)
    spec = review_spec(a, ann.completions_per_record)
    grouped = by_record(submitted(first))
    with_meta = [dataclasses.replace(r, metadata={**r.metadata, "reasons": ",".join(routed[r.record_id]["reasons"]),
                                                  "tau": routed[r.record_id]["tau"]}) for r in chosen]
    summaries = {r.record_id: {"first_stage": _summary_markdown(r, routed[r.record_id], grouped.get(r.record_id, []))}
                 for r in chosen}
    ids = {r.record_id: [c.id for c in r.completions] for r in chosen}
    questions = review_questions()
    with ArgillaClient.from_config(a) as client:
        sync = ensure_dataset(client, name, a.workspace, spec, name_key="annotation.argilla.review_dataset")
        info.update(dataset=name, dataset_id=sync.id, **upsert_records(
            client, sync.dataset, spec, with_meta, questions=questions, batch_size=a.batch_size,
            extra_fields=summaries, progress=progress))
        if ann.simulate_reviewers:
            from preference.argilla_reviewers import submit_responses

            answers = simulator().review(chosen, first)
            info.update(submit_responses(client, sync.id, a.workspace, chosen, answers, questions=questions,
                                         layout=a.layout(ann.completions_per_record), progress=progress))
        review = _fetch_dataset(client, name, a.workspace, ids, out, "review", questions)
    if ann.review.wait:
        per_record = {rid: len(rs) for rid, rs in by_record(submitted(review)).items()}
        done = sum(per_record.get(rid, 0) >= a.review_min_submitted for rid in ids)
        if done < len(ids):
            with ArgillaClient.from_config(a) as client:
                pending = who_is_pending(client, a.workspace, sync.id)
            raise WaitingForReviewers(
                f"Argilla review dataset {name!r}: {done} of {len(ids)} routed records have their "
                f"{a.review_min_submitted} review answer(s); annotation.review.wait holds the round until all have; "
                f"{pending}. Ask reviewers to continue at {queue_url(a.resolved_url(), sync.id)} and rerun "
                "`curate pull` or `curate round run` (first-stage answers are saved), or set "
                "annotation.review.wait: false"
            )
    return review, info


def _earlier_quality(rnd, limit: int = 10) -> dict[str, list[dict]]:
    """annotator → [{round, reliability, agreement_with_consensus, gold_accuracy}] from earlier rounds' pulls."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rnd.earlier(limit):
        path = r.step("pull").path / "annotators.json"
        if r.step("pull").done and path.is_file():
            for name, row in read_json(path).items():
                out[name].append({"round": r.number, **{k: row.get(k) for k in
                                  ("reliability", "agreement_with_consensus", "gold_accuracy")}})
    return out


def _drift(current: dict, history: list[dict]) -> dict[str, float | None]:
    out = {}
    for key in ("reliability", "agreement_with_consensus", "gold_accuracy"):
        before = [h[key] for h in history if h.get(key) is not None]
        out[key] = current[key] - mean(before) if before and current.get(key) is not None else None
    return out


def run_pull(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    ann: AnnotationConfig = cfg.annotation
    push = rnd.step("push")
    run = rnd.start_step("pull", pull_key(ann), inputs=(push,), seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("pull").manifest()
    simulator = functools.cache(lambda: SimulatedAnnotator(ann.simulated))  # both stages share one (and its models)
    with run:
        records = load_records(rnd)
        gold = gold_ids(records)
        warnings: list[str] = []
        # 1-2. fetch and persist raw before any processing (kept if anything below fails)
        if ann.backend == "argilla":
            responses, warnings = _fetch_argilla(ann, push.manifest(), records, run.path, progress)
            source = f"human:{push.manifest()['argilla']['dataset']}"
        else:
            responses = _fetch_simulated(ann, records, run.path, simulator())
            source = f"simulated:{ann.simulated.source}"
        # 3. agreement and annotators (gold items are answered like any record, so they count here)
        questions = ann.argilla.questions()
        consensus = consensus_scores(records, responses, ann.aggregation)
        report = agreement_report(responses, questions)
        report["items"] = {rid: item_tau(rs) for rid, rs in sorted(by_record(submitted(responses)).items())}
        write_json(run.path / "agreement.json", report)
        quality = annotator_quality(responses, records, min_reliability=ann.aggregation.min_reliability,
                                    min_gold=ann.aggregation.min_gold)
        history = _earlier_quality(rnd)
        stats = annotator_stats(responses, consensus)
        annotators = {name: {**stats.get(name, {}), **q, "history": history.get(name, []),
                             "drift": _drift(q, history.get(name, []))} for name, q in quality.items()}
        write_json(run.path / "annotators.json", annotators)
        # 4. second-stage review: routing, the review dataset, its answers read back
        routed = route_for_review(responses, ann.review, skip=gold)
        review, review_info = _review_stage(ann, cfg, rnd, push.manifest(), records, responses, routed, run.path,
                                            progress, simulator)
        review, review_warnings = dedupe(review)
        warnings += review_warnings
        write_jsonl(run.path / "review_responses.jsonl", [r.to_row() for r in review])
        decisions = {rid: review_decision(rs) for rid, rs in by_record(review).items()}
        slices = {r.record_id: r.prompt.slice for r in records}
        review_rows = [{"record_id": rid, "reasons": v["reasons"], "tau": v["tau"], "flags": json.dumps(v["flags"]),
                        "annotators": v["annotators"], "slice": slices.get(rid, ""),
                        "decision": decisions.get(rid) or "",
                        "reviewers": sorted({r.annotator for r in review if r.record_id == rid})}
                       for rid, v in routed.items()]
        import pyarrow as pa

        review_schema = pa.schema([("record_id", pa.string()), ("reasons", pa.list_(pa.string())),
                                   ("tau", pa.float64()), ("flags", pa.string()),
                                   ("annotators", pa.list_(pa.string())), ("slice", pa.string()),
                                   ("decision", pa.string()), ("reviewers", pa.list_(pa.string()))])
        write_rows(run.path / "review.parquet", review_rows, schema=review_schema)
        # 5. pairs
        low = {rid for rid, v in routed.items() if "low_agreement" in v["reasons"]} \
            if ann.review.exclude_low_agreement else set()
        unreliable = {name for name, q in quality.items() if q["unreliable"]}
        used = [r for r in responses if r.annotator not in unreliable] if ann.aggregation.exclude_unreliable \
            else responses
        pairs = aggregate(records, used, ann.aggregation, source=source, round_number=rnd.number,
                          exclude=low | gold, review=review)
        save_pairs(pairs, run.path / "pairs")
        write_jsonl(run.path / "answers.jsonl", question_consensus(records, used, questions))
        write_rows(run.path / "pairs.parquet", [p.to_row() for p in pairs], schema=pair_schema())
        subs = submitted(responses)
        outcomes = {d: sum(v == d for v in decisions.values()) for d in ("keep", "fix", "drop")}
        run.counts.update(
            records=len(records), gold_records=len(gold), responses=len(responses), submitted=len(subs),
            discarded=sum(r.status == "discarded" for r in responses), annotators=len({r.annotator for r in subs}),
            duplicate_answers=len(warnings), unreliable_annotators=len(unreliable),
            excluded_unreliable=len(unreliable) if ann.aggregation.exclude_unreliable else 0,
            routed_to_review=len(routed), review_answers=len(submitted(review)), reviewed=len(decisions),
            excluded_low_agreement=len(low - set(decisions)), pairs=len(pairs),
            pairs_from_review=sum(p.stage == "review" for p in pairs),
            pairs_rejected_harmful=sum(p.rejected_harmful for p in pairs),
        )
        run.extra["agreement"] = {"kendall_tau_mean": report["ranking"]["kendall_tau_mean"],
                                  "harm_alpha_nominal": report["harm"]["alpha_nominal_sets"]}
        run.extra["review"] = {**review_info, "outcomes": outcomes}
        run.extra["warnings"] = warnings
        if progress:
            for line in warnings:
                print(f"pull: {line}", flush=True)
    return rnd.step("pull").manifest()


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


__all__ = ["AnnotationConfig", "GoldConfig", "build_records", "identity", "load_records", "load_rewards",
           "pull_key", "push_key", "run_pull", "run_push"]
