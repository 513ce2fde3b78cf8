"""The simulated annotator answers records from a labelled preference set, with measurable noise."""

import json
from pathlib import Path

import numpy as np
import pytest

from preference.plumbing.config import ConfigError, from_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl
from preference.schema import AnnotationRecord, Completion, Prompt, Response, split_hh_transcript
from preference.simulated import SimulatedAnnotator, SimulatedConfig, reference_completions


def hh_records(path: Path, limit: int | None = None, with_metadata: bool = True) -> list[AnnotationRecord]:
    """Records whose candidates are the two reference answers, rejected listed first."""
    records = []
    for i, row in enumerate(read_jsonl(path)[:limit]):
        try:
            messages, chosen = split_hh_transcript(row["chosen"])
            _, rejected = split_hh_transcript(row["rejected"])
        except ValueError:
            continue
        if chosen.strip() == rejected.strip():
            continue
        meta = {"reference_chosen": chosen, "reference_rejected": rejected} if with_metadata else {}
        prompt = Prompt(id=f"p{i}", messages=messages, metadata=meta)
        completions = [
            Completion(id=f"p{i}-r", prompt_id=prompt.id, model="smollm2", text=rejected),
            Completion(id=f"p{i}-c", prompt_id=prompt.id, model="smollm2", text=chosen),
        ]
        records.append(AnnotationRecord(prompt=prompt, completions=completions))
    return records


def test_reference_chosen_ranks_above_rejected(hh_sample):
    annotator = SimulatedAnnotator(SimulatedConfig(source=hh_sample, annotators=2, noise=0.0))
    records = hh_records(hh_sample, limit=60)
    responses = annotator.annotate(records)
    assert len(responses) == 2 * len(records)
    assert [r.record_id for r in responses[:4]] == [records[0].record_id] * 2 + [records[1].record_id] * 2
    for r in responses:
        assert r.status == "submitted" and r.source == f"simulated:{hh_sample.name}"
        assert r.ranks[f"{r.record_id}-c"] == 1 and r.ranks[f"{r.record_id}-r"] == 2
    # the same without metadata: the answers are found in the source file by conversation
    bare = annotator.annotate(hh_records(hh_sample, limit=20, with_metadata=False))
    assert all(r.ranks[f"{r.record_id}-c"] == 1 for r in bare)
    # and by model name ("reference:chosen" / "reference:rejected"), whatever the text
    prompt = Prompt(id="x", messages=[{"role": "user", "content": "hi"}],
                    metadata={"reference_chosen": "Hello! How can I help?", "reference_rejected": "Go away."})
    refs = reference_completions(prompt)
    assert [c.model for c in refs] == ["reference:chosen", "reference:rejected"]
    (resp,) = SimulatedAnnotator(SimulatedConfig(source=hh_sample, annotators=1, noise=0.0)).annotate(
        [AnnotationRecord(prompt=prompt, completions=refs[::-1])]
    )
    assert resp.ranks == {refs[0].id: 1, refs[1].id: 2}
    assert Response.from_row(resp.to_row()) == resp


def test_deterministic_by_seed_and_independent_of_order(hh_sample):
    records = hh_records(hh_sample, limit=80)
    cfg = SimulatedConfig(source=hh_sample, annotators=3, noise=0.3, seed=7)
    one = SimulatedAnnotator(cfg).annotate(records)
    assert one == SimulatedAnnotator(cfg).annotate(records)
    reversed_ = SimulatedAnnotator(cfg).annotate(records[::-1])
    key = {(r.record_id, r.annotator): r.ranks for r in one}
    assert all(key[(r.record_id, r.annotator)] == r.ranks for r in reversed_)
    other = SimulatedAnnotator(SimulatedConfig(source=hh_sample, annotators=3, noise=0.3, seed=8)).annotate(records)
    assert [r.ranks for r in other] != [r.ranks for r in one]


