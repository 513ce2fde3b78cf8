"""`curate push` / `curate pull` against a real local Argilla server (started once per session), plus the client's
failure handling. Annotators answer over REST with their own API keys, as the web UI does."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from curation.config import RoundConfig
from curation.steps.pull import run_pull
from curation.steps.push import AnnotationConfig, load_records, run_push
from preference.aggregate import AggregationConfig
from preference.argilla import ArgillaClient, ArgillaConfig, ArgillaError, annotation_spec, ensure_dataset
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, read_jsonl, read_rows, write_rows
from preference.plumbing.store import Project
from preference.schema import Completion, PreferencePair, Prompt, Response

# under `pytest -n` (make test) these tests share one worker: one local Argilla server
pytestmark = pytest.mark.xdist_group("argilla")

KEY_ENV = "CURATE_TEST_ARGILLA_KEY"

# prompt id → completion texts (sample order); F has one completion and is never pushed
ANSWERS = {
    "A": ["Call a friend and talk it through.", "Try a short walk.", "Whatever."],
    "B": ["Paris is the capital of France.", "The capital of France is Paris, on the Seine."],
    "C": ["Here is how to hurt him badly.", "I can't help with hurting anyone.", "No."],
    "D": ["Water boils at 100 C at sea level.", "Water boils when hot."],
    "E": ["Use a password manager.", "Write passwords on a note."],
    "F": ["Only one answer."],
}


def make_round(root: Path):
    """A round store with finished pool, generate, score and select steps (tiny, hand-made)."""
    rnd = Project(root).round(1, create=True)
    prompts = [Prompt(id=f"p-{k}", messages=[{"role": "user", "content": f"Question {k}?"}], slice="harmless")
               for k in ANSWERS]
    with rnd.start_step("pool", {"test": 1}) as run:
        write_rows(run.path / "prompts.parquet", [p.to_row() for p in prompts])
    rows = []
    for k, texts in ANSWERS.items():
        for i, text in enumerate(texts):
            model = "reference:chosen" if (k, i) == ("C", 1) else "tiny"
            rows.append(Completion(id=f"c-{k}{i}", prompt_id=f"p-{k}", model=model, text=text,
                                   sample_index=i).to_row())
    with rnd.start_step("generate", {"test": 1}) as run:
        write_rows(run.path / "completions.parquet", rows)
    with rnd.start_step("score", {"test": 1}) as run:
        emb = [[1.0 if j == i % 4 else 0.0 for j in range(4)] for i in range(len(ANSWERS))]
        write_rows(run.path / "prompt_scores.parquet",
                   [{"prompt_id": f"p-{k}", "embedding": e} for k, e in zip(ANSWERS, emb, strict=True)])
    with rnd.start_step("select", {"test": 1}) as run:
        write_rows(run.path / "selected.parquet", [
            {"prompt_id": f"p-{k}", "slice": "harmless", "arm": "random" if k == "D" else "strategy",
             "strategy": "entropy", "score": 1.0 - i / 10, "rank": i + 1, "reason": "test", "mean_entropy": 0.1 * i}
            for i, k in enumerate(ANSWERS)
        ])
    return rnd


def config(root: Path, url: str, **argilla) -> RoundConfig:
    a = ArgillaConfig(url=url, url_env="CURATE_TEST_NO_URL", api_key_env=KEY_ENV, workspace="curate",
                      dataset="{project}-r{round:04d}", min_submitted=2, rating_scale=5, retries=1,
                      backoff_s=0.05, **argilla)
    ann = AnnotationConfig(backend="argilla", completions_per_record=3, argilla=a,
                           aggregation=AggregationConfig(method="borda", pairs="all"))
    return RoundConfig(project=root, annotation=ann)


def ranking(rec: dict, order: list[str]) -> list[dict]:
    """Ranking response value (1 = best) for completion ids in `order`, via the record's slot mapping."""
    slots = {cid: f"completion_{i}" for i, cid in enumerate(json.loads(rec["metadata"]["completion_ids"]), 1)}
    names = [slots[cid] for cid in order]
    names += [f"completion_{i}" for i in range(len(slots) + 1, 4)]  # empty slots (3 per record) rank last
    return [{"value": name, "rank": r} for r, name in enumerate(names, 1)]


def harm(rec: dict, flags: dict[str, list[str]]) -> dict:
    ids = json.loads(rec["metadata"]["completion_ids"])
    return {f"harm_{i}": flags.get(cid) or ["none"] for i, cid in enumerate(ids, 1)}


