"""`curate push` / `curate pull`: send the selected items to reviewers (Argilla or simulated), collect answers.

push (step `push`):
    select/selected.parquet + the round's prompts + generate/completions.parquet (+ score/prompt_scores.parquet
    for embeddings) → `AnnotationRecord`s, one per selected prompt with up to `completions_per_record`
    completions (round-robin over the models, then shown in a seeded per-record random order so position says
    nothing), saved to `push/records.jsonl`. Backend `argilla`: created/reused dataset, records upserted by id
    (answered ones untouched; a rerun after a crash resumes). Backend `simulated`: nothing else to do.
    An optional `reward` column in completions.parquet (with `reward_model` naming the model) becomes the
    dataset's suggested ranking.

pull (step `pull`):
    1. fetch: Argilla records with their responses (or the simulated annotator's answers); saved as received to
       `pull/raw/` and as `Response` rows to `pull/responses.jsonl` before anything else;
    2. wait mode (Argilla): unless enough submitted responses are in (`argilla.min_responses`, polled for
       `argilla.poll_timeout_s`), stop with an error saying how many are in; the manifest is not written;
    3. `agreement.json` (Kendall τ on rankings, Krippendorff α on harm flags), `annotators.json`;
    4. routing: harm-flagged and low-agreement records → `review.parquet` (+ a second-stage Argilla dataset);
       low-agreement records stay out of the pairs when `review.exclude_low_agreement`;
    5. pairs: `pull/pairs/` (HF dataset, TRL conversational format + provenance) and `pull/pairs.parquet`
       (`PreferencePair` rows).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from preference.aggregate import AggregationConfig, aggregate, consensus_scores, save_pairs
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
    ArgillaClient,
    ArgillaConfig,
    annotation_spec,
    ensure_dataset,
    responses_from_raw,
    review_spec,
    upsert_records,
)
from preference.plumbing.config import to_dict
from preference.plumbing.errors import CurateError, WaitingForReviewers
from preference.plumbing.io import read_jsonl, read_rows, write_json, write_jsonl, write_rows
from preference.schema import AnnotationRecord, Completion, Prompt, Response, stable_id
from preference.simulated import SimulatedAnnotator, SimulatedConfig

KNOWN_SELECT_COLUMNS = {"prompt_id", "slice", "arm", "strategy", "score", "rank", "reason", "embedding"}


@dataclass
class AnnotationConfig:
    backend: Literal["simulated", "argilla"] = "simulated"
    completions_per_record: int = 4  # k: completion slots per record (the dataset's layout; fixed per round)
    models: list[str] = field(default_factory=list)  # only completions of these models (empty = all)
    shuffle: bool = True  # show a record's completions in a seeded random order (no position bias)
    # backend argilla only: simulated reviewers (from `simulated:`) answer through the real server's API before
    # each pull, as users of their own — for unattended demos and end-to-end tests of the Argilla path.
    simulate_reviewers: bool = False
    argilla: ArgillaConfig = field(default_factory=ArgillaConfig)
    simulated: SimulatedConfig = field(default_factory=SimulatedConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)

    def __post_init__(self):
        if not 2 <= self.completions_per_record <= 16:
            raise ValueError(f"completions_per_record must be in 2..16, got {self.completions_per_record}")


# Operational settings that do not change what a step produces: left out of the step keys.
_OPERATIONAL = {"timeout_s", "retries", "backoff_s", "batch_size", "poll_timeout_s", "poll_interval_s", "url",
                "url_env", "api_key_env"}


def _push_key(ann: AnnotationConfig) -> dict:
    out = {k: v for k, v in to_dict(ann).items() if k not in ("simulated", "aggregation", "review", "argilla")}
    if ann.backend == "argilla":
        argilla = to_dict(ann.argilla)
        out["argilla"] = {k: argilla[k] for k in ("workspace", "dataset", "harm_labels", "guidelines",
                                                   "min_submitted", "rating_scale", "correction")}
        out["argilla"]["server"] = ann.argilla.resolved_url()  # another server is another push
    return out


def _pull_key(ann: AnnotationConfig) -> dict:
    out = {"backend": ann.backend, "aggregation": to_dict(ann.aggregation), "review": to_dict(ann.review)}
    if ann.backend == "argilla":
        out["argilla"] = {k: v for k, v in to_dict(ann.argilla).items() if k not in _OPERATIONAL}
    else:
        out["simulated"] = to_dict(ann.simulated)
    return out


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


def build_records(cfg, rnd) -> tuple[list[AnnotationRecord], dict[str, float], str, dict[str, int]]:
    """The round's annotation records (selection order), rewards by completion id, reward agent, counts."""
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
    rewards: dict[str, float] = {}
    agent = "reward-model"
    for row in comp_rows:
        c = Completion.from_row(row)
        if ann.models and c.model not in ann.models:
            continue
        by_prompt[c.prompt_id].append(c)
        if row.get("reward") is not None and np.isfinite(row["reward"]):
            rewards[c.id] = float(row["reward"])
            agent = str(row.get("reward_model") or agent)
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
    return records, rewards, agent, {"selected": len(selected), "skipped_fewer_than_2_completions": few}


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
    known = {"score", "rank", "strategy", "arm", "reason", "slice"}
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
                           floats=("score", *_signal_columns(records)), ints=("rank",),
                           vector_dim=dims.pop() if dims else None)


