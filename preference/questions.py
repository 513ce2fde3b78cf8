"""The annotation questions as one table: what reviewers are asked, and how every part of the loop reads it.

Each question type is a small class on `Question`; `QUESTIONS` maps its name to the class. Everything that
touches a question reads this table:

- push: `specs(layout)` → the Argilla questions of the dataset (neutral dicts, converted to `argilla` SDK
  objects at the edge in `preference.argilla`), and `suggest(...)` → a model's suggested answer;
- pull: `read(values, slots, response)` turns an Argilla response's values into our `Response`;
- simulated reviewers: `simulate(ctx, response)` answers like a reviewer with a reliability profile would, and
  `write(response, slots, layout)` turns the answer into Argilla response values;
- aggregation and agreement: `value(response)` is the answer as a plain value, `level` says how to measure
  agreement on it (Krippendorff α, "nominal" or "interval"; None = not measured) and `consensus(values)` says
  how answers of several reviewers combine into one.

Adding a question type (e.g. a Likert scale) = one class here + one entry in `QUESTIONS` (+ its tests); a config
then asks it on every record with `annotation.argilla.extra_questions: [<name>]`. Answers of question types
without a field of their own on `Response` land in `Response.extra[<question name>]`.

Argilla question kinds a spec may use (`settings.type`): "ranking", "multi_label_selection",
"label_selection", "rating", "text", "span" (see `preference.argilla.to_argilla_question`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any, ClassVar

import numpy as np

from preference.plumbing.errors import CurateError
from preference.schema import Response

NONE_LABEL = "none"  # the harm question's "no harm" option
EMPTY_SLOT = "(no answer in this slot: rank it last)"  # Argilla requires every ranking option to be ranked


def slot(i: int) -> str:
    """Field / ranking option name of the i-th (1-based) completion slot."""
    return f"completion_{i}"


@dataclass(frozen=True)
class Layout:
    """What a dataset's questions depend on: its completion slots and the configured taxonomy and scale."""

    slots: int  # completion slots per record (k)
    harm_labels: tuple[str, ...] = ()
    rating_scale: int = 0


def _option(value: Any, text: str | None = None) -> dict:
    return {"value": value, "text": text if text is not None else str(value)}


def question(name: str, kind: str, title: str, *, required: bool = False, options: Sequence[dict] = (),
             description: str = "", **settings: Any) -> dict:
    """One question as a neutral spec (the shape of Argilla's question settings; hashable as JSON)."""
    body: dict[str, Any] = {"type": kind, **settings}
    if options:
        body["options"] = list(options)
    return {"name": name, "title": title, "description": description, "required": required, "settings": body}


@dataclass
class SimContext:
    """What a simulated reviewer knows about one record when it answers (see `preference.simulated`)."""

    completion_ids: list[str]
    scores: np.ndarray  # noise-free preference scores (higher = better)
    harm: dict[str, list[str]]  # the reviewer's harm flags per completion id (profile noise already applied)
    rng: np.random.Generator
    noise: float  # probability of reversing one pairwise comparison
    adversarial: bool = False  # answers against the truth

    def ranks(self) -> dict[str, int]:
        """1-based ranks after reversing each pairwise comparison with probability `noise` (Copeland count)."""
        scores = -self.scores if self.adversarial else self.scores
        n = len(scores)
        better = scores[:, None] > scores[None, :]
        flips = np.triu(self.rng.random((n, n)) < self.noise, k=1)
        flips = flips | flips.T
        wins = (better ^ (flips & (better | better.T))).sum(axis=1)
        order = np.lexsort((-scores, -wins))
        ranks = np.empty(n, dtype=np.int64)
        ranks[order] = np.arange(1, n + 1)
        return {cid: int(r) for cid, r in zip(self.completion_ids, ranks, strict=True)}


