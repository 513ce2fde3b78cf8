"""Aggregation of rankings into preference pairs: ties, one annotator, conflicts, harm flags; and the simulated
backend's push → pull round trip through the round store."""

from __future__ import annotations

import math

import pytest

from preference.aggregate import (
    AggregationConfig,
    aggregate,
    aggregate_record,
    borda_scores,
    bradley_terry_scores,
    save_pairs,
)
from preference.schema import AnnotationRecord, Completion, PreferencePair, Prompt, Response


def record(n=3, rid="r1"):
    prompt = Prompt(id=rid, messages=[{"role": "user", "content": "How do I stay safe online?"}], slice="s")
    comps = [Completion(id=f"c{i}", prompt_id=rid, model="m", text=f"answer {i}") for i in range(n)]
    return AnnotationRecord(prompt=prompt, completions=comps)


def resp(who, ranks, harm=None, status="submitted", correction="", rid="r1"):
    return Response(record_id=rid, annotator=who, status=status, ranks=ranks, harm=harm or {}, correction=correction)


def keyed(pairs):
    return {(p.chosen_id, p.rejected_id): p for p in pairs}


def test_one_annotator_all_pairs_with_borda_margins():
    pairs = keyed(aggregate_record(record(), [resp("u", {"c0": 2, "c1": 1, "c2": 3})], AggregationConfig()))
    assert set(pairs) == {("c1", "c0"), ("c1", "c2"), ("c0", "c2")}
    assert pairs[("c1", "c2")].margin == pytest.approx(1.0)
    assert pairs[("c1", "c0")].margin == pytest.approx(0.5)
    p = pairs[("c1", "c0")]
    assert p.chosen == [{"role": "assistant", "content": "answer 1"}]
    assert p.prompt[-1]["role"] == "user" and p.annotators == ["u"] and p.slice == "s"
    assert p.id == PreferencePair.make_id("r1", "c1", "c0") and not p.rejected_harmful


def test_ties_give_no_pair():
    pairs = keyed(aggregate_record(record(), [resp("u", {"c0": 1, "c1": 1, "c2": 2})], AggregationConfig()))
    assert set(pairs) == {("c0", "c2"), ("c1", "c2")}


def test_conflicting_annotators_cancel_and_majority_wins():
    two = [resp("u1", {"c0": 1, "c1": 2}), resp("u2", {"c0": 2, "c1": 1})]
    assert aggregate_record(record(2), two, AggregationConfig()) == []
    assert aggregate_record(record(2), two, AggregationConfig(method="bradley_terry")) == []
    three = [*two, resp("u3", {"c0": 1, "c1": 2})]
    (pair,) = aggregate_record(record(2), three, AggregationConfig())
    assert (pair.chosen_id, pair.rejected_id) == ("c0", "c1")
    assert pair.margin == pytest.approx(1 / 3)
    (bt,) = aggregate_record(record(2), three, AggregationConfig(method="bradley_terry"))
    assert bt.chosen_id == "c0" and 0 < bt.margin < math.log(2) + 1e-9  # prior shrinks the 2:1 log-odds


def test_bradley_terry_recovers_log_odds_and_agrees_with_borda():
    rankings = [{"a": 1, "b": 2}] * 3 + [{"a": 2, "b": 1}]
    s = bradley_terry_scores(rankings, ["a", "b"], prior=1e-9, iterations=2000)
    assert s["a"] - s["b"] == pytest.approx(math.log(3), abs=1e-4)
    many = [{"x": 1, "y": 2, "z": 3}, {"x": 1, "y": 3, "z": 2}, {"x": 2, "y": 1, "z": 3}]
    bt, borda = bradley_terry_scores(many, ["x", "y", "z"]), borda_scores(many, ["x", "y", "z"])
    assert sorted(bt, key=bt.get) == sorted(borda, key=borda.get) == ["z", "y", "x"]