# ---------------------------------------------------------------------------------------------------------------
# push


def run_push(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    ann: AnnotationConfig = cfg.annotation
    inputs = [rnd.step("pool"), rnd.step("generate"), rnd.step("select")]
    if rnd.step("score").done:
        inputs.append(rnd.step("score"))
    run = rnd.start_step("push", _push_key(ann), inputs=tuple(inputs), seeds={"seed": cfg.seed}, force=force)
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
            all(c.id in rewards for c in r.completions) for r in records))
        if ann.backend == "argilla":
            a = ann.argilla
            name = dataset_name(a.dataset, cfg, rnd)
            spec = _spec(ann, records)
            with ArgillaClient.from_config(a) as client:
                dataset = ensure_dataset(client, name, a.workspace, spec)
                run.counts.update(upsert_records(client, dataset, spec, records, rewards=rewards, agent=agent,
                                                 batch_size=a.batch_size, progress=progress))
            run.extra["argilla"] = {"url": client.url, "workspace": a.workspace, "dataset": name,
                                    "dataset_id": dataset["id"]}
    return rnd.step("push").manifest()


# ---------------------------------------------------------------------------------------------------------------
# pull


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _fetch_argilla(ann: AnnotationConfig, push_manifest: dict, records: list[AnnotationRecord], out: Path,
                   progress: bool) -> list[Response]:
    """Fetch responses (polling up to poll_timeout_s); raw and converted copies are saved on every fetch."""
    a = ann.argilla
    info = push_manifest.get("argilla") or {}
    if not info.get("dataset_id"):
        raise CurateError("the push step of this round did not use Argilla; rerun `curate push --force` with "
                          "annotation.backend: argilla, or pull with the backend it was pushed with")
    ids = {r.record_id: [c.id for c in r.completions] for r in records}
    raw_path = out / "raw" / f"argilla-{_stamp()}.json"
    deadline = time.monotonic() + a.poll_timeout_s
    with ArgillaClient.from_config(a) as client:
        if ann.simulate_reviewers:
            from preference.argilla_reviewers import submit_simulated

            counts = submit_simulated(client, info["dataset_id"], client.workspace_id(a.workspace), records,
                                      SimulatedAnnotator(ann.simulated), k=ann.completions_per_record,
                                      progress=progress)
            write_json(out / "simulated_reviewers.json", counts)
        while True:
            raw = client.list_records(info["dataset_id"], include=("responses",))
            users = client.users()
            write_json(raw_path, {"url": client.url, "dataset": info["dataset"], "dataset_id": info["dataset_id"],
                                  "fetched_at": _stamp(), "users": users, "records": raw})
            responses = [r for r in responses_from_raw(raw, ids, users, f"argilla:{info['dataset']}")
                         if r.record_id in ids]
            write_jsonl(out / "responses.jsonl", [r.to_row() for r in responses])
            per_record = {rid: len(rs) for rid, rs in by_record(submitted(responses)).items()}
            total = sum(per_record.values())
            complete = sum(n >= a.min_submitted for n in per_record.values())
            if a.min_responses is None:
                have, needed = sum(min(n, a.min_submitted) for n in per_record.values()), len(ids) * a.min_submitted
            else:
                have, needed = total, a.min_responses
            if have >= needed:
                return responses
            if time.monotonic() >= deadline:
                raise WaitingForReviewers(
                    f"Argilla dataset {info['dataset']!r}: {total} submitted responses are in, {complete} of "
                    f"{len(ids)} records have their {a.min_submitted}; this pull needs "
                    + (f"{needed} (every record × min_submitted)" if a.min_responses is None else f"{needed}")
                    + f". Ask reviewers to continue at {client.url}/dataset/{info['dataset_id']}/annotation-mode "
                    f"and rerun `curate pull` (what is in is saved in {raw_path.parent}), or lower "
                    "annotation.argilla.min_responses, or wait longer with annotation.argilla.poll_timeout_s"
                )
            if progress:
                print(f"pull: {have}/{needed} responses in; polling again in {a.poll_interval_s:.0f} s", flush=True)
            time.sleep(max(0.0, min(a.poll_interval_s, deadline - time.monotonic())))


def _fetch_simulated(ann: AnnotationConfig, records: list[AnnotationRecord], out: Path) -> list[Response]:
    responses = SimulatedAnnotator(ann.simulated).annotate(records)
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