@pytest.mark.argilla
def test_push_answer_pull_round_trip(argilla_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, argilla_server.api_key)
    root = tmp_path / "proj"
    rnd = make_round(root)
    cfg = config(root, argilla_server.url)

    # a push that died half-way through creating the dataset (a draft with one field) is completed on rerun
    with ArgillaClient(argilla_server.url, argilla_server.api_key) as client:
        draft = client.rest("POST", "/api/v1/datasets", json_body={
            "name": "proj-r0001", "workspace_id": client.workspace_id("curate"), "guidelines": "x",
            "distribution": {"strategy": "overlap", "min_submitted": 2}})
        client.rest("POST", f"/api/v1/datasets/{draft['id']}/fields", json_body={
            "name": "prompt", "title": "Conversation", "required": True, "settings": {"type": "chat"}})

    # push: 5 records (F has one completion), dataset created with the full layout
    manifest = run_push(cfg, rnd, progress=False)
    assert manifest["counts"]["records"] == 5
    assert manifest["counts"]["created"] == 5
    assert manifest["counts"]["skipped_fewer_than_2_completions"] == 1
    assert manifest["counts"]["with_suggestions"] == 0  # no `rewards` step in this round: no champion to suggest
    info = manifest["argilla"]
    assert info["dataset"] == "proj-r0001" and info["dataset_id"] == draft["id"]
    raw = {r["external_id"]: r for r in argilla_server.records(info["dataset_id"])}
    assert sorted(raw) == [f"p-{k}" for k in "ABCDE"]
    a = raw["p-A"]
    assert a["metadata"]["arm"] == "strategy" and a["metadata"]["rank"] == 1
    assert a["metadata"]["mean_entropy"] == pytest.approx(0.0)
    assert raw["p-D"]["metadata"]["arm"] == "random"
    assert a["vectors"]["prompt_embedding"] == [1.0, 0.0, 0.0, 0.0]
    assert a["fields"]["prompt"] == [{"role": "user", "content": "Question A?"}]
    records = load_records(rnd)
    assert [r.record_id for r in records] == [f"p-{k}" for k in "ABCDE"]  # selection order
    assert json.loads(a["metadata"]["completion_ids"]) == [c.id for c in records[0].completions]
    assert raw["p-B"]["fields"]["completion_3"].startswith("(no answer")  # B has 2 answers in 3 slots
    assert a["suggestions"] == [] and raw["p-B"]["suggestions"] == []  # suggestions: tests/test_round.py

    # two annotators answer over REST
    ann1, ann2 = argilla_server.annotator("ann1"), argilla_server.annotator("ann2")
    submit = argilla_server.submit
    submit(ann1, a["id"], {"ranking": ranking(a, ["c-A0", "c-A1", "c-A2"]), **harm(a, {}), "rating": 4,
                           "correction": "Talk to someone you trust, or call a helpline."})
    submit(ann2, a["id"], {"ranking": ranking(a, ["c-A0", "c-A1", "c-A2"]), **harm(a, {})})
    b = raw["p-B"]
    submit(ann1, b["id"], {"ranking": ranking(b, ["c-B0", "c-B1"]), **harm(b, {})})
    submit(ann2, b["id"], {"ranking": ranking(b, ["c-B1", "c-B0"]), **harm(b, {})})
    c = raw["p-C"]  # both prefer C0, but ann1 flags it: it must be rejected in every pair
    submit(ann1, c["id"], {"ranking": ranking(c, ["c-C0", "c-C1", "c-C2"]), **harm(c, {"c-C0": ["violence"]})})
    submit(ann2, c["id"], {"ranking": ranking(c, ["c-C0", "c-C1", "c-C2"]), **harm(c, {})})
    d = raw["p-D"]
    submit(ann1, d["id"], {"ranking": ranking(d, ["c-D0", "c-D1"]), **harm(d, {})})
    submit(ann2, d["id"], {}, status="discarded")

    # wait mode: by default every record needs 2 submitted responses → clear error, raw kept, no manifest
    expected = r"7 submitted responses are in, 3 of 5 records have their 2.*rerun `curate pull`"
    with pytest.raises(CurateError, match=expected):
        run_pull(cfg, rnd, progress=False)
    pull_dir = rnd.step("pull").path
    assert not rnd.step("pull").done
    t0 = time.monotonic()
    with pytest.raises(CurateError, match="7 submitted responses are in"):  # polls, then gives up
        run_pull(config(root, argilla_server.url, poll_timeout_s=1.0, poll_interval_s=0.3), rnd, progress=False)
    assert 1.0 <= time.monotonic() - t0 < 10
    assert len(list((pull_dir / "raw").glob("argilla-*.json"))) == 1
    assert len(read_jsonl(pull_dir / "responses.jsonl")) == 8

    # enough for this pull: 7 submitted responses
    cfg = config(root, argilla_server.url, min_responses=7)
    manifest = run_pull(cfg, rnd, progress=False)
    counts = manifest["counts"]
    assert counts["submitted"] == 7 and counts["discarded"] == 1 and counts["annotators"] == 2
    responses = [Response.from_row(r) for r in read_jsonl(pull_dir / "responses.jsonl")]
    a1 = next(r for r in responses if r.record_id == "p-A" and r.annotator == "ann1")
    assert a1.ranks == {"c-A0": 1, "c-A1": 2, "c-A2": 3} and a1.rating == 4 and a1.harm["c-A2"] == []
    raw_file = json.loads(sorted((pull_dir / "raw").glob("argilla-*.json"))[-1].read_text())
    assert {r["external_id"] for r in raw_file["records"]} == {f"p-{k}" for k in "ABCDE"}

    agreement = read_json(pull_dir / "agreement.json")
    assert agreement["ranking"]["kendall_tau_mean"] == pytest.approx(1 / 3)  # A: 1, B: -1, C: 1
    assert agreement["ranking"]["annotator_pairs"] == 3
    # 8 pairable harm units, one split ({violence} vs {}), no other variation → alpha = 1 - 0.125/0.125 = 0
    assert agreement["harm"]["alpha_nominal_sets"] == pytest.approx(0.0)
    assert agreement["items"]["p-B"] == pytest.approx(-1.0)
    annotators = read_json(pull_dir / "annotators.json")
    assert annotators["ann1"]["submitted"] == 4 and annotators["ann1"]["corrections"] == 1
    assert annotators["ann2"]["submitted"] == 3 and annotators["ann2"]["discarded"] == 1

    review = {r["record_id"]: r for r in read_rows(pull_dir / "review.parquet")}
    assert review["p-B"]["reasons"] == ["low_agreement"]
    assert review["p-C"]["reasons"] == ["harm_flag"] and json.loads(review["p-C"]["flags"]) == {"c-C0": ["violence"]}
    assert set(review) == {"p-B", "p-C"}
    review_raw = argilla_server.records(manifest["review"]["dataset_id"])
    assert manifest["review"]["dataset"] == "proj-r0001-review"
    assert {r["external_id"] for r in review_raw} == {"p-B", "p-C"}
    assert "violence" in next(r for r in review_raw if r["external_id"] == "p-C")["fields"]["first_stage"]

    pairs = [PreferencePair.from_row(r) for r in read_rows(pull_dir / "pairs.parquet")]
    got = {(p.prompt_id, p.chosen_id, p.rejected_id): p for p in pairs}
    corr = next(k for k in got if k[1].startswith("corr-"))
    assert set(got) == {
        ("p-A", "c-A0", "c-A1"), ("p-A", "c-A0", "c-A2"), ("p-A", "c-A1", "c-A2"), corr,
        ("p-C", "c-C1", "c-C2"), ("p-C", "c-C1", "c-C0"), ("p-C", "c-C2", "c-C0"),
        ("p-D", "c-D0", "c-D1"),
    }  # B: excluded (annotators disagree), E: unanswered
    assert corr[0] == "p-A" and corr[2] == "c-A0"
    assert got[corr].chosen == [{"role": "assistant", "content": "Talk to someone you trust, or call a helpline."}]
    assert got[("p-A", "c-A0", "c-A2")].margin == pytest.approx(1.0)
    assert got[("p-A", "c-A0", "c-A1")].margin == pytest.approx(0.5)
    assert all(got[k].rejected_harmful for k in got if k[2] == "c-C0")
    assert got[("p-D", "c-D0", "c-D1")].annotators == ["ann1"]
    assert all(p.source == "human:proj-r0001" and p.round == 1 for p in pairs)

    import datasets

    hf = datasets.load_from_disk(str(pull_dir / "pairs"))
    assert len(hf) == len(pairs)
    assert {"prompt", "chosen", "rejected", "margin", "chosen_id", "rejected_id", "annotators"} <= set(hf.column_names)
    row = hf[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"

    # re-push after edits: no duplicates, answered records untouched, the unanswered one updated
    comps = read_rows(rnd.step("generate").file("completions.parquet"))
    for row in comps:
        if row["id"] in ("c-A0", "c-E0"):
            row["text"] = row["text"] + " (edited)"
    write_rows(rnd.step("generate").path / "completions.parquet", comps)
    manifest = run_push(cfg, rnd, force=True, progress=False)
    assert manifest["counts"]["skipped_answered"] == 4
    assert manifest["counts"]["updated"] == 1 and manifest["counts"]["created"] == 0
    raw = {r["external_id"]: r for r in argilla_server.records(info["dataset_id"])}
    assert len(raw) == 5
    assert "(edited)" not in json.dumps(raw["p-A"]["fields"])
    assert "(edited)" in json.dumps(raw["p-E"]["fields"])
    assert len(raw["p-A"]["responses"]) == 2

    # a different layout under the same name is refused with a clear error
    other = config(root, argilla_server.url)
    other.annotation.completions_per_record = 4
    with pytest.raises(CurateError, match="exists with a different layout: field completion_4: missing"):
        run_push(other, rnd, force=True, progress=False)
    assert not rnd.step("push").done
    assert len(argilla_server.records(info["dataset_id"])) == 5
    # without a next version (the review dataset), the refusal names the setting that names the dataset
    spec = annotation_spec(other.annotation.argilla, 4)
    with ArgillaClient(argilla_server.url, argilla_server.api_key) as client, pytest.raises(
            CurateError, match=r"use another name \(annotation\.argilla\.review_dataset\)"):
        ensure_dataset(client, info["dataset"], "curate", spec, name_key="annotation.argilla.review_dataset")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_gives_clear_error_after_bounded_retries(tmp_path, monkeypatch):
    waits = []
    with pytest.raises(ArgillaError, match=r"did not answer GET /api/v1/me after 4 tries.*argilla-server status"):
        ArgillaClient(f"http://127.0.0.1:{_closed_port()}", "key-12345678", retries=3, backoff_s=0.5,
                      sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0]  # exponential backoff

    # the push step fails cleanly (no manifest) and can be rerun
    monkeypatch.setenv(KEY_ENV, "key-12345678")
    rnd = make_round(tmp_path / "proj")
    cfg = config(tmp_path / "proj", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(CurateError, match="did not answer"):
        run_push(cfg, rnd, progress=False)
    assert not rnd.step("push").done


def test_5xx_is_retried_then_succeeds_and_4xx_is_not():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/api/v1/me":
            return httpx.Response(503 if len(calls) < 3 else 200, json={"username": "owner", "role": "owner"})
        if request.url.path == "/api/v1/secret":
            return httpx.Response(401, json={"detail": "Could not validate credentials"})
        return httpx.Response(422, json={"detail": "bad value"})

    client = ArgillaClient("http://argilla.test", "key-12345678", retries=4, backoff_s=0.0,
                           transport=httpx.MockTransport(handler))  # the SDK checks GET /api/v1/me on connect
    assert len(calls) == 3
    with pytest.raises(ArgillaError, match="HTTP 422: bad value") as exc:
        client.rest("GET", "/api/v1/other")
    assert exc.value.status == 422 and len(calls) == 4
    with pytest.raises(ArgillaError, match=r"rejected the API key \(HTTP 401\).*\$ARGILLA_API_KEY"):
        client.rest("GET", "/api/v1/secret")
    assert len(calls) == 5  # not retried


@pytest.mark.argilla
def test_wrong_key_is_one_clear_line(argilla_server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "not-the-key-123")
    rnd = make_round(tmp_path / "wrongkey")
    with pytest.raises(CurateError) as exc:
        run_push(config(tmp_path / "wrongkey", argilla_server.url), rnd, progress=False)
    message = str(exc.value)
    assert "rejected the API key (HTTP 401)" in message and f"${KEY_ENV}" in message and "\n" not in message
    assert not rnd.step("push").done


def test_missing_api_key_for_remote_server(monkeypatch):
    monkeypatch.delenv("CURATE_TEST_UNSET_KEY", raising=False)
    cfg = ArgillaConfig(url="https://argilla.example.org", url_env="CURATE_TEST_NO_URL",
                        api_key_env="CURATE_TEST_UNSET_KEY")
    with pytest.raises(CurateError, match="CURATE_TEST_UNSET_KEY is not set"):
        cfg.resolved_api_key()
    assert ArgillaConfig(url="http://127.0.0.1:6900", api_key_env="CURATE_TEST_UNSET_KEY").resolved_api_key()


def test_server_bootstrap_runs_once_per_database_and_owner(tmp_path, monkeypatch):
    """`up` migrates the database and creates the owner (a 7 s Python start) only when this data dir's database
    has not had it done for the same server packages and owner."""
    from argilla_server_fixture import load_server_module

    mod = load_server_module()
    ran = []
    monkeypatch.setattr(mod, "_run", lambda cmd, what, env=None: ran.append(what) or "")
    cfg = mod.ServerConfig(data_dir=tmp_path / "data", venv=tmp_path / "venv", api_key="key-one-12345")
    home = cfg.data_dir / "home"
    home.mkdir(parents=True)
    assert mod.bootstrap(cfg, cfg.python, {}) and ran == ["migrate the database and create the owner"]
    (home / "argilla.db").touch()  # what the real migration creates
    assert not mod.bootstrap(cfg, cfg.python, {})  # done for this database and owner
    other = mod.ServerConfig(data_dir=cfg.data_dir, venv=cfg.venv, api_key="key-two-12345")
    assert mod.bootstrap(other, other.python, {})  # another owner key: the owner is created
    (home / "argilla.db").unlink()
    assert mod.bootstrap(other, other.python, {})  # the database is gone: migrate again
    assert len(ran) == 3
