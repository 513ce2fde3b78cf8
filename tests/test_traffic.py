"""The traffic log (fsynced, rotated, crash-safe) and traffic as a pool source (`format: traffic`): served
prompts and answers, thumbs-down items as error-based candidates, feedback.parquet, only new traffic per round."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from curation.config import RoundConfig
from curation.serving.traffic import (
    THUMBS_DOWN_REASON,
    TrafficLog,
    feedback_record,
    read_traffic,
    response_record,
    traffic_files,
)
from curation.steps.generate import GenerationConfig, load_completions, run_generate
from curation.steps.pool import PoolConfig, PoolSource, detect_format, load_prompts, run_pool
from curation.steps.score import ScoringConfig, run_score
from curation.steps.select import (
    SelectionConfig,
    error_score,
    failure_reasons,
    pool_prompts,
    run_select,
    thumbs_down_counts,
)
from preference.plumbing.io import read_jsonl, read_rows, write_rows
from preference.plumbing.store import Project
from preference.schema import Feedback

ROOT = Path(__file__).resolve().parent.parent


def serve_one(log: TrafficLog, prompt: str, answer: str, *, slice_name: str | None = None,
              rating: str | None = None, comment: str = "", version: str = "v0001") -> str:
    """What the serving layer appends for one answered request (and its rating): the same record builders."""
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    log.append(response_record(response_id=rid, messages=[{"role": "user", "content": prompt}], completion=answer,
                               model_version=version, served_model=version, finish_reason="stop", slice=slice_name))
    if rating:
        log.append(feedback_record(feedback_id=f"fb-{uuid.uuid4().hex}", response_id=rid, rating=rating,
                                   comment=comment, model_version=version))
    return rid


def test_log_rotates_never_reopens_and_reads_back_in_order(tmp_path):
    log = TrafficLog(tmp_path / "traffic", rotate_bytes=600)
    ids = [serve_one(log, f"question number {i} about tides", f"answer {i}", rating="up" if i % 2 else None)
           for i in range(6)]
    log.close()
    restarted = TrafficLog(tmp_path / "traffic", rotate_bytes=600)  # a restart starts a file of its own
    ids.append(serve_one(restarted, "after the restart", "ok", rating="down"))
    restarted.close()
    files = traffic_files(tmp_path / "traffic")
    assert len(files) >= 3 and files[-1].name == f"traffic-{len(files):06d}.jsonl"
    assert all(f.stat().st_size <= 600 or len(f.read_text().splitlines()) == 1 for f in files)
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"  # user data: owner-only
    read = read_traffic(tmp_path / "traffic")
    assert list(read.responses) == ids and read.corrupt == []
    assert [r.rating for r in read.responses.values()] == [None, "up", None, "up", None, "up", "down"]
    assert read.counts()["traffic_thumbs_down"] == 1 and read.counts()["traffic_rated"] == 4


WRITER = """
import sys, uuid
sys.path.insert(0, {root!r})
from curation.serving.traffic import TrafficLog, response_record
log = TrafficLog({folder!r})
i = 0
while True:
    rid = f"chatcmpl-{{uuid.uuid4().hex}}"
    log.append(response_record(response_id=rid, messages=[{{"role": "user", "content": "q" * 20000}}],
                               completion="a" * 20000, model_version="v0001", served_model="v0001"))
    print(rid, flush=True)  # acknowledged only after append (write + fsync) returned
    i += 1