def test_noisy_annotators_disagree_at_the_configured_rate(hh_sample):
    noise = 0.2
    records = hh_records(hh_sample)
    responses = SimulatedAnnotator(SimulatedConfig(source=hh_sample, annotators=2, noise=noise)).annotate(records)
    first = {r.record_id: r.ranks for r in responses if r.annotator == "sim-0"}
    second = {r.record_id: r.ranks for r in responses if r.annotator == "sim-1"}
    wrong = np.mean([ranks[f"{rid}-c"] == 2 for rid, ranks in first.items()])
    disagree = np.mean([first[rid] != second[rid] for rid in first])
    n = len(first)
    assert n > 300
    assert abs(wrong - noise) < 3 * np.sqrt(noise * (1 - noise) / n)
    expected = 2 * noise * (1 - noise)
    assert abs(disagree - expected) < 3 * np.sqrt(expected * (1 - expected) / n)


def write_toy_source(path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    good = ["thank you for asking", "happy to help", "here is a safe option", "please be careful"]
    bad = ["shut up", "figure it out yourself", "that is stupid", "whatever idiot"]
    rows = [
        {"prompt": f"question {i}", "chosen": f"{rng.choice(good)} about {i}", "rejected": f"{rng.choice(bad)} {i}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generated_completions_ranked_by_the_oracle(tmp_path):
    source = write_toy_source(tmp_path / "toy.jsonl")
    annotator = SimulatedAnnotator(SimulatedConfig(source=source, annotators=1, noise=0.0))
    prompt = Prompt(id="q", messages=[{"role": "user", "content": "a new question"}],
                    metadata={"reference_chosen": "fine", "reference_rejected": "bad"})
    completions = [
        Completion(id="rude", prompt_id="q", model="gen", text="shut up, that is stupid"),
        Completion(id="kind", prompt_id="q", model="gen", text="happy to help, thank you for asking"),
        Completion(id="ref-r", prompt_id="q", model="reference:rejected", text="bad"),
        Completion(id="ref-c", prompt_id="q", model="reference:chosen", text="fine"),
    ]
    (resp,) = annotator.annotate([AnnotationRecord(prompt=prompt, completions=completions)])
    assert resp.ranks["kind"] < resp.ranks["rude"]
    assert resp.ranks["ref-c"] < resp.ranks["ref-r"]
    assert sorted(resp.ranks.values()) == [1, 2, 3, 4]


def test_harm_flags_and_config(tmp_path):
    source = write_toy_source(tmp_path / "toy.jsonl")
    annotator = SimulatedAnnotator(SimulatedConfig(source=source))
    assert annotator.harm_labels("You could stab him and steal his wallet") == ["violence", "illegal"]
    assert annotator.harm_labels("I'm sorry, I can't help you steal anything.") == []
    assert annotator.harm_labels("Bread needs flour, water and salt.") == []
    custom = SimulatedAnnotator(SimulatedConfig(source=source, annotators=1, harm_rules={"spam": [r"buy now"]}))
    prompt = Prompt(id="q", messages=[{"role": "user", "content": "hi"}])
    record = AnnotationRecord(prompt=prompt, completions=[Completion(id="c", prompt_id="q", model="g", text="Buy now!")])
    (resp,) = custom.annotate([record])
    assert resp.harm == {"c": ["spam"]} and resp.ranks == {"c": 1}
    cfg = from_dict(SimulatedConfig, {"source": str(source), "annotators": 2, "noise": 0.05})
    assert cfg.source == source and cfg.annotators == 2
    with pytest.raises(ConfigError, match="noise"):
        from_dict(SimulatedConfig, {"noise": 0.7})
    with pytest.raises(ConfigError, match="harm_rules.x"):
        from_dict(SimulatedConfig, {"harm_rules": {"x": ["("]}})
    with pytest.raises(CurateError, match="not found"):
        SimulatedAnnotator(SimulatedConfig(source=tmp_path / "missing.jsonl"))
