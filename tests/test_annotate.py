"""The push/pull steps offline (backend simulated): step identity from the config itself, gold items, the
selection's completion choice, the second-stage review merged back, reviewer reliability, duplicate answers."""

from __future__ import annotations

import dataclasses

import pytest
from test_aggregate import simulated_round

from curation.steps.pull import dedupe
from curation.steps.push import AnnotationConfig, GoldConfig, load_records, pull_key, push_key
from preference.aggregate import AggregationConfig
from preference.agreement import ReviewConfig
from preference.argilla import ArgillaConfig
from preference.plumbing.config import replace_path
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, read_jsonl, read_rows, write_rows
from preference.schema import PreferencePair, Response
from preference.simulated import SimulatedConfig


def test_push_identity_is_the_config_minus_operational_and_pull_only_settings():
    base = AnnotationConfig(backend="argilla")
    key = push_key(base)
    changed = {  # each changes what ends up on the server → the push is stale
        "completions_per_record": 5, "models": ["m"], "shuffle": False,
        "argilla.guidelines": "new", "argilla.harm_labels": ["x"], "argilla.min_submitted": 3,
        "argilla.rating_scale": 5, "argilla.correction": False, "argilla.workspace": "other",
        "argilla.dataset": "d-{round}", "argilla.extra_questions": ["notes"], "gold": {"share": 0.2},
    }
    for path, value in changed.items():
        assert push_key(replace_path(base, path, value)) != key, path
    unchanged = {  # how to reach the server, and what only the pull reads → no re-push
        "argilla.url": "http://elsewhere:6900", "argilla.url_env": "X_URL", "argilla.api_key_env": "X_KEY",
        "argilla.timeout_s": 5.0, "argilla.retries": 9, "argilla.backoff_s": 0.1, "argilla.batch_size": 7,
        "argilla.poll_timeout_s": 60.0, "argilla.poll_interval_s": 1.0, "simulate_reviewers": True,
        "simulated.noise": 0.3, "aggregation.method": "dawid_skene", "review.min_tau": 0.5,
    }
    for path, value in unchanged.items():
        assert push_key(replace_path(base, path, value)) == key, path
    # the pull: operational settings never count; everything else does
    assert pull_key(replace_path(base, "argilla.poll_timeout_s", 30.0)) == pull_key(base)
    assert pull_key(replace_path(base, "aggregation.method", "bradley_terry")) != pull_key(base)
    assert pull_key(replace_path(base, "argilla.min_responses", 3)) != pull_key(base)


def test_push_identity_follows_the_question_table(monkeypatch):
    from preference import questions

    before = push_key(AnnotationConfig(backend="argilla"))
    monkeypatch.setattr(questions.Harm, "specs", lambda self, layout: [
        questions.question(f"harm_{i}", "multi_label_selection", f"Harm {i}", options=[{"value": "none"}])
        for i in range(1, layout.slots + 1)])
    assert push_key(AnnotationConfig(backend="argilla")) != before  # a code change to the settings re-pushes


