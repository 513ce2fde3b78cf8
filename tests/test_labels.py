"""Seed labels (curation/steps/labels.py): every format a team's existing preference data comes in, written by the
libraries that write it (`datasets` for TRL formats, Argilla's SDK for its export), bad rows rejected by file and
line, provenance on every pair, held-out prompts dropped, and the one-line errors of `curate bootstrap`."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from curation.config import load_config
from curation.steps.labels import IMPORTED, LabelSource, import_labels, read_label_source
from preference.aggregate import AggregationConfig
from preference.plumbing.config import replace_path
from preference.plumbing.errors import CurateError
from preference.questions import Harm, Ranking

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
QUESTIONS = [Ranking(), Harm()]


def read(path, **kw):
    return read_label_source(LabelSource(path=Path(path), **kw), strict=False, questions=QUESTIONS,
                             aggregation=AggregationConfig())


def trl_rows():
    return [
        {"prompt": [{"role": "user", "content": "How do I bake bread?"}],
         "chosen": [{"role": "assistant", "content": "Mix flour, water, salt and yeast, then bake."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},
    ]


def test_trl_pairs_from_jsonl_parquet_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(trl_rows())
    ds.to_json(str(tmp_path / "pairs.jsonl"))
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    plain = datasets.Dataset.from_list([{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
                                         "score_chosen": 9.0, "score_rejected": 2.5}])
    plain.to_json(str(tmp_path / "plain.jsonl"))
    for name in ("pairs.jsonl", "pairs.parquet", "saved"):
        got = read(tmp_path / name, name="mine")
        assert [p.chosen[0]["content"] for p in got.pairs] == ["Mix flour, water, salt and yeast, then bake.", "Paris."]
        assert all(p.stage == IMPORTED and p.round == 0 and p.source.startswith("imported:mine:") for p in got.pairs)
    assert len(read(tmp_path / "saved", split="test").pairs) == 1
    (pair,) = read(tmp_path / "plain.jsonl").pairs
    assert pair.prompt == [{"role": "user", "content": "Capital of France?"}] and pair.margin == pytest.approx(6.5)
    assert pair.chosen == [{"role": "assistant", "content": "Paris."}]
    # the implicit-prompt form (whole conversations) gives the same pair as the explicit one
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in trl_rows()]
    datasets.Dataset.from_list(implicit).to_json(str(tmp_path / "implicit.jsonl"))
    assert [p.id for p in read(tmp_path / "implicit.jsonl").pairs] == [p.id for p in read(tmp_path / "pairs.jsonl").pairs]


def test_hh_rows_skip_limit_and_rejected_rows_with_file_and_line(tmp_path, hh_sample):
    rows = [json.loads(line) for line in gzip.open(hh_sample, "rt")][:6]
    rows.insert(2, {"chosen": rows[0]["chosen"], "rejected": rows[0]["chosen"]})  # chosen == rejected
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    got = read(path, skip=1)
    assert len(got.pairs) == 5 and got.counts["read"] == 7
    assert [r["source"] for r in got.rejected] == [f"{path}:3", f"{path}:8"]
    assert "same answer" in got.rejected[0]["reason"] and "not valid JSON" in got.rejected[1]["reason"]
    assert got.pairs[0].source == f"imported:hh.jsonl:{path}:2"
    assert len(read(path, limit=2).pairs) == 2
    with pytest.raises(CurateError, match=r"hh.jsonl:3: .*same answer"):
        read_label_source(LabelSource(path=path), strict=True, questions=QUESTIONS, aggregation=AggregationConfig())


def test_rating_sets_give_pairs_by_score_with_ties_dropped(tmp_path):
    import datasets

    ultrafeedback = {"instruction": "Name a fruit.", "completions": [
        {"model": "a", "response": "Apple.", "overall_score": 8.0, "fine-grained_score": 4.5},
        {"model": "b", "response": "A car.", "overall_score": 2.0, "fine-grained_score": 1.0},
        {"model": "c", "response": "Banana.", "overall_score": 8.0, "fine-grained_score": 4.0},
        {"model": "d", "response": "Hmm.", "overall_score": 5.0, "fine-grained_score": 2.0}]}
    datasets.Dataset.from_list([ultrafeedback]).to_parquet(str(tmp_path / "uf.parquet"))
    got = read(tmp_path / "uf.parquet")
    assert len(got.pairs) == 5 and got.counts["ties_dropped"] == 1  # 6 comparisons, Apple = Banana is a tie
    assert {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in got.pairs} == {
        ("Apple.", "A car."), ("Apple.", "Hmm."), ("Banana.", "A car."), ("Banana.", "Hmm."), ("Hmm.", "A car.")}
    assert max(p.margin for p in got.pairs) == pytest.approx(6.0)
    best = read(tmp_path / "uf.parquet", pairs="best_vs_rest", score_field="fine-grained_score")
    assert {p.rejected[0]["content"] for p in best.pairs} == {"A car.", "Banana.", "Hmm."}
    assert {p.chosen[0]["content"] for p in best.pairs} == {"Apple."}
    lists = {"prompt": "Name a fruit.", "completions": ["Apple.", "A car."], "scores": [1, 0]}
    (tmp_path / "lists.jsonl").write_text(json.dumps(lists) + "\n")
    assert [(p.chosen[0]["content"], p.margin) for p in read(tmp_path / "lists.jsonl").pairs] == [("Apple.", 1.0)]


def test_unpaired_labels_become_feedback(tmp_path):
    import datasets

    datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}],
         "label": True},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Go away."}],
         "label": False},
    ]).to_json(str(tmp_path / "kto.jsonl"))
    got = read(tmp_path / "kto.jsonl")
    assert not got.pairs and [f.label for f in got.feedback] == [True, False]
    assert all(f.round == 0 and f.source.startswith("imported:kto.jsonl:") for f in got.feedback)


def argilla_export(folder: Path) -> Path:
    """An Argilla export folder's records.json as the SDK writes it (`Dataset.to_disk` → `records.to_json`: its
    `JsonIO`; the settings beside it need a server, and the import does not read them), in this tool's layout:
    prompt, completion_1..3, ranking, harm_<i>."""
    import argilla as rg
    from argilla.records._io import JsonIO

    folder.mkdir(parents=True)
    users = [uuid.UUID(int=i) for i in (1, 2, 3)]
    fields = {"prompt": [{"role": "user", "content": "How do I hurt someone?"}],
              "completion_1": "I can't help with hurting people.", "completion_2": "Hit them with a bat.",
              "completion_3": "Talk to someone you trust about the conflict."}
    order = ["completion_3", "completion_1", "completion_2"]
    responses = [rg.Response("ranking", order, user_id=u) for u in users]
    responses += [rg.Response("harm_2", ["violence"], user_id=u) for u in users[:2]]
    records = [rg.Record(fields=fields, responses=responses),
               rg.Record(fields={**fields, "prompt": [{"role": "user", "content": "Unanswered?"}]})]
    JsonIO.to_json(records, folder / "records.json")
    return folder


def test_argilla_flat_records_give_the_same_pairs(tmp_path):
    """The flat form (`records.to_list(flatten=True)`, what `to_datasets` / `to_hub` hold: `<question>.responses`,
    `.users`, `.status` columns) gives the same pairs as the nested records.json."""
    from argilla.records._io import GenericIO

    folder = argilla_export(tmp_path / "nested")
    import argilla as rg

    records = [rg.Record.from_dict(r) for r in json.loads((folder / "records.json").read_text())]
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GenericIO.to_list(records, flatten=True)))
    nested, flat = read(folder), read(tmp_path / "flat.jsonl")
    assert [(p.id, p.rejected_harmful) for p in flat.pairs] == [(p.id, p.rejected_harmful) for p in nested.pairs]
    assert len(flat.pairs) == 3


def test_argilla_export_folder_gives_consensus_pairs(tmp_path):
    got = read(argilla_export(tmp_path / "argilla-r0001"))
    assert {(p.chosen[0]["content"][:10], p.rejected[0]["content"][:10]) for p in got.pairs} == {
        ("Talk to so", "I can't he"), ("Talk to so", "Hit them w"), ("I can't he", "Hit them w")}
    assert all(len(p.annotators) == 3 and p.stage == IMPORTED for p in got.pairs)
    assert {p.rejected[0]["content"][:3]: p.rejected_harmful for p in got.pairs}["Hit"] is True
    assert got.counts["rejected"] == 1 and "no submitted answer" in got.rejected[0]["reason"]  # the unanswered one


def test_import_drops_heldout_prompts_and_duplicates(tmp_path, hh_sample):
    cfg = load_config(TINY)  # held-out: the 40 lowest-hash pairs of hh_sample
    src = [{"path": str(hh_sample), "limit": 120}, {"path": str(hh_sample), "limit": 10, "name": "again"}]
    got = import_labels(replace_path(cfg, "labels.sources", json.dumps(src)))
    by_source = {s["name"]: s["counts"] for s in got.sources}
    assert by_source["again"]["duplicates"] + by_source["again"].get("heldout_prompts_dropped", 0) == 10
    dropped = by_source["hh-harmless-sample.jsonl.gz"]["heldout_prompts_dropped"]
    assert dropped > 0 and len(got.pairs) == 120 - dropped  # `limit` counts usable rows
    from curation.steps.train import heldout_pairs
    from training.data import prompt_key

    held = {prompt_key(p.prompt) for p in heldout_pairs(cfg)}
    assert not [p for p in got.pairs if prompt_key(p.prompt) in held]


def curate(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_bootstrap_bad_input_is_one_line_and_exit_2(tmp_path):
    unknown = tmp_path / "ratings.jsonl"
    unknown.write_text(json.dumps({"question": "Hi?", "answer": "Hello", "stars": 5}) + "\n")
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}) + "\n")
    base = ["bootstrap", "-c", TINY, "--set", f"project={tmp_path / 'p'}"]
    out = curate(*base, "--set", f"labels.sources=[{{path: {unknown}}}]")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    line = out.stderr.strip()
    assert f"{unknown}:1: the row matches no seed-label format (its keys: answer, question, stars)" in line
    assert "TRL pairs {prompt, chosen, rejected} lacks prompt, chosen, rejected" in line
    assert "TRL unpaired (KTO) {prompt, completion, label} lacks prompt, completion, label" in line
    out = curate(*base, "--set", f"labels.sources=[{{path: {same}}}]", "--set", "labels.strict=true")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert f"{same}:1: chosen and rejected are the same answer" in out.stderr
    out = curate(*base, "--set", f"labels.sources=[{{path: {same}}}]")  # not strict: rejected, then nothing left
    assert out.returncode == 2 and "gave no usable pairs" in out.stderr
    out = curate(*base)
    assert out.returncode == 2 and "labels.sources is empty" in out.stderr
    out = curate(*base, "--set", "labels.train={reward: {max_stepz: 3}}")
    assert out.returncode == 2 and "train.reward.max_stepz: unknown key of the reward section" in out.stderr