"""


def test_killed_writer_loses_no_acknowledged_record_and_a_cut_line_is_skipped(tmp_path):
    folder = tmp_path / "traffic"
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)
    acked = [proc.stdout.readline().strip() for _ in range(25)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acked += [line.strip() for line in proc.stdout if line.strip()]
    read = read_traffic(folder)
    assert set(acked) <= set(read.responses)
    assert len(read.corrupt) <= 1  # a kill can only cut the line being written, the last one
    (path,) = traffic_files(folder)
    data = path.read_bytes()
    if read.corrupt:  # the kill cut the line being written: it is the last one
        complete = data.count(b"\n")
        assert read.corrupt[0][0] == f"{path}:{complete + 1}"
        data = data[: data.rindex(b"\n") + 1]
    # a crash of the machine can cut the last line short: it is skipped and reported with its position
    path.write_bytes(data[: len(data) - 5000])
    n_lines = data.count(b"\n")
    read = read_traffic(folder)
    assert len(read.responses) == n_lines - 1
    assert read.corrupt == [(f"{path}:{n_lines}", read.corrupt[0][1])] and "not valid JSON" in read.corrupt[0][1]


def traffic_cfg(tmp_path, **pool) -> RoundConfig:
    source = PoolSource(path=tmp_path / "serve" / "traffic", format="traffic", slice="traffic")
    return RoundConfig(project=tmp_path / "proj", pool=PoolConfig(sources=[source], **pool),
                       generation=GenerationConfig(backend="dummy", models=["gen"], n=2, max_tokens=8,
                                                   include_references=True, cache=False))


def test_traffic_pool_feedback_and_served_completions(tmp_path):
    log = TrafficLog(tmp_path / "serve" / "traffic")
    a = serve_one(log, "How do I reset my router?", "Unplug it for ten seconds.", slice_name="support", rating="up")
    b = serve_one(log, "Write me a poem about rain", "no.", rating="down", comment="rude")
    serve_one(log, "How do I reset my router?", "Press the reset button.", slice_name="support")  # same prompt again
    serve_one(log, "What is 2+2?", "4")
    log.close()
    (path,) = traffic_files(tmp_path / "serve" / "traffic")
    with open(path, "a") as fh:  # a damaged line in the middle of the log
        fh.write('{"type": "response", "id": 7}\n{not json\n')
    serve_more = TrafficLog(tmp_path / "serve" / "traffic")
    serve_one(serve_more, "Tell me a joke", "Why did the chicken...", rating="up")
    serve_more.close()
    assert detect_format(tmp_path / "serve" / "traffic") == "traffic"

    cfg = traffic_cfg(tmp_path)
    rnd = Project(cfg.project).round(create=True)
    manifest = run_pool(cfg, rnd)
    prompts = {p.messages[0]["content"]: p for p in load_prompts(rnd)}
    assert len(prompts) == 4  # the repeated router question is one pool item
    router, poem = prompts["How do I reset my router?"], prompts["Write me a poem about rain"]
    assert router.slice == "support" and prompts["What is 2+2?"].slice == "traffic"
    assert router.metadata["served_completion"] == "Press the reset button."  # the latest answer
    assert router.metadata["thumbs_up"] == "1" and "failure_reason" not in router.metadata
    assert poem.metadata["failure_reason"] == THUMBS_DOWN_REASON and poem.metadata["feedback_comment"] == "rude"
    assert poem.source.startswith("traffic:") and poem.metadata["model_version"] == "v0001"
    counts = manifest["counts"]
    assert counts["traffic_responses"] == 5 and counts["feedback"] == 3 and counts["traffic_corrupt_lines"] == 2
    assert counts["thumbs_down"] == 1
    rejected = read_jsonl(rnd.step("pool").file("rejected.jsonl"))
    assert [r["source"] for r in rejected] == [f"{path}:7", f"{path}:8"]
    # feedback.parquet: Feedback rows (contract 1), label True = thumbs up
    feedback = [Feedback.from_row(r) for r in read_rows(rnd.step("pool").file("feedback.parquet"))]
    by_answer = {f.completion[0]["content"]: f for f in feedback}
    assert set(by_answer) == {"Unplug it for ten seconds.", "no.", "Why did the chicken..."}
    assert by_answer["no."].label is False and by_answer["no."].comment == "rude"
    assert by_answer["Unplug it for ten seconds."].label is True and by_answer["no."].round == 1
    assert by_answer["no."].prompt == poem.messages and by_answer["no."].prompt_id == poem.id
    traffic = read_rows(rnd.step("pool").file("traffic.parquet"))
    assert {t["response_id"] for t in traffic} >= {a, b}
    # thumbs-down items are error-based candidates through select's existing path
    reasons, _ = failure_reasons(pool_prompts(rnd), None)
    assert reasons == {poem.id: [THUMBS_DOWN_REASON]} and error_score(reasons[poem.id]) == 1.0
    # served answers join the candidates (generate's reference path, model "served")
    run_generate(cfg, rnd, progress=False)
    served = {c.prompt_id: c.text for c in load_completions(rnd) if c.model == "served"}
    assert served[poem.id] == "no." and served[router.id] == "Press the reset button." and len(served) == 4
    # the thumbs-down signal of its own: a `thumbs_down` strategy picks the rated-down prompt
    assert thumbs_down_counts(pool_prompts(rnd)) == {poem.id: 1.0}
    cfg = dataclasses.replace(cfg, scoring=ScoringConfig(backend="dummy", committee=["gen"]),
                              selection=SelectionConfig(strategy="thumbs_down", k=1, random_share=0.0))
    run_score(cfg, rnd, progress=False)
    run_select(cfg, rnd)
    (picked,) = read_rows(rnd.step("select").file("selected.parquet"))
    assert picked["prompt_id"] == poem.id and picked["strategy"] == "thumbs_down"


def test_next_round_ingests_only_new_traffic_and_late_feedback(tmp_path):
    log = TrafficLog(tmp_path / "serve" / "traffic")
    old = serve_one(log, "first question", "first answer", rating="up")
    serve_one(log, "second question", "second answer")
    cfg = traffic_cfg(tmp_path)
    project = Project(cfg.project)
    r1 = project.round(create=True)
    run_pool(cfg, r1)
    first = load_prompts(r1)
    with r1.start_step("select", {"k": 1}) as run:  # round 1 labelled the first question
        write_rows(run.path / "selected.parquet", [{"prompt_id": first[0].id}])
    # after round 1: a late thumbs down on an old answer, and new traffic
    log.append(feedback_record(feedback_id="fb-late", response_id=old, rating="down", model_version="v0001"))
    serve_one(log, "third question", "third answer", rating="down")
    log.close()
    r2 = project.new_round()
    m2 = run_pool(cfg, r2)
    texts = {p.messages[0]["content"]: p for p in load_prompts(r2)}
    assert set(texts) == {"first question", "second question", "third question"}
    assert texts["first question"].metadata["failure_reason"] == THUMBS_DOWN_REASON  # came back through feedback
    feedback = [Feedback.from_row(r) for r in read_rows(r2.step("pool").file("feedback.parquet"))]
    assert sorted((f.completion[0]["content"], f.label) for f in feedback) == [("first answer", False),
                                                                              ("third answer", False)]
    assert m2["counts"]["traffic_responses"] == 2 and m2["counts"]["thumbs_down"] == 2
    assert all(f.round == 2 for f in feedback)


def test_no_traffic_yet_writes_empty_feedback_with_columns(tmp_path):
    cfg = traffic_cfg(tmp_path)
    cfg.pool.sources.append(PoolSource(path=ROOT / "data" / "hh-harmless-sample.jsonl.gz", format="hh", limit=5))
    rnd = Project(cfg.project).round(create=True)
    manifest = run_pool(cfg, rnd)
    assert manifest["counts"]["prompts"] == 5 and manifest["counts"]["feedback"] == 0
    import pyarrow.parquet as pq

    table = pq.read_table(rnd.step("pool").file("feedback.parquet"))
    assert table.num_rows == 0 and table.column_names[:5] == ["id", "prompt_id", "prompt", "completion", "label"]


def test_traffic_lines_that_are_valid_json_but_malformed_are_rejected_with_reasons(tmp_path):
    path = tmp_path / "traffic-000001.jsonl"
    lines = [
        {"type": "response", "id": "r1", "messages": [{"role": "assistant", "content": "hi"}], "completion": "x"},
        {"type": "feedback", "response_id": "r9", "rating": "up"},
        {"type": "feedback", "response_id": "r1", "rating": "meh"},
        {"type": "weird"},
        [1, 2],
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    read = read_traffic(path)
    assert read.responses == {} and read.orphan_feedback == 1
    reasons = dict(read.corrupt)
    assert "last message of a prompt must be from the user" in reasons[f"{path}:1"]
    assert "rating" in reasons[f"{path}:3"] and "unknown record type" in reasons[f"{path}:4"]
    assert f"{path}:5" in reasons


@pytest.mark.parametrize("bad", ["", "short"])
def test_serve_needs_an_api_key_of_8_characters(tmp_path, monkeypatch, bad):
    from curation.serving.serve import api_key
    from preference.plumbing.errors import CurateError

    monkeypatch.setenv("CURATE_API_KEY", bad)
    with pytest.raises(CurateError, match=r"\$CURATE_API_KEY .*openssl rand"):
        api_key(RoundConfig())