def test_gold_items_are_mixed_in_measured_and_never_paired(tmp_path, hh_sample, repo_root):
    gold = GoldConfig(source=repo_root / "data" / "hh-harmless-dev.jsonl.gz", share=0.4)
    ann = AnnotationConfig(backend="simulated", gold=gold,
                           simulated=SimulatedConfig(source=gold.source, annotators=3,
                                                     profiles=["careful", "careful", "adversarial"]),
                           aggregation=AggregationConfig(min_gold=2))
    rnd = simulated_round(tmp_path, hh_sample, ann, n=6)
    records = load_records(rnd)
    golden = [r for r in records if "gold" in r.metadata]
    assert len(golden) == 4 and len(records) == 10  # 0.4 of the queue
    assert all(r.record_id.startswith("p") and len(r.completions) == 2 for r in golden)  # the pool's id scheme
    assert [r.record_id for r in records if "gold" not in r.metadata] == [f"p{i}" for i in range(6)]
    assert records.index(golden[0]) != 6 or records.index(golden[-1]) != 9  # interleaved, not appended
    out = rnd.step("pull").path
    pairs = [PreferencePair.from_row(r) for r in read_rows(out / "pairs.parquet")]
    assert pairs and not {p.prompt_id for p in pairs} & {r.record_id for r in golden}
    quality = read_json(out / "annotators.json")
    assert quality["sim-0"]["gold_items"] == 4 and quality["sim-0"]["gold_accuracy"] >= 0.75
    assert quality["sim-2"]["gold_accuracy"] <= 0.25 and quality["sim-2"]["unreliable"]
    assert quality["sim-2"]["reliability_basis"] == "gold"
    manifest = rnd.step("pull").manifest()
    assert manifest["counts"]["gold_records"] == 4 and manifest["counts"]["unreliable_annotators"] == 1
    # the same selection, another run: identical records (seeded)
    again = simulated_round(tmp_path / "again", hh_sample, ann, n=6)
    assert [r.record_id for r in load_records(again)] == [r.record_id for r in records]


def test_gold_source_too_small_is_one_clear_line(tmp_path, hh_sample):
    tiny = tmp_path / "gold.jsonl"
    tiny.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "b", "chosen": "x", "rejected": "z"}\n')
    ann = AnnotationConfig(backend="simulated", gold=GoldConfig(source=tiny, share=0.5),
                           simulated=SimulatedConfig(source=hh_sample))
    with pytest.raises(CurateError, match=r"annotation.gold: .*gold.jsonl has 2 labelled pairs.*needs 4.*lower "
                                          r"annotation.gold.share") as exc:
        simulated_round(tmp_path, hh_sample, ann, n=4)
    assert "\n" not in str(exc.value)


def test_gold_source_missing_names_the_gold_setting(tmp_path, hh_sample):
    ann = AnnotationConfig(backend="simulated", gold=GoldConfig(source=tmp_path / "no-such-gold.jsonl", share=0.5),
                           simulated=SimulatedConfig(source=hh_sample))
    with pytest.raises(CurateError, match=r"^annotation.gold.source: .*no-such-gold.jsonl not found; set "
                                          r"annotation.gold.source to") as exc:
        simulated_round(tmp_path, hh_sample, ann, n=4)
    assert "\n" not in str(exc.value) and "simulated" not in str(exc.value)


def test_selection_completion_ids_decide_what_is_shown(tmp_path, hh_sample):
    from curation.config import RoundConfig
    from curation.steps.push import build_records

    ann = AnnotationConfig(backend="simulated", simulated=SimulatedConfig(source=hh_sample))
    rnd = simulated_round(tmp_path, hh_sample, ann, n=3)
    comps = read_rows(rnd.step("generate").file("completions.parquet"))
    by_prompt = {}
    for c in comps:
        by_prompt.setdefault(c["prompt_id"], []).append(c["id"])
    rows = read_rows(rnd.step("select").file("selected.parquet"))
    for row in rows:
        row["completion_ids"] = list(reversed(by_prompt[row["prompt_id"]]))
    write_rows(rnd.step("select").path / "selected.parquet", rows)
    records, _, _, _ = build_records(RoundConfig(project=tmp_path / "proj", annotation=ann), rnd)
    assert [[c.id for c in r.completions] for r in records] == [row["completion_ids"] for row in rows]
    rows[0]["completion_ids"] = ["c-nope", by_prompt[rows[0]["prompt_id"]][0]]
    write_rows(rnd.step("select").path / "selected.parquet", rows)
    with pytest.raises(CurateError, match="c-nope is not in generate/completions.parquet.*curate select --force"):
        build_records(RoundConfig(project=tmp_path / "proj", annotation=ann), rnd)