class Question:
    """One question type. Subclasses set `kind` and override what they need (see the module docstring)."""

    kind: ClassVar[str] = ""
    level: ClassVar[str | None] = None  # Krippendorff α level for agreement: "nominal" | "interval" | None

    def specs(self, layout: Layout) -> list[dict]:
        raise NotImplementedError

    def names(self, layout: Layout) -> list[str]:
        return [q["name"] for q in self.specs(layout)]

    def suggest(self, slots: Sequence[str], rewards: dict[str, float]) -> dict[str, tuple[Any, Any]]:
        """question name → (value, score) suggested from a reward model's scores (completion id → reward)."""
        return {}

    def read(self, values: dict[str, Any], slots: Sequence[str], into: Response) -> None:
        """Copy this question's answer from Argilla response `values` (name → value) into `into`."""
        value = values.get(self.kind)
        if value is not None:
            into.extra[self.kind] = value

    def write(self, response: Response, slots: Sequence[str], layout: Layout) -> dict[str, Any]:
        """`response`'s answer to this question as Argilla response values (name → value)."""
        value = response.extra.get(self.kind)
        return {} if value is None else {self.kind: value}

    def simulate(self, ctx: SimContext, into: Response) -> None:
        """A simulated reviewer's answer (default: leave the question unanswered)."""

    def value(self, response: Response) -> Any:
        """The answer as one plain value for agreement and consensus (None = unanswered)."""
        return response.extra.get(self.kind)

    def consensus(self, values: Sequence[Any]) -> Any:
        """Several reviewers' answers → one (mean for interval questions, most common value otherwise)."""
        values = [v for v in values if v is not None]
        if not values:
            return None
        if self.level == "interval":
            return float(mean(float(v) for v in values))
        return Counter(map(_hashable, values)).most_common(1)[0][0]


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


class Ranking(Question):
    """Rank the answers (1 = best, ties allowed) over the k completion slots."""

    kind = "ranking"

    def __init__(self, required: bool = True, title: str = "Rank the answers (1 = best)"):
        self.required = required
        self.title = title

    def specs(self, layout):
        options = [_option(slot(i), f"Answer {i}") for i in range(1, layout.slots + 1)]
        return [question("ranking", "ranking", self.title, required=self.required, options=options)]

    def suggest(self, slots, rewards):
        scored = [(slot(i), rewards[cid]) for i, cid in enumerate(slots, 1) if cid in rewards]
        if len(scored) != len(slots) or len(scored) < 2:
            return {}
        scored.sort(key=lambda t: -t[1])
        top = scored[0][1]
        weights = [math.exp(r - top) for _, r in scored]
        return {"ranking": ([name for name, _ in scored], [w / sum(weights) for w in weights])}

    def read(self, values, slots, into):
        ranking = (values.get("ranking") or {}).get("value") or []
        by_slot = {slot(i): cid for i, cid in enumerate(slots, 1)}
        for pos, item in enumerate(ranking, 1):
            name, rank = (item.get("value"), item.get("rank")) if isinstance(item, dict) else (item, None)
            if name in by_slot:  # ranks of empty slots are dropped
                into.ranks[by_slot[name]] = int(rank if rank is not None else pos)

    def write(self, response, slots, layout):
        if not response.ranks:
            return {}
        slot_of = {cid: slot(i) for i, cid in enumerate(slots, 1)}
        ranked = sorted(response.ranks.items(), key=lambda kv: kv[1])
        ranking = [{"value": slot_of[cid], "rank": rank} for cid, rank in ranked if cid in slot_of]
        worst = max((r["rank"] for r in ranking), default=0)
        ranking += [{"value": slot(i), "rank": worst + 1} for i in range(len(slots) + 1, layout.slots + 1)]
        return {"ranking": ranking}

    def simulate(self, ctx, into):
        into.ranks = ctx.ranks()

    def value(self, response):
        return response.ranks or None


# the default harm taxonomy (`annotation.argilla.harm_labels`; the simulated reviewers' too)
HARM_LABELS = ("violence", "self-harm", "hate", "sexual", "illegal", "pii", "misinformation")


class Harm(Question):
    """Per answer: tick every harm it contains (the configured taxonomy) or "none"."""

    kind = "harm"
    level = "nominal"

    def specs(self, layout):
        options = [_option(x) for x in layout.harm_labels] + [_option(NONE_LABEL)]
        return [question(f"harm_{i}", "multi_label_selection", f"Harms in answer {i}", options=options)
                for i in range(1, layout.slots + 1)]

    def read(self, values, slots, into):
        for i, cid in enumerate(slots, 1):
            labels = (values.get(f"harm_{i}") or {}).get("value")
            if labels is not None:
                into.harm[cid] = sorted(set(labels) - {NONE_LABEL})

    def write(self, response, slots, layout):
        def options(labels):  # only the dataset's own labels can be ticked
            return [x for x in labels if not layout.harm_labels or x in layout.harm_labels] or [NONE_LABEL]

        return {f"harm_{i}": options(response.harm.get(cid) or []) for i, cid in enumerate(slots, 1)
                if cid in response.harm}

    def simulate(self, ctx, into):
        into.harm = {cid: list(ctx.harm.get(cid, [])) for cid in ctx.completion_ids}

    def value(self, response):
        return response.harm or None


