"""Step `pull`: collect the reviewers' answers, measure agreement and reliability, route to a second stage,
turn rankings into preference pairs.

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
"""


from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any

from curation.steps.push import AnnotationConfig, dataset_name, gold_ids, load_records, pull_key
from preference.aggregate import (
    aggregate,
    consensus_scores,
    question_consensus,
    review_decision,
    save_pairs,
)
from preference.agreement import (
    agreement_report,
    annotator_stats,
    by_record,
    item_tau,
    route_for_review,
    submitted,
)
from preference.argilla import (
    ArgillaClient,
    ensure_dataset,
    queue_url,
    responses_from_raw,
    review_spec,
    upsert_records,
)
from preference.plumbing.errors import CurateError, WaitingForReviewers
from preference.plumbing.io import atomic_path, read_json, write_json, write_jsonl, write_rows
from preference.questions import review_questions
from preference.reliability import annotator_quality
from preference.schema import AnnotationRecord, Response, pair_schema
from preference.simulated import SimulatedAnnotator


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


__all__ = ["dedupe", "run_pull", "who_is_pending"]
