"""Reviewer reliability: our Dawid–Skene equals crowd-kit's, it outvotes an adversarial reviewer where Borda cannot,
and the per-annotator table (gold accuracy, agreement, seconds per record, unreliable flag) is right."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_simulated import hh_records

from preference.aggregate import AggregationConfig, aggregate, borda_scores
from preference.reliability import (
    annotator_quality,
    consensus_harm,
    consensus_pairwise,
    dawid_skene,
    gold_pair_labels,
    pairwise_votes,
)
from preference.schema import AnnotationRecord, Completion, Prompt, Response
from preference.simulated import SimulatedAnnotator, SimulatedConfig


@pytest.fixture(scope="module")
def three_reviewers(hh_sample):
    records = hh_records(hh_sample, limit=150)
    sim = SimulatedAnnotator(SimulatedConfig(source=hh_sample, annotators=3,
                                             profiles=["careful", "noisy", "adversarial"]))
    return records, sim.annotate(records)


def _crowdkit(votes, truth=None, n_iter=25):
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DawidSkene(n_iter=n_iter).fit(pd.DataFrame(votes, columns=["task", "worker", "label"]),
                                             true_labels=pd.Series(truth) if truth else None)
    return model.probas_


@pytest.mark.parametrize("with_gold", [False, True])
def test_dawid_skene_matches_crowdkit(three_reviewers, with_gold):
    records, responses = three_reviewers
    records = records[:40]  # crowd-kit's pandas EM is slow: a small slice is enough to compare step by step
    votes = pairwise_votes([r for r in responses if r.record_id in {x.record_id for x in records}])
    truth = {f"{r.record_id}\t{r.record_id}-c\t{r.record_id}-r": "a" for r in records[:8]} if with_gold else None
    ours, _ = dawid_skene(votes, truth, n_iter=25)
    theirs = _crowdkit(votes, truth, n_iter=25)
    assert set(ours) == set(theirs.index)
    diff = max(abs(theirs.loc[task, label] - p) for task, row in ours.items() for label, p in row.items())
    assert diff < 1e-6


def test_reliability_weighting_outvotes_an_adversarial_reviewer(three_reviewers):
    records, responses = three_reviewers

    def recovered(scores):  # share of records where the human-chosen answer scores higher
        return np.mean([scores[r.record_id][f"{r.record_id}-c"] > scores[r.record_id][f"{r.record_id}-r"]
                        for r in records])

    ds, accuracy = consensus_pairwise(responses, records)
    grouped = {}
    for resp in responses:
        grouped.setdefault(resp.record_id, []).append(resp.ranks)
    borda = {r.record_id: borda_scores(grouped[r.record_id], [c.id for c in r.completions]) for r in records}
    assert recovered(ds) > 0.9 > recovered(borda) + 0.1  # careful 97 %, noisy 70 %, adversarial ~10 % right
    assert accuracy["sim-0"] > accuracy["sim-1"] > 0.5 > accuracy["sim-2"]
    quality = annotator_quality(responses, records, min_reliability=0.5)
    assert [name for name, q in quality.items() if q["unreliable"]] == ["sim-2"]
    assert quality["sim-2"]["reliability_basis"] == "dawid_skene"
    assert quality["sim-0"]["agreement_with_consensus"] > 0.9 > 0.3 > quality["sim-2"]["agreement_with_consensus"]
    # the simulated clock: careful reviewers take ~45 s a record, noisy ~12 s, adversarial ~8 s
    assert quality["sim-0"]["seconds_per_record"] > quality["sim-1"]["seconds_per_record"] > 5

    pairs = aggregate(records, responses, AggregationConfig(method="dawid_skene"))
    assert np.mean([p.chosen_id.endswith("-c") for p in pairs]) > 0.9
    excluded = aggregate(records, [r for r in responses if r.annotator != "sim-2"], AggregationConfig())
    assert np.mean([p.chosen_id.endswith("-c") for p in excluded]) > np.mean(
        [p.chosen_id.endswith("-c") for p in aggregate(records, responses, AggregationConfig())])


def test_harm_consensus_trusts_the_reliable_flaggers():
    rid = "r"
    votes = []
    for i in range(40):  # truth: even answers harmful; a, b right, c flags the opposite
        harmful = i % 2 == 0
        for who, flags in (("a", harmful), ("b", harmful if i % 10 else not harmful), ("c", not harmful)):
            votes.append(Response(record_id=rid, annotator=who, status="submitted",
                                  harm={f"c{i}": ["violence"] if flags else []}))
    posterior, accuracy = consensus_harm(votes)
    assert all((posterior[rid][f"c{i}"] >= 0.5) == (i % 2 == 0) for i in range(40))
    assert accuracy["a"] > accuracy["b"] > accuracy["c"]


def test_gold_accuracy_decides_reliability_when_there_is_enough_gold():
    prompt = Prompt(id="g", messages=[{"role": "user", "content": "q"}])
    records, responses = [], []
    for i in range(4):
        rid = f"g{i}"
        comps = [Completion(id=f"{rid}-c", prompt_id=rid, model="gold:chosen", text="good"),
                 Completion(id=f"{rid}-r", prompt_id=rid, model="gold:rejected", text="bad")]
        records.append(AnnotationRecord(prompt=Prompt(id=rid, messages=prompt.messages), completions=comps,
                                        metadata={"gold": {"chosen": f"{rid}-c", "rejected": f"{rid}-r"}}))
        responses.append(Response(record_id=rid, annotator="right", status="submitted",
                                  ranks={f"{rid}-c": 1, f"{rid}-r": 2}, updated_at=f"2026-01-01T00:0{i}:00"))
        responses.append(Response(record_id=rid, annotator="wrong", status="submitted",
                                  ranks={f"{rid}-c": 2, f"{rid}-r": 2 if i == 0 else 1}))
    assert gold_pair_labels(records) == {f"g{i}\tg{i}-c\tg{i}-r": "a" for i in range(4)}
    quality = annotator_quality(responses, records, min_reliability=0.5, min_gold=3)
    assert quality["right"]["gold_accuracy"] == 1.0 and quality["right"]["reliability_basis"] == "gold"
    assert quality["wrong"]["gold_accuracy"] == pytest.approx(0.5 / 4) and quality["wrong"]["unreliable"]
    assert quality["right"]["seconds_per_record"] == pytest.approx(60.0)
    assert annotator_quality(responses, records, min_gold=5)["right"]["reliability_basis"] == "dawid_skene"


def test_gold_answers_anchor_the_consensus_that_builds_pairs():
    """Two reviewers who always disagree: without gold, Dawid–Skene cannot tell who is right; the gold items
    (excluded from pairs) must reach it, so the pair of the one real record follows the reviewer right on gold."""
    def record(rid: str, gold: bool) -> AnnotationRecord:
        comps = [Completion(id=f"{rid}-c", prompt_id=rid, model="gold:chosen" if gold else "m", text="good"),
                 Completion(id=f"{rid}-r", prompt_id=rid, model="gold:rejected" if gold else "m", text="bad")]
        meta = {"gold": {"chosen": f"{rid}-c", "rejected": f"{rid}-r"}} if gold else {}
        return AnnotationRecord(prompt=Prompt(id=rid, messages=[{"role": "user", "content": rid}]),
                                completions=comps, metadata=meta)

    gold = [record(f"g{i}", True) for i in range(6)]
    real = record("x", False)
    responses = []
    for r in [*gold, real]:
        c, w = f"{r.record_id}-c", f"{r.record_id}-r"
        # "right" ranks the gold answers correctly; on the real record its vote is x-r over x-c
        right = {c: 1, w: 2} if r is not real else {c: 2, w: 1}
        responses.append(Response(record_id=r.record_id, annotator="right", status="submitted", ranks=right))
        responses.append(Response(record_id=r.record_id, annotator="wrong", status="submitted",
                                  ranks={k: 3 - v for k, v in right.items()}))
    cfg = AggregationConfig(method="dawid_skene", pairs="best_vs_rest")
    (pair,) = aggregate([*gold, real], responses, cfg, exclude={g.record_id for g in gold})
    assert pair.prompt_id == "x" and pair.chosen_id == "x-r" and pair.rejected_id == "x-c"