def test_harmful_completion_is_never_chosen():
    # both annotators rank c0 best, one flags it: with harm_vote 0.5 it is harmful → rejected in every pair
    responses = [resp("u1", {"c0": 1, "c1": 2, "c2": 3}, {"c0": ["violence"], "c1": [], "c2": []}),
                 resp("u2", {"c0": 1, "c1": 2, "c2": 3}, {"c0": [], "c1": [], "c2": []})]
    pairs = keyed(aggregate_record(record(), responses, AggregationConfig(harm_margin=0.75)))
    assert set(pairs) == {("c1", "c2"), ("c1", "c0"), ("c2", "c0")}
    assert pairs[("c1", "c0")].rejected_harmful and pairs[("c2", "c0")].rejected_harmful
    assert pairs[("c2", "c0")].margin == pytest.approx(0.75)
    assert not pairs[("c1", "c2")].rejected_harmful
    # a stricter vote: one flag out of two is not enough → c0 wins again
    strict = keyed(aggregate_record(record(), responses, AggregationConfig(harm_vote=1.0)))
    assert ("c0", "c1") in strict


def test_all_flagged():
    flags = {"c0": ["hate"], "c1": ["hate"], "c2": ["pii"]}
    responses = [resp("u1", {"c0": 1, "c1": 2, "c2": 3}, flags)]
    assert aggregate_record(record(), responses, AggregationConfig()) == []
    pairs = aggregate_record(record(), responses, AggregationConfig(pairs_between_flagged=True))
    assert len(pairs) == 3 and all(p.rejected_harmful for p in pairs)


def test_best_vs_rest_min_annotators_discarded_and_corrections():
    responses = [resp("u1", {"c0": 3, "c1": 1, "c2": 2}, correction="a much better answer"),
                 resp("u2", {}, status="discarded")]
    pairs = keyed(aggregate_record(record(), responses, AggregationConfig(pairs="best_vs_rest")))
    corr = [k for k in pairs if k[0].startswith("corr-")]
    assert set(pairs) - set(corr) == {("c1", "c2"), ("c1", "c0")}
    (k,) = corr
    assert k[1] == "c1" and pairs[k].chosen[0]["content"] == "a much better answer"
    assert pairs[k].annotators == ["u1"]  # the discarded response does not count
    assert aggregate_record(record(), responses, AggregationConfig(min_annotators=2)) == []
    assert len(aggregate_record(record(), responses, AggregationConfig(use_corrections=False))) == 3


def test_aggregate_many_records_with_exclusions(tmp_path):
    recs = [record(rid="r1"), record(rid="r2")]
    responses = [resp("u", {"c0": 1, "c1": 2, "c2": 3}, rid="r1"), resp("u", {"c0": 1, "c1": 2, "c2": 3}, rid="r2")]
    pairs = aggregate(recs, responses, AggregationConfig(), source="human:x", round_number=3, exclude={"r2"})
    assert {p.prompt_id for p in pairs} == {"r1"} and all(p.round == 3 and p.source == "human:x" for p in pairs)
    save_pairs(pairs, tmp_path / "pairs")
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "pairs"))
    assert ds.column_names[:5] == ["id", "prompt_id", "prompt", "chosen", "rejected"]
    assert ds[0]["chosen"] == pairs[0].chosen and ds[0]["margin"] == pytest.approx(pairs[0].margin)


def test_config_validation():
    with pytest.raises(ValueError, match="harm_vote"):
        AggregationConfig(harm_vote=0.0)
    with pytest.raises(ValueError, match="min_annotators"):
        AggregationConfig(min_annotators=0)