def test_review_answers_override_the_first_stage(tmp_path, hh_sample):
    """Harm-flagged and low-agreement records go to a second stage; with review.wait its answers are merged."""
    sim = SimulatedConfig(source=hh_sample, annotators=3, profiles=["careful", "noisy", "adversarial"],
                          harm_rules={"violence": ["kill", "hurt", "weapon"]})
    base = AnnotationConfig(backend="simulated", simulated=sim, review=ReviewConfig(min_tau=0.5))
    plain = simulated_round(tmp_path / "a", hh_sample, base, n=30)
    reviewed = simulated_round(tmp_path / "b", hh_sample, dataclasses.replace(
        base, review=ReviewConfig(min_tau=0.5, wait=True)), n=30)
    routed = read_rows(reviewed.step("pull").file("review.parquet"))
    decisions = {r["record_id"]: r["decision"] for r in routed}
    assert routed and all(decisions.values()) and all(r["reviewers"] == ["sim-review-0"] for r in routed)
    assert set(decisions.values()) <= {"keep", "fix", "drop"} and "fix" in decisions.values()
    before = {p["prompt_id"] for p in read_rows(plain.step("pull").file("pairs.parquet"))}
    pairs = [PreferencePair.from_row(r) for r in read_rows(reviewed.step("pull").file("pairs.parquet"))]
    after = {p.prompt_id for p in pairs}
    low = {r["record_id"] for r in routed if "low_agreement" in r["reasons"]}
    kept = {rid for rid, d in decisions.items() if d in ("keep", "fix")}
    assert low & kept and not low & kept & before  # unreviewed low-agreement items stay out …
    assert low & kept <= after  # … reviewed ones come back
    assert not {rid for rid, d in decisions.items() if d == "drop"} & after
    assert {p.stage for p in pairs if p.prompt_id in decisions} == {"review"}
    assert {p.stage for p in pairs if p.prompt_id not in decisions} == {"first"}
    fixed = next(rid for rid, d in decisions.items() if d == "fix")
    assert all("sim-review-0" in p.annotators for p in pairs if p.prompt_id == fixed)
    review = [Response.from_row(r) for r in read_jsonl(reviewed.step("pull").file("review_responses.jsonl"))]
    assert {r.stage for r in review} == {"review"} and {r.annotator for r in review} == {"sim-review-0"}
    counts = reviewed.step("pull").manifest()["counts"]
    assert counts["reviewed"] == len(decisions) and counts["pairs_from_review"] == sum(
        p.stage == "review" for p in pairs)


def test_an_annotator_answering_twice_counts_once():
    early = Response(record_id="p1", annotator="ann", status="submitted", ranks={"a": 1, "b": 2},
                     source="argilla:d", updated_at="2026-01-01T10:00:00")
    late = dataclasses.replace(early, ranks={"a": 2, "b": 1}, source="argilla:d-v2", updated_at="2026-01-02T10:00:00")
    other = dataclasses.replace(early, annotator="bob")
    review = dataclasses.replace(early, stage="review")
    kept, warnings = dedupe([early, other, late, review])
    assert kept == [other, late, review]
    (line,) = warnings
    assert "annotator ann answered record p1 2 times" in line and "argilla:d, argilla:d-v2" in line
    assert "kept the latest (2026-01-02T10:00:00)" in line and "\n" not in line


def test_argilla_config_rejects_bad_values():
    with pytest.raises(ValueError, match="harm_labels"):
        ArgillaConfig(harm_labels=["none"])
    with pytest.raises(ValueError, match="gold.share"):
        GoldConfig(share=1.0)


