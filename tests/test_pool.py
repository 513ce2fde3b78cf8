import gzip
import json

import pytest

from curation.steps.pool import PoolConfig, PoolSource, dedup, ingest, load_prompts, row_to_prompt, run_pool
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl, write_rows
from preference.plumbing.store import Project
from preference.schema import Prompt, split_hh_transcript


def _cfg(*sources, **kw):
    return PoolConfig(sources=[PoolSource(**s) for s in sources], **kw)


def test_hh_transcript_split():
    msgs, answer = split_hh_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like so")
    assert msgs == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how?"},
    ]
    assert answer == "like so"
    with pytest.raises(ValueError, match="no '\\\\n\\\\nHuman:'"):
        split_hh_transcript("just text")


def test_ingest_hh_sample(hh_sample):
    result = ingest(_cfg({"path": hh_sample, "slice": "harmless"}))
    c = result.counts()
    assert c["read"] == 400 and c["rejected"] == 0
    assert c["prompts"] + c["exact_duplicates"] + c["near_duplicates"] == 400
    p = result.prompts[0]
    assert p.messages[-1]["role"] == "user" and p.slice == "harmless"
    assert p.metadata["reference_chosen"] and "reference_rejected" in p.metadata
    assert p.source.endswith(":1")


def test_all_formats_agree(tmp_path):
    rows = [
        {"id": "a", "prompt": "How do I boil an egg?", "category": "cooking"},
        {"id": "b", "messages": [{"role": "user", "content": "Name a prime number."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(jsonl.read_text())
    parquet = tmp_path / "p.parquet"
    write_rows(parquet, [{"id": r.get("id"), "text": json.dumps(r)} for r in rows])
    from datasets import Dataset

    Dataset.from_list([{"id": "a", "prompt": "How do I boil an egg?", "category": "cooking"}]).save_to_disk(
        str(tmp_path / "hf")
    )
    a = ingest(_cfg({"path": jsonl}))
    b = ingest(_cfg({"path": gz}))
    assert [p.to_row() for p in a.prompts][0]["id"] == "a"
    assert [p.id for p in a.prompts] == [p.id for p in b.prompts]
    assert a.prompts[0].slice == "cooking" and a.prompts[2].messages[0]["role"] == "system"
    assert a.prompts[2].id.startswith("p")  # content hash when no id is given
    hf = ingest(_cfg({"path": tmp_path / "hf"}))
    assert hf.prompts[0].messages == a.prompts[0].messages
    # a parquet without prompt columns is malformed row by row, with row numbers
    bad = ingest(_cfg({"path": parquet}))
    assert bad.counts()["rejected"] == 3 and "#0" in bad.rejected[0].source
    pq_ok = tmp_path / "ok.parquet"
    write_rows(pq_ok, [{"id": "a", "prompt": "How do I boil an egg?"}])
    assert ingest(_cfg({"path": pq_ok})).prompts[0].messages == a.prompts[0].messages


def test_malformed_lines_reported_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "fine"}\n'
        "{not json\n"
        "\n"
        '{"prompt": ""}\n'
        '{"messages": [{"role": "robot", "content": "x"}]}\n'
        '{"text": "no prompt key"}\n'
        '[1, 2]\n'
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    result = ingest(_cfg({"path": path}))
    assert len(result.prompts) == 1 and result.read == 7
    where = {r.source.rsplit(":", 1)[1]: r.reason for r in result.rejected}
    assert set(where) == {"2", "4", "5", "6", "7", "8"}
    assert "not valid JSON" in where["2"]
    assert "empty" in where["4"]
    assert "role must be one of" in where["5"]
    assert "no 'messages', 'prompt'" in where["6"]
    assert "expected a JSON object" in where["7"]
    assert "last message of a prompt must be from the user" in where["8"]
    with pytest.raises(CurateError, match=r"bad\.jsonl:2: not valid JSON.*strict"):
        ingest(_cfg({"path": path}, strict=True))


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(CurateError, match="does not exist"):
        ingest(_cfg({"path": tmp_path / "nope.jsonl"}))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CurateError, match="cannot tell the format"):
        ingest(_cfg({"path": tmp_path / "x.csv"}))
    with pytest.raises(CurateError, match="pool.sources is empty"):
        ingest(PoolConfig())


def _p(i, text):
    return Prompt(id=str(i), messages=[{"role": "user", "content": text}])


def test_exact_and_near_dedup():
    base = "Can you tell me how to make a simple tomato soup for four people at home tonight please"
    prompts = [
        _p(0, base),
        _p(1, base.upper() + "  "),  # exact after normalization
        _p(2, base.replace("tonight", "today")),  # near duplicate
        _p(3, "What is the tallest mountain in South America and how high is it exactly?"),
    ]
    kept, exact, near = dedup(prompts, 0.7)
    assert [p.id for p in kept] == ["0", "3"] and (exact, near) == (1, 1)
    kept, exact, near = dedup(prompts, 1.0)
    assert [p.id for p in kept] == ["0", "2", "3"] and (exact, near) == (1, 0)


def test_row_to_prompt_hh_mismatch():
    with pytest.raises(ValueError, match="different prompts"):
        row_to_prompt(
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"},
            default_slice="s", source="x",
        )


def test_pool_step_and_carry_over(tmp_path, hh_sample):
    from curation.config import RoundConfig

    cfg = RoundConfig(project=tmp_path / "proj", pool=_cfg({"path": hh_sample, "limit": 30}))
    project = Project(cfg.project)
    r1 = project.round(create=True)
    m = run_pool(cfg, r1)
    assert m["counts"]["prompts"] <= 30 and m["counts"]["read"] == 30
    assert run_pool(cfg, r1)["finished_at"] == m["finished_at"]  # skipped
    prompts = load_prompts(r1)
    # Simulate a finished select and a failures step in round 1, then carry the pool over into round 2.
    run = r1.start_step("select", {"k": 2})
    with run:
        write_rows(run.path / "selected.parquet", [{"prompt_id": prompts[0].id}, {"prompt_id": prompts[1].id}])
    run = r1.start_step("failures", {})
    failure = Prompt(id="fail-1", messages=[{"role": "user", "content": "hard one"}], source="failure:round-1")
    with run:
        write_rows(run.path / "prompts.parquet", [failure.to_row()])
    r2 = project.new_round()
    m2 = run_pool(cfg, r2)
    ids = [p.id for p in load_prompts(r2)]
    assert prompts[0].id not in ids and prompts[1].id not in ids and "fail-1" in ids
    assert m2["counts"]["prompts"] == len(prompts) - 2 + 1
    assert read_jsonl(r2.step("pool").file("rejected.jsonl")) == []
