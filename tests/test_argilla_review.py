"""On the real local Argilla server: the second-stage review read back (and waited for), settings synced in place
or refused with the next dataset version, answers kept across versions, a server dying mid-push, gold items."""

from __future__ import annotations

import json

import httpx
import pytest
from test_argilla_e2e import KEY_ENV, config, harm, make_round, ranking

import preference.argilla as adapter
from curation.steps.pull import run_pull
from curation.steps.push import AnnotationConfig, GoldConfig, load_records, run_push
from preference.agreement import ReviewConfig
from preference.argilla import ArgillaClient
from preference.plumbing.errors import CurateError, WaitingForReviewers
from preference.plumbing.io import read_json, read_jsonl, read_rows
from preference.schema import PreferencePair, Response
from preference.simulated import SimulatedConfig

# under `pytest -n` (make test) these tests share one worker: one local Argilla server
pytestmark = [pytest.mark.argilla, pytest.mark.xdist_group("argilla")]


def records_by_id(server, dataset_id):
    return {r["external_id"]: r for r in server.records(dataset_id)}


def test_review_answers_are_read_back_waited_for_and_override(argilla_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, argilla_server.api_key)
    root = tmp_path / "rev"
    rnd = make_round(root)
    cfg = config(root, argilla_server.url, min_responses=6)
    cfg.annotation.review = ReviewConfig(wait=True)
    info = run_push(cfg, rnd, progress=False)["argilla"]
    raw = records_by_id(argilla_server, info["dataset_id"])
    ann1, ann2 = argilla_server.annotator("rev1"), argilla_server.annotator("rev2")
    a, b, c = raw["p-A"], raw["p-B"], raw["p-C"]
    for key in (ann1, ann2):
        argilla_server.submit(key, a["id"], {"ranking": ranking(a, ["c-A0", "c-A1", "c-A2"]), **harm(a, {})})
    argilla_server.submit(ann1, b["id"], {"ranking": ranking(b, ["c-B0", "c-B1"]), **harm(b, {})})
    argilla_server.submit(ann2, b["id"], {"ranking": ranking(b, ["c-B1", "c-B0"]), **harm(b, {})})  # disagree
    argilla_server.submit(ann1, c["id"], {"ranking": ranking(c, ["c-C0", "c-C1", "c-C2"]),
                                          **harm(c, {"c-C0": ["violence"]})})
    argilla_server.submit(ann2, c["id"], {"ranking": ranking(c, ["c-C0", "c-C1", "c-C2"]), **harm(c, {})})

    # the first stage is complete enough, the review is not: the round waits, naming the review dataset
    with pytest.raises(WaitingForReviewers, match=r"review dataset 'rev-r0001-review': 0 of 2 routed records"):
        run_pull(cfg, rnd, progress=False)
    assert not rnd.step("pull").done
    review_ds = ArgillaClient(argilla_server.url, argilla_server.api_key).dataset("rev-r0001-review", "curate")
    review_raw = records_by_id(argilla_server, str(review_ds.id))
    assert set(review_raw) == {"p-B", "p-C"}
    reviewer = argilla_server.annotator("senior")
    rb, rc = review_raw["p-B"], review_raw["p-C"]
    # B: the reviewer fixes the ranking (B1 best); C: keeps the first stage's order but clears C0's harm flag
    argilla_server.submit(reviewer, rb["id"], {"decision": "fix", "ranking": ranking(rb, ["c-B1", "c-B0"]),
                                               **harm(rb, {}), "notes": "B1 answers the question"})
    argilla_server.submit(reviewer, rc["id"], {"decision": "keep", **harm(rc, {})})
    manifest = run_pull(cfg, rnd, progress=False)
    pull_dir = rnd.step("pull").path
    review = [Response.from_row(r) for r in read_jsonl(pull_dir / "review_responses.jsonl")]
    assert {(r.record_id, r.extra["decision"]) for r in review} == {("p-B", "fix"), ("p-C", "keep")}
    assert next(r for r in review if r.record_id == "p-B").extra["notes"] == "B1 answers the question"
    pairs = {(p.prompt_id, p.chosen_id, p.rejected_id): p for p in
             (PreferencePair.from_row(r) for r in read_rows(pull_dir / "pairs.parquet"))}
    assert ("p-B", "c-B1", "c-B0") in pairs and pairs[("p-B", "c-B1", "c-B0")].stage == "review"
    assert "senior" in pairs[("p-B", "c-B1", "c-B0")].annotators
    # C: the reviewer's (empty) harm flags win: C0, ranked best by both, is chosen now, not rejected as harmful
    assert ("p-C", "c-C0", "c-C1") in pairs and not pairs[("p-C", "c-C0", "c-C1")].rejected_harmful
    assert {p.stage for k, p in pairs.items() if k[0] == "p-A"} == {"first"}
    assert manifest["review"]["outcomes"] == {"keep": 1, "fix": 1, "drop": 0}
    decisions = {r["record_id"]: r["decision"] for r in read_rows(pull_dir / "review.parquet")}
    assert decisions == {"p-B": "fix", "p-C": "keep"}