def test_curate_pull_prints_the_reviewer_report(tmp_path, hh_sample):
    import yaml
    from typer.testing import CliRunner

    from curation.cli import app

    sim = {"source": str(hh_sample), "annotators": 3, "profiles": ["careful", "noisy", "adversarial"]}
    ann = AnnotationConfig(backend="simulated", simulated=SimulatedConfig(**sim))
    simulated_round(tmp_path, hh_sample, ann, n=8)
    config = tmp_path / "round.yaml"
    config.write_text(yaml.safe_dump({"project": str(tmp_path / "proj"),
                                      "annotation": {"backend": "simulated", "simulated": sim}}))
    out = CliRunner().invoke(app, ["pull", "-c", str(config), "-q"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "round 1 pull: done" in text and "Reviewers:" in text
    assert "Kendall τ between annotators' rankings: mean" in text and "Krippendorff α on harm flags" in text
    header = next(line for line in text.splitlines() if line.strip().startswith("annotator"))
    assert "gold_accuracy" in header and "agreement_with_consensus" in header and "seconds_per_record" in header
    assert any(line.strip().startswith("sim-2") for line in text.splitlines())


def test_annotator_drift_over_rounds(tmp_path, hh_sample):
    """Round 2's annotator table carries each annotator's history and the change against earlier rounds."""
    sim = SimulatedConfig(source=hh_sample, annotators=3, profiles=["careful", "careful", "careful"])
    ann = AnnotationConfig(backend="simulated", simulated=sim)
    first = simulated_round(tmp_path, hh_sample, ann, n=10)
    second = simulated_round(tmp_path, hh_sample, dataclasses.replace(  # sim-1 turns adversarial in round 2
        ann, simulated=dataclasses.replace(sim, profiles=["careful", "adversarial", "careful"])),
        n=10, round_number=2, offset=10)
    before = read_json(first.step("pull").file("annotators.json"))
    after = read_json(second.step("pull").file("annotators.json"))
    assert before["sim-1"]["history"] == [] and before["sim-1"]["drift"]["agreement_with_consensus"] is None
    (past,) = after["sim-1"]["history"]
    assert past["round"] == 1 and past["agreement_with_consensus"] == before["sim-1"]["agreement_with_consensus"]
    drift = after["sim-1"]["drift"]["agreement_with_consensus"]
    assert drift == pytest.approx(after["sim-1"]["agreement_with_consensus"] - past["agreement_with_consensus"])
    assert drift < -0.5  # its agreement with the consensus fell
    assert abs(after["sim-0"]["drift"]["agreement_with_consensus"]) < 0.2


@pytest.mark.parametrize("exclude", [False, True])
def test_unreliable_annotators_are_flagged_and_excluded_from_pairs_on_request(tmp_path, hh_sample, exclude):
    sim = SimulatedConfig(source=hh_sample, annotators=3, profiles=["careful", "careful", "adversarial"])
    ann = AnnotationConfig(backend="simulated", simulated=sim,
                           aggregation=AggregationConfig(method="dawid_skene", exclude_unreliable=exclude))
    rnd = simulated_round(tmp_path, hh_sample, ann, n=30)
    quality = read_json(rnd.step("pull").file("annotators.json"))
    flagged = {name for name, q in quality.items() if q["unreliable"]}
    assert flagged == {"sim-2"}  # the adversarial one
    pairs = [PreferencePair.from_row(r) for r in read_rows(rnd.step("pull").file("pairs.parquet"))]
    assert pairs
    in_pairs = set().union(*(p.annotators for p in pairs))
    assert ("sim-2" in in_pairs) is (not exclude) and {"sim-0", "sim-1"} <= in_pairs
    assert rnd.step("pull").manifest()["counts"]["excluded_unreliable"] == int(exclude)


def test_gold_items_are_spread_through_the_queue():
    """Each gold item goes to its own stretch of the queue (n stretches for n items), the rest keep their order."""
    import numpy as np

    from curation.steps.push import spread

    for seed in range(20):
        queue = spread(list(range(18)), ["g1", "g2", "g3"], np.random.default_rng(seed))
        at = [i for i, x in enumerate(queue) if isinstance(x, str)]
        assert [queue[i] for i in at] == ["g1", "g2", "g3"]
        assert [i // 7 for i in at] == [0, 1, 2]  # 21 positions, 3 stretches of 7
        assert [x for x in queue if not isinstance(x, str)] == list(range(18))
    assert spread([1, 2], [], np.random.default_rng(0)) == [1, 2]