def _push_review(ann, cfg, rnd, records, responses, routed, progress) -> dict:
    a = ann.argilla
    base = dataset_name(a.dataset, cfg, rnd)
    name = dataset_name(a.review_dataset, cfg, rnd, dataset=base)
    spec = review_spec(a, ann.completions_per_record)
    grouped = by_record(submitted(responses))
    chosen = [  # the review dataset's metadata: why it was routed
        dataclasses.replace(r, metadata={**r.metadata, "reasons": ",".join(routed[r.record_id]["reasons"]),
                                         "tau": routed[r.record_id]["tau"]})
        for r in records if r.record_id in routed
    ]
    summaries = {r.record_id: {"first_stage": _summary_markdown(r, routed[r.record_id], grouped.get(r.record_id, []))}
                 for r in chosen}
    with ArgillaClient.from_config(a) as client:
        dataset = ensure_dataset(client, name, a.workspace, spec)
        counts = upsert_records(client, dataset, spec, chosen, batch_size=a.batch_size, extra_fields=summaries,
                                progress=progress)
    return {"dataset": name, "dataset_id": dataset["id"], **counts}


def run_pull(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    ann: AnnotationConfig = cfg.annotation
    push = rnd.step("push")
    run = rnd.start_step("pull", _pull_key(ann), inputs=(push,), seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("pull").manifest()
    with run:
        records = load_records(rnd)
        # 1-2. fetch and persist raw before any processing (kept if anything below fails)
        if ann.backend == "argilla":
            responses = _fetch_argilla(ann, push.manifest(), records, run.path, progress)
            source = f"human:{push.manifest()['argilla']['dataset']}"
        else:
            responses = _fetch_simulated(ann, records, run.path)
            source = f"simulated:{ann.simulated.source}"
        # 3. agreement and annotators
        consensus = consensus_scores(records, responses, ann.aggregation)
        report = agreement_report(responses)
        report["items"] = {rid: item_tau(rs) for rid, rs in sorted(by_record(submitted(responses)).items())}
        write_json(run.path / "agreement.json", report)
        write_json(run.path / "annotators.json", annotator_stats(responses, consensus))
        # 4. routing to second-stage review
        routed = route_for_review(responses, ann.review)
        slices = {r.record_id: r.prompt.slice for r in records}
        review_rows = [{"record_id": rid, "reasons": v["reasons"], "tau": v["tau"], "flags": json.dumps(v["flags"]),
                        "annotators": v["annotators"], "slice": slices.get(rid, "")} for rid, v in routed.items()]
        import pyarrow as pa

        review_schema = pa.schema([("record_id", pa.string()), ("reasons", pa.list_(pa.string())),
                                   ("tau", pa.float64()), ("flags", pa.string()),
                                   ("annotators", pa.list_(pa.string())), ("slice", pa.string())])
        write_rows(run.path / "review.parquet", review_rows, schema=review_schema)
        if ann.backend == "argilla" and routed:
            run.extra["review"] = _push_review(ann, cfg, rnd, records, responses, routed, progress)
        # 5. pairs
        exclude = {rid for rid, v in routed.items() if "low_agreement" in v["reasons"]} \
            if ann.review.exclude_low_agreement else set()
        pairs = aggregate(records, responses, ann.aggregation, source=source, round_number=rnd.number,
                          exclude=exclude)
        save_pairs(pairs, run.path / "pairs")
        write_rows(run.path / "pairs.parquet", [p.to_row() for p in pairs], schema=pair_schema())
        subs = submitted(responses)
        run.counts.update(
            records=len(records), responses=len(responses), submitted=len(subs),
            discarded=sum(r.status == "discarded" for r in responses), annotators=len({r.annotator for r in subs}),
            routed_to_review=len(routed), excluded_low_agreement=len(exclude), pairs=len(pairs),
            pairs_rejected_harmful=sum(p.rejected_harmful for p in pairs),
        )
        run.extra["agreement"] = {"kendall_tau_mean": report["ranking"]["kendall_tau_mean"],
                                  "harm_alpha_nominal": report["harm"]["alpha_nominal_sets"]}
    return rnd.step("pull").manifest()


def pair_schema():
    """Arrow schema of `PreferencePair` rows (so an empty pairs.parquet still has its columns)."""
    import pyarrow as pa

    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.schema([
        ("id", pa.string()), ("prompt_id", pa.string()), ("prompt", msgs), ("chosen", msgs), ("rejected", msgs),
        ("margin", pa.float64()), ("slice", pa.string()), ("chosen_id", pa.string()), ("rejected_id", pa.string()),
        ("source", pa.string()), ("round", pa.int64()), ("annotators", pa.list_(pa.string())),
        ("rejected_harmful", pa.bool_()),
    ])


__all__ = ["AnnotationConfig", "build_records", "load_records", "run_pull", "run_push"]