def test_settings_sync_new_version_and_answers_across_versions(argilla_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, argilla_server.api_key)
    root = tmp_path / "sync"
    rnd = make_round(root)
    cfg = config(root, argilla_server.url, min_responses=1)
    info = run_push(cfg, rnd, progress=False)["argilla"]
    first = records_by_id(argilla_server, info["dataset_id"])
    ann = argilla_server.annotator("versioned")
    a = first["p-A"]
    argilla_server.submit(ann, a["id"], {"ranking": ranking(a, ["c-A2", "c-A1", "c-A0"]), **harm(a, {})})
    d = first["p-D"]
    argilla_server.submit(ann, d["id"], {"ranking": ranking(d, ["c-D1", "c-D0"]), **harm(d, {})})

    # guidelines and the distribution change in place (the push is stale: --force)
    cfg.annotation.argilla.guidelines = "Rank carefully."
    cfg.annotation.argilla.min_submitted = 3
    with pytest.raises(CurateError, match="already finished with a different config"):
        run_push(cfg, rnd, progress=False)
    manifest = run_push(cfg, rnd, force=True, progress=False)
    assert manifest["argilla"]["settings_updated"] == ["guidelines", "min_submitted"]
    assert manifest["argilla"]["dataset_id"] == info["dataset_id"] and manifest["counts"]["skipped_answered"] == 2
    with ArgillaClient(argilla_server.url, argilla_server.api_key) as client:
        ds = client.dataset("sync-r0001", "curate")
        assert ds.settings.guidelines == "Rank carefully." and ds.settings.distribution.min_submitted == 3

    # new harm labels cannot be applied to a published dataset: refused, naming the next version
    cfg.annotation.argilla.harm_labels = ["violence", "fraud"]
    with pytest.raises(CurateError, match=r"question harm_1, harm_2, harm_3: options differ.*only the config has "
                                          r"\[fraud\].*curate push --new-version` \(creates 'sync-r0001-v2'\)"):
        run_push(cfg, rnd, force=True, progress=False)
    v2 = run_push(cfg, rnd, new_version=True, progress=False)["argilla"]
    assert v2["dataset"] == "sync-r0001-v2" and v2["previous"] == ["sync-r0001"] and v2["version"] == 2
    second = records_by_id(argilla_server, v2["dataset_id"])
    assert set(second) == set(first)
    options = [o["value"] for o in json.loads(json.dumps(ds.settings.serialize()))["questions"][1]["settings"]["options"]]
    assert "fraud" not in options  # v1 untouched
    # the same annotator answers A again in v2 (differently): the pull keeps the latest answer, says so once
    a2 = second["p-A"]
    argilla_server.submit(ann, a2["id"], {"ranking": ranking(a2, ["c-A0", "c-A1", "c-A2"]),
                                          **harm(a2, {"c-A2": ["fraud"]})})
    pulled = run_pull(cfg, rnd, progress=False)
    responses = [Response.from_row(r) for r in read_jsonl(rnd.step("pull").path / "responses.jsonl")]
    mine = {r.record_id: r for r in responses if r.annotator == "versioned"}
    assert set(mine) == {"p-A", "p-D"}  # D answered only in v1: kept
    assert mine["p-A"].ranks == {"c-A0": 1, "c-A1": 2, "c-A2": 3} and mine["p-A"].harm["c-A2"] == ["fraud"]
    assert mine["p-D"].source == "argilla:sync-r0001" and mine["p-A"].source == "argilla:sync-r0001-v2"
    assert pulled["counts"]["duplicate_answers"] == 1
    (warning,) = pulled["warnings"]
    assert "annotator versioned answered record p-A 2 times" in warning and "kept the latest" in warning
    assert (rnd.step("pull").path / "raw" / "argilla-sync-r0001.json").is_file()


