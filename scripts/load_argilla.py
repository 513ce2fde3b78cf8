"""Load and faults on a real local Argilla server: push a few thousand records, have several simulated reviewers
answer concurrently while the server is restarted once, pull, and check that nothing was lost or duplicated.

    python scripts/load_argilla.py [--records 3000] [--reviewers 3] [--restart-after 15]
    python scripts/load_argilla.py --records 20000 --reviewers 0     # push and pull at scale, no reviewing

What it does (its own server on a free port with a temporary data folder, stopped by PID at the end):
1. builds `--records` records from data/hh-harmless-dev.jsonl.gz (the human-chosen and rejected answers of each
   pair, cycled) and pushes them with the adapter the `push` step uses (`dataset.records.log` in batches);
2. `--reviewers` simulated reviewers (careful / noisy / adversarial profiles) answer every record through the
   server's API, one thread each, with their own API keys; `--restart-after` seconds in, the whole server
   (noida + Argilla) is stopped and started again — the reviewers' calls retry with backoff through the outage;
3. pulls every record with its responses (the `pull` step's fetch), builds pairs (Dawid–Skene), and checks:
   the server holds each record exactly once; every answer the reviewers submitted came back exactly once and
   unchanged; every submitted answer appears exactly once in the pairs' provenance (per record, the annotators
   behind its pairs are exactly its submitters, none twice);
4. prints records/s for push and pull, answers/s for the reviewers (outage included), the outage, the checks,
   the process's peak RSS after building the records, after the push and after the pull (push and pull work in
   batches: memory holds one batch of SDK records, one page of raw records), and a hardware line. Exit code 1 if
   a check fails. `--reviewers 0`: push and pull only (no reviewing, no restart).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preference.aggregate import AggregationConfig, aggregate  # noqa: E402
from preference.argilla import (  # noqa: E402
    ArgillaClient,
    ArgillaConfig,
    annotation_spec,
    ensure_dataset,
    responses_from_raw,
    upsert_records,
)
from preference.argilla_reviewers import submit_responses  # noqa: E402
from preference.plumbing.env import apply_env_defaults  # noqa: E402
from preference.plumbing.hardware import describe  # noqa: E402
from preference.schema import AnnotationRecord, Completion, Prompt  # noqa: E402
from preference.simulated import (  # noqa: E402
    REFERENCE_CHOSEN,
    REFERENCE_REJECTED,
    SimulatedAnnotator,
    SimulatedConfig,
    load_labelled,
)


def server_module():
    from preference import argilla_server

    return argilla_server


def build_records(source: Path, n: int) -> list[AnnotationRecord]:
    pairs = load_labelled(source)
    out = []
    for i in range(n):
        messages, chosen, rejected = pairs[i % len(pairs)]
        pid = f"p-load-{i:05d}"
        comps = [Completion(id=f"c-{i:05d}-{tag}", prompt_id=pid, model=model, text=text)
                 for tag, model, text in (("a", REFERENCE_CHOSEN, chosen), ("b", REFERENCE_REJECTED, rejected))]
        out.append(AnnotationRecord(prompt=Prompt(id=pid, messages=messages), completions=comps[:: 1 - 2 * (i % 2)]))
    return out


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def push_pull_only(client, sync, records, questions) -> int:
    """Pull every record back page by page (what `curate pull` does) and check each is on the server once."""
    t0 = time.monotonic()
    seen: Counter = Counter()
    pages = 0
    for page in client.iter_records(sync.id):
        pages += 1
        seen.update(r["external_id"] for r in page)
        responses_from_raw(page, {}, {}, "argilla:load-test", questions=questions)
    pull_s = time.monotonic() - t0
    print(f"pull: {sum(seen.values())} records in {pages} pages in {pull_s:.1f} s = "
          f"{sum(seen.values()) / pull_s:.0f} records/s; peak RSS {peak_rss_gb():.2f} GB", flush=True)
    ok = set(seen) == {r.record_id for r in records} and set(seen.values()) == {1}
    print(f"check: every record on the server exactly once: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    apply_env_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--reviewers", type=int, default=3)
    parser.add_argument("--restart-after", type=float, default=15.0, help="seconds into the reviewing")
    parser.add_argument("--source", type=Path, default=ROOT / "data" / "hh-harmless-dev.jsonl.gz")
    args = parser.parse_args(argv)
    srv = server_module()
    print(describe())
    with tempfile.TemporaryDirectory(prefix="curate-load-") as tmp:
        cfg = srv.ServerConfig(data_dir=Path(tmp) / "server", port=srv.free_port(), api_key="curate.load.owner.key",
                               password="curate-load-password")
        try:
            srv.up(cfg, echo=lambda m: print(f"[server] {m}", flush=True))
            return run(args, srv, cfg)
        finally:
            srv.down(cfg, echo=lambda m: print(f"[server] {m}", flush=True))


def run(args, srv, server_cfg) -> int:
    argilla = ArgillaConfig(url=server_cfg.url, retries=9, backoff_s=1.0, batch_size=250, timeout_s=120.0)
    records = build_records(args.source, args.records)
    print(f"built {len(records)} records; peak RSS {peak_rss_gb():.2f} GB", flush=True)
    spec = annotation_spec(argilla, 2)
    questions = argilla.questions()
    with ArgillaClient(server_cfg.url, server_cfg.api_key, timeout_s=argilla.timeout_s, retries=argilla.retries,
                       backoff_s=argilla.backoff_s) as client:
        sync = ensure_dataset(client, "load-test", argilla.workspace, spec)
        t0 = time.monotonic()
        counts = upsert_records(client, sync.dataset, spec, records, questions=questions,
                                batch_size=argilla.batch_size, progress=True)
        push_s = time.monotonic() - t0
        print(f"push: {counts} in {push_s:.1f} s = {len(records) / push_s:.0f} records/s; peak RSS "
              f"{peak_rss_gb():.2f} GB", flush=True)
        if args.reviewers == 0:
            return push_pull_only(client, sync, records, questions)

        profiles = ["careful", "noisy", "adversarial"]
        sim = SimulatedAnnotator(SimulatedConfig(source=args.source, annotators=args.reviewers,
                                                 profiles=[profiles[i % 3] for i in range(args.reviewers)]))
        answers = sim.annotate(records, questions=questions)
        outage: dict[str, float] = {}

        def restart():
            time.sleep(args.restart_after)
            t = time.monotonic()
            print("[fault] stopping the server (noida + Argilla) …", flush=True)
            srv.down(server_cfg, echo=lambda m: None)
            srv.up(server_cfg, echo=lambda m: print(f"[fault] {m}", flush=True))
            outage["seconds"] = time.monotonic() - t

        restarter = threading.Thread(target=restart, daemon=True)
        t0 = time.monotonic()
        restarter.start()
        submitted = submit_responses(client, sync.id, argilla.workspace, records, answers, questions=questions,
                                     layout=argilla.layout(2), concurrency=args.reviewers, progress=True)
        review_s = time.monotonic() - t0
        restarter.join()
        print(f"reviewers: {submitted} in {review_s:.1f} s = {submitted['simulated_submitted'] / review_s:.0f} "
              f"answers/s, including a {outage.get('seconds', 0):.0f} s outage (restart "
              f"{'during' if outage.get('seconds', 0) and args.restart_after < review_s else 'after'} the reviewing)",
              flush=True)

        t0 = time.monotonic()
        raw = client.list_records(sync.id)
        users = client.users()
        ids = {r.record_id: [c.id for c in r.completions] for r in records}
        pulled = responses_from_raw(raw, ids, users, "argilla:load-test", questions=questions)
        pull_s = time.monotonic() - t0
        print(f"pull: {len(raw)} records, {len(pulled)} responses in {pull_s:.1f} s = {len(raw) / pull_s:.0f} "
              "records/s", flush=True)

    checks = {}
    external = Counter(r["external_id"] for r in raw)
    checks["every record on the server exactly once"] = len(external) == len(records) and set(
        external.values()) == {1}
    expected = {(a.record_id, a.annotator): a.ranks for a in answers}
    got = Counter((r.record_id, r.annotator) for r in pulled if r.status == "submitted")
    checks["every submitted answer came back exactly once"] = set(got) == set(expected) and set(got.values()) == {1}
    checks["… unchanged"] = all(r.ranks == expected[(r.record_id, r.annotator)] for r in pulled)
    t0 = time.monotonic()
    pairs = aggregate(records, pulled, AggregationConfig(method="dawid_skene"))
    aggregate_s = time.monotonic() - t0
    provenance: dict[str, list[str]] = {}
    consistent = True
    for p in pairs:
        if len(set(p.annotators)) != len(p.annotators) or provenance.setdefault(p.prompt_id, p.annotators) != p.annotators:
            consistent = False
    in_provenance = Counter((rid, who) for rid, names in provenance.items() for who in names)
    submitters = {(rid, who) for rid, who in got if rid in provenance}
    checks["every submitted answer exactly once in the pairs' provenance"] = consistent and set(
        in_provenance) == submitters and set(in_provenance.values()) == {1}
    print(f"pairs: {len(pairs)} from {len(provenance)} records (Dawid–Skene over {len(pulled)} answers in "
          f"{aggregate_s:.1f} s); records without pairs (tied): {len(records) - len(provenance)}")
    for name, ok in checks.items():
        print(f"check: {name}: {'ok' if ok else 'FAILED'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