class Rating(Question):
    """Overall quality of the best answer, 1..rating_scale."""

    kind = "rating"
    level = "interval"

    def specs(self, layout):
        options = [{"value": v} for v in range(1, layout.rating_scale + 1)]
        return [question("rating", "rating", "Quality of the best answer", options=options)]

    def read(self, values, slots, into):
        value = (values.get("rating") or {}).get("value")
        into.rating = int(value) if value is not None else None

    def write(self, response, slots, layout):
        return {} if response.rating is None else {"rating": int(response.rating)}

    def value(self, response):
        return response.rating


class Correction(Question):
    """An optional corrected answer."""

    kind = "correction"

    def specs(self, layout):
        return [question("correction", "text", "Corrected answer (optional)", use_markdown=False)]

    def read(self, values, slots, into):
        into.correction = str((values.get("correction") or {}).get("value") or "")

    def write(self, response, slots, layout):
        return {"correction": response.correction} if response.correction else {}

    def value(self, response):
        return response.correction or None


class Decision(Question):
    """Second-stage review: keep the first-stage ranking, drop the item, or fix the ranking."""

    kind = "decision"
    level = "nominal"
    OPTIONS = ("keep", "drop", "fix")

    def specs(self, layout):
        return [question("decision", "label_selection", "Decision", required=True,
                         options=[_option(x) for x in self.OPTIONS])]

    def read(self, values, slots, into):
        value = (values.get("decision") or {}).get("value")
        if value is not None:
            into.extra["decision"] = str(value)

    def write(self, response, slots, layout):
        value = response.extra.get("decision")
        return {} if value is None else {"decision": value}


class Notes(Question):
    """Second-stage review: free-text notes (why a ranking was fixed, what is wrong)."""

    kind = "notes"

    def specs(self, layout):
        return [question("notes", "text", "Notes", use_markdown=False)]

    def read(self, values, slots, into):
        value = (values.get("notes") or {}).get("value")
        if value:
            into.extra["notes"] = str(value)


QUESTIONS: dict[str, type[Question]] = {
    "ranking": Ranking,
    "harm": Harm,
    "rating": Rating,
    "correction": Correction,
    "decision": Decision,
    "notes": Notes,
}


def first_stage_questions(rating_scale: int, correction: bool, extra: Sequence[str] = ()) -> list[Question]:
    """The questions of the first-stage dataset: ranking, harm flags, optional rating, correction and extras."""
    out: list[Question] = [Ranking(), Harm()]
    if rating_scale:
        out.append(Rating())
    if correction:
        out.append(Correction())
    for name in extra:
        if name not in QUESTIONS:
            raise CurateError(f"annotation.argilla.extra_questions: unknown question type {name!r}; "
                              f"known: {', '.join(sorted(QUESTIONS))} (add a class to preference/questions.py)")
        out.append(QUESTIONS[name]())
    return out


def review_questions() -> list[Question]:
    """The second-stage review dataset: decision, a corrected ranking (for `fix`), harm re-check, notes."""
    return [Decision(), Ranking(required=False, title="Corrected ranking (when you choose fix; 1 = best)"), Harm(),
            Notes()]


def read_response(questions: Sequence[Question], values: dict[str, Any], slots: Sequence[str],
                  into: Response) -> Response:
    """Fill `into` from Argilla response `values` with every question of the table."""
    for q in questions:
        q.read(values, slots, into)
    return into


def write_response(questions: Sequence[Question], response: Response, slots: Sequence[str],
                   layout: Layout) -> dict[str, Any]:
    """`response` as Argilla response values ({name: {"value": ...}}) for every question of the table."""
    out: dict[str, Any] = {}
    for q in questions:
        out.update(q.write(response, slots, layout))
    return {name: {"value": value} for name, value in out.items()}


__all__ = [
    "EMPTY_SLOT",
    "NONE_LABEL",
    "QUESTIONS",
    "Layout",
    "Question",
    "SimContext",
    "first_stage_questions",
    "question",
    "read_response",
    "review_questions",
    "slot",
    "write_response",
]