def test_server_down_mid_push_then_rerun_resumes(argilla_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, argilla_server.api_key)
    root = tmp_path / "down"
    rnd = make_round(root)
    cfg = config(root, argilla_server.url, batch_size=2)  # 5 records: batches 1–2, 3–4, 5
    real = adapter.log_batch

    def dies_after_first(client, dataset, batch, *, first, total):
        if first > 1:  # the server went away after the first batch
            def refused():
                raise httpx.ConnectError("[Errno 111] Connection refused")

            return client.call(f"PUT records {first}–{first + len(batch) - 1} of {total}", refused)
        return real(client, dataset, batch, first=first, total=total)

    monkeypatch.setattr(adapter, "log_batch", dies_after_first)
    with pytest.raises(CurateError, match=r"did not answer PUT records 3–4 of 5 after 2 tries \(ConnectError.*"
                                          r"rerun: the step resumes") as exc:
        run_push(cfg, rnd, progress=False)
    assert "\n" not in str(exc.value)
    assert not rnd.step("push").done
    monkeypatch.setattr(adapter, "log_batch", real)
    manifest = run_push(cfg, rnd, progress=False)
    assert manifest["counts"]["updated"] == 2 and manifest["counts"]["created"] == 3  # the first batch was kept
    ids = [r["external_id"] for r in argilla_server.records(manifest["argilla"]["dataset_id"])]
    assert sorted(ids) == [f"p-{k}" for k in "ABCDE"]  # nothing lost, nothing twice


def test_gold_items_and_reviewer_profiles_through_the_server(argilla_server, tmp_path, monkeypatch,
                                                            repo_root):
    monkeypatch.setenv(KEY_ENV, argilla_server.api_key)
    root = tmp_path / "goldsrv"
    rnd = make_round(root)
    cfg = config(root, argilla_server.url)
    cfg.annotation.argilla.min_submitted = 3
    gold = GoldConfig(source=repo_root / "data" / "hh-harmless-sample.jsonl.gz", share=0.5)
    cfg.annotation = AnnotationConfig(
        backend="argilla", completions_per_record=3, argilla=cfg.annotation.argilla, simulate_reviewers=True,
        gold=gold, simulated=SimulatedConfig(source=gold.source, annotators=3,
                                             profiles=["careful", "noisy", "adversarial"],
                                             harm_source=repo_root / "data" / "moderation-dev.jsonl.gz"))
    info = run_push(cfg, rnd, progress=False)["argilla"]
    records = load_records(rnd)
    golden = {r.record_id for r in records if "gold" in r.metadata}
    assert len(golden) == 5
    server = records_by_id(argilla_server, info["dataset_id"])
    assert set(server) == {r.record_id for r in records}
    for rid in golden:  # nothing on the server tells a gold record apart
        assert set(server[rid]["metadata"]) == {"completion_ids", "queue"} and rid.startswith("p")  # every record has a queue place
    manifest = run_pull(cfg, rnd, progress=False)
    pull_dir = rnd.step("pull").path
    pairs = read_rows(pull_dir / "pairs.parquet")
    assert pairs and not {p["prompt_id"] for p in pairs} & golden
    quality = read_json(pull_dir / "annotators.json")
    assert quality["sim-0"]["gold_items"] == 5 and quality["sim-0"]["gold_accuracy"] > quality["sim-2"]["gold_accuracy"]
    assert quality["sim-2"]["unreliable"] and manifest["counts"]["unreliable_annotators"] >= 1