def simulated_round(tmp_path, hh_sample, ann, n: int = 4, round_number: int = 1, offset: int = 0):
    """A round store with pool/generate/select from `n` HH rows from `offset` (reference answers as completions),
    pushed and pulled with annotation config `ann` (backend simulated). Returns the round."""
    from curation.config import RoundConfig
    from curation.steps.pull import run_pull
    from curation.steps.push import run_push
    from preference.plumbing.io import read_jsonl, write_rows
    from preference.plumbing.store import Project
    from preference.schema import split_hh_transcript
    from preference.simulated import reference_completions

    rnd = Project(tmp_path / "proj").round(round_number, create=True)
    prompts, comps = [], []
    for i, row in enumerate(read_jsonl(hh_sample)[offset : offset + n], start=offset):
        messages, chosen = split_hh_transcript(row["chosen"])
        _, rejected = split_hh_transcript(row["rejected"])
        p = Prompt(id=f"p{i}", messages=messages, slice="harmless",
                   metadata={"reference_chosen": chosen, "reference_rejected": rejected})
        prompts.append(p)
        comps += [c.to_row() for c in reference_completions(p)]
    with rnd.start_step("pool", {"t": 1}) as run:
        write_rows(run.path / "prompts.parquet", [p.to_row() for p in prompts])
    with rnd.start_step("generate", {"t": 1}) as run:
        write_rows(run.path / "completions.parquet", comps)
    with rnd.start_step("select", {"t": 1}) as run:
        write_rows(run.path / "selected.parquet", [
            {"prompt_id": p.id, "slice": p.slice, "arm": "strategy", "strategy": "random", "score": 0.5,
             "rank": i + 1, "reason": "t"} for i, p in enumerate(prompts)])
    cfg = RoundConfig(project=tmp_path / "proj", annotation=ann)
    run_push(cfg, rnd, progress=False)
    run_pull(cfg, rnd, progress=False)
    return rnd


def test_simulated_backend_push_pull_round_trip(tmp_path, hh_sample):
    """backend: simulated — push stores the records, pull asks the simulated annotator and builds pairs."""
    from curation.config import RoundConfig
    from curation.steps.pull import run_pull
    from curation.steps.push import AnnotationConfig, load_records, run_push
    from preference.plumbing.io import read_json, read_jsonl, read_rows, write_rows
    from preference.plumbing.store import Project
    from preference.schema import split_hh_transcript
    from preference.simulated import SimulatedConfig, reference_completions

    rnd = Project(tmp_path / "proj").round(1, create=True)
    prompts, comps = [], []
    for i, row in enumerate(read_jsonl(hh_sample)[:4]):
        messages, chosen = split_hh_transcript(row["chosen"])
        _, rejected = split_hh_transcript(row["rejected"])
        p = Prompt(id=f"p{i}", messages=messages, slice="harmless",
                   metadata={"reference_chosen": chosen, "reference_rejected": rejected})
        prompts.append(p)
        comps += [c.to_row() for c in reference_completions(p)]
    with rnd.start_step("pool", {"t": 1}) as run:
        write_rows(run.path / "prompts.parquet", [p.to_row() for p in prompts])
    with rnd.start_step("generate", {"t": 1}) as run:
        write_rows(run.path / "completions.parquet", comps)
    with rnd.start_step("select", {"t": 1}) as run:
        write_rows(run.path / "selected.parquet", [
            {"prompt_id": p.id, "slice": p.slice, "arm": "strategy", "strategy": "random", "score": 0.5,
             "rank": i + 1, "reason": "t"} for i, p in enumerate(prompts)])
    ann = AnnotationConfig(backend="simulated", simulated=SimulatedConfig(source=hh_sample, annotators=2, noise=0.0))
    cfg = RoundConfig(project=tmp_path / "proj", annotation=ann)
    assert run_push(cfg, rnd, progress=False)["counts"]["records"] == 4
    assert len(load_records(rnd)) == 4
    manifest = run_pull(cfg, rnd, progress=False)
    out = rnd.step("pull").path
    assert len(read_jsonl(out / "responses.jsonl")) == 8 and list((out / "raw").glob("simulated-*.jsonl"))
    assert read_json(out / "agreement.json")["ranking"]["kendall_tau_mean"] == pytest.approx(1.0)
    pairs = [PreferencePair.from_row(r) for r in read_rows(out / "pairs.parquet")]
    # noise 0: every pair follows the human label (reference chosen over reference rejected), unless harm rules
    # flagged the chosen one
    assert manifest["counts"]["pairs"] == len(pairs) >= 1
    for p in pairs:
        assert p.chosen_id.startswith("c-") and p.source.startswith("simulated:")
        if not p.rejected_harmful:
            chosen_model = next(c["model"] for c in comps if c["id"] == p.chosen_id)
            assert chosen_model == "reference:chosen"
    assert isinstance(read_rows(out / "review.parquet"), list)
    assert run_pull(cfg, rnd, progress=False)["key"] == manifest["key"]  # finished: skipped
