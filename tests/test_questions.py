"""The question table: every question type round-trips through Argilla's response values, and a new type added
in one place reaches push (settings), pull (responses), simulated reviewers, agreement and consensus."""

from __future__ import annotations

import numpy as np
import pytest

from preference import questions as q
from preference.argilla import ArgillaConfig, annotation_spec, review_spec
from preference.schema import Response

LAYOUT = q.Layout(slots=3, harm_labels=("violence", "hate"), rating_scale=5)
SLOTS = ["c-a", "c-b"]  # a record with 2 completions in a 3-slot dataset


def answered() -> Response:
    return Response(record_id="p1", annotator="u", status="submitted", ranks={"c-a": 2, "c-b": 1},
                    harm={"c-a": ["violence"], "c-b": []}, rating=4, correction="better",
                    extra={"decision": "fix", "notes": "swapped"})


@pytest.mark.parametrize("name", sorted(q.QUESTIONS))
def test_every_question_type_round_trips_through_argilla_values(name):
    question = q.QUESTIONS[name]()
    specs = question.specs(LAYOUT)
    assert specs and all(s["settings"]["type"] in ("ranking", "multi_label_selection", "label_selection", "rating",
                                                     "text", "span") for s in specs)
    values = q.write_response([question], answered(), SLOTS, LAYOUT)
    assert set(values) <= {s["name"] for s in specs}  # answers only the questions it declares
    back = q.read_response([question], values, SLOTS, Response(record_id="p1", annotator="u", status="submitted"))
    assert question.value(back) == question.value(answered())


def test_ranking_keeps_ties_and_ranks_empty_slots_last():
    resp = Response(record_id="p", annotator="u", status="submitted", ranks={"c-a": 1, "c-b": 1})
    values = q.write_response([q.Ranking()], resp, SLOTS, LAYOUT)
    assert values["ranking"]["value"] == [{"value": "completion_1", "rank": 1}, {"value": "completion_2", "rank": 1},
                                          {"value": "completion_3", "rank": 2}]
    back = q.read_response([q.Ranking()], values, SLOTS, Response(record_id="p", annotator="u", status="submitted"))
    assert back.ranks == {"c-a": 1, "c-b": 1}  # the tie survives; the empty slot is dropped


def test_ranking_suggestion_is_softmax_of_rewards_best_first():
    value, score = q.Ranking().suggest(["x", "y", "z"], {"x": 0.5, "y": 2.0, "z": -1.0})["ranking"]
    assert value == ["completion_2", "completion_1", "completion_3"]
    assert sum(score) == pytest.approx(1.0) and score[0] > score[1] > score[2]
    assert score[0] / score[1] == pytest.approx(np.exp(1.5))
    assert q.Ranking().suggest(["x", "y"], {"x": 1.0}) == {}  # every shown completion needs a reward


class Helpfulness(q.Question):
    """A Likert question defined outside preference/questions.py: the whole extension."""

    kind = "helpfulness"
    level = "interval"

    def specs(self, layout):
        options = [{"value": v} for v in range(1, 6)]
        return [q.question("helpfulness", "rating", "How helpful is the best answer?", options=options)]

    def read(self, values, slots, into):
        value = (values.get("helpfulness") or {}).get("value")
        if value is not None:
            into.extra["helpfulness"] = int(value)

    def simulate(self, ctx, into):
        into.extra["helpfulness"] = int(np.clip(round(3 + 2 * np.tanh(float(ctx.scores.max()))), 1, 5))


def test_a_new_question_type_reaches_push_pull_simulation_and_agreement(monkeypatch, tmp_path, hh_sample):
    monkeypatch.setitem(q.QUESTIONS, "helpfulness", Helpfulness)
    cfg = ArgillaConfig(extra_questions=["helpfulness"])
    spec = annotation_spec(cfg, 3)
    assert spec["questions"][-1]["name"] == "helpfulness" and spec["questions"][-1]["settings"]["type"] == "rating"
    assert "helpfulness" not in {x["name"] for x in review_spec(cfg, 3)["questions"]}

    from test_aggregate import simulated_round

    from curation.steps.push import AnnotationConfig, push_key
    from preference.plumbing.io import read_json, read_jsonl
    from preference.simulated import SimulatedConfig

    plain = AnnotationConfig(backend="argilla")
    extended = AnnotationConfig(backend="argilla", argilla=cfg)
    assert push_key(plain) != push_key(extended)  # a new question is a new dataset layout: re-push

    ann = AnnotationConfig(backend="simulated", argilla=cfg,
                           simulated=SimulatedConfig(source=hh_sample, annotators=2, noise=0.0))
    rnd = simulated_round(tmp_path, hh_sample, ann)
    out = rnd.step("pull").path
    answers = [r for r in read_jsonl(out / "responses.jsonl")]
    assert answers and all(1 <= Response.from_row(r).extra["helpfulness"] <= 5 for r in answers)
    agreement = read_json(out / "agreement.json")
    assert agreement["questions"]["helpfulness"]["level"] == "interval"
    assert agreement["questions"]["helpfulness"]["alpha"] is None or -1 <= agreement["questions"]["helpfulness"]["alpha"] <= 1
    assert Helpfulness().consensus([2, 4, None]) == pytest.approx(3.0)
    consensus = [r for r in read_jsonl(out / "answers.jsonl") if r["question"] == "helpfulness"]
    assert len(consensus) == 4 and all(r["answers"] == 2 and 1 <= r["consensus"] <= 5 for r in consensus)


def test_unknown_extra_question_is_one_clear_line():
    from preference.plumbing.errors import CurateError

    with pytest.raises(CurateError, match="unknown question type 'likert'.*preference/questions.py"):
        ArgillaConfig(extra_questions=["likert"]).questions()
