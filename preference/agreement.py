"""Inter-annotator agreement, per-annotator statistics, and routing of items to a second-stage review.

Two measures, both on *submitted* responses only (`Response.status == "submitted"`):

- Rankings: Kendall's τ-b between two annotators' rankings of the same record's completions (ties allowed:
  equal ranks). +1 = same order, 0 = unrelated, −1 = reversed; undefined (None) when fewer than two completions are
  shared or one ranking puts everything in one tie. The dataset figure is the mean over (record, annotator pair).
- Harm flags: Krippendorff's α. A *unit* is one (record, completion); each annotator who answered the harm
  question for it contributes one *value*: the set of labels chosen (empty set = "none"). α = 1 − D_o / D_e,
  observed over expected disagreement (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"):

      D_o = 1/n · Σ_u 1/(m_u − 1) · Σ_{i≠j in u} δ(v_i, v_j)
      D_e = 1/(n(n − 1)) · Σ_{i≠j over all pairable values} δ(v_i, v_j)

  with m_u the number of values in unit u, n the total number of values in units with m_u ≥ 2 (units with one
  value are not pairable and are dropped). δ is the *nominal* distance (0 if equal, 1 otherwise) — a label set is
  one nominal category, so {violence} vs {violence, illegal} counts as full disagreement — or the Jaccard distance
  (1 − |A∩B| / |A∪B|) for partial credit on sets. Reported: α on the label sets (nominal and Jaccard), α on the
  binary "flagged at all", and α per label (binary). 1 = perfect agreement, 0 = chance level, < 0 = systematic
  disagreement; None when undefined (no pairable values, or every value identical so D_e = 0).
- Other questions of the table (`preference.questions`) with an α level: α per question over records (units =
  records, values = the answers), nominal or interval (δ = (x − y)², e.g. the rating).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any

from preference.schema import Response

# ---------------------------------------------------------------------------------------------------------------
# primitives


def kendall_tau_b(a: dict[str, int], b: dict[str, int]) -> float | None:
    """Kendall's τ-b between two rankings (item → rank, lower = better; equal ranks = tie) on their common items.

    τ-b = (C − D) / sqrt((C + D + T_a) (C + D + T_b)), with C/D the concordant/discordant pairs and T_a (T_b) the
    pairs tied only in a (only in b). None when < 2 common items or a ranking is a single tie.
    """
    common = sorted(set(a) & set(b))
    concordant = discordant = ties_a = ties_b = 0
    for x, y in itertools.combinations(common, 2):
        da, db = a[x] - a[y], b[x] - b[y]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            concordant += 1
        else:
            discordant += 1
    denom = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return None if denom == 0 else (concordant - discordant) / denom


def nominal_distance(x: Hashable, y: Hashable) -> float:
    return 0.0 if x == y else 1.0


def interval_distance(x: float, y: float) -> float:
    return (float(x) - float(y)) ** 2


def jaccard_distance(x: frozenset, y: frozenset) -> float:
    """1 − |x ∩ y| / |x ∪ y|; two empty sets are identical (distance 0)."""
    union = x | y
    return 0.0 if not union else 1.0 - len(x & y) / len(union)


def krippendorff_alpha(
    units: Sequence[Sequence[Hashable]], distance: Callable[[Any, Any], float] = nominal_distance
) -> float | None:
    """Krippendorff's α for `units`, each the list of values the annotators gave it (missing values omitted).

    Higher = more agreement (1 perfect, 0 chance). None when undefined. See the module docstring for the formula.
    """
    pairable = [list(u) for u in units if len(u) >= 2]
    values = [v for u in pairable for v in u]
    n = len(values)
    if n < 2:
        return None
    observed = sum(
        sum(distance(u[i], u[j]) for i in range(len(u)) for j in range(len(u)) if i != j) / (len(u) - 1)
        for u in pairable
    ) / n
    # Expected disagreement over all ordered pairs of pairable values; count distinct values to keep it O(k²).
    counts: dict[Hashable, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    expected = sum(
        cx * cy * distance(x, y) for (x, cx), (y, cy) in itertools.product(counts.items(), repeat=2) if x != y
    ) / (n * (n - 1))
    if expected == 0:
        return None
    return 1.0 - observed / expected


# ---------------------------------------------------------------------------------------------------------------
# over responses


def submitted(responses: Sequence[Response]) -> list[Response]:
    return [r for r in responses if r.status == "submitted"]


def by_record(responses: Sequence[Response]) -> dict[str, list[Response]]:
    out: dict[str, list[Response]] = defaultdict(list)
    for r in responses:
        out[r.record_id].append(r)
    return dict(out)


def item_tau(responses: Sequence[Response]) -> float | None:
    """Mean pairwise τ-b between the annotators of one record (None with < 2 rankings or all pairs undefined)."""
    ranked = [r for r in responses if r.ranks]
    taus = [kendall_tau_b(x.ranks, y.ranks) for x, y in itertools.combinations(ranked, 2)]
    taus = [t for t in taus if t is not None]
    return mean(taus) if taus else None


def harm_units(responses: Sequence[Response]) -> list[list[frozenset]]:
    """One unit per (record, completion): the label sets of the annotators who answered its harm question."""
    units: dict[tuple[str, str], list[frozenset]] = defaultdict(list)
    for r in submitted(responses):
        for cid, labels in r.harm.items():
            units[(r.record_id, cid)].append(frozenset(labels))
    return [units[k] for k in sorted(units)]


def question_alpha(responses: Sequence[Response], question) -> float | None:
    """Krippendorff α of one table question over records (its `level`: nominal or interval)."""
    units: dict[str, list] = defaultdict(list)
    for r in submitted(responses):
        value = question.value(r)
        if value is not None:
            units[r.record_id].append(tuple(value) if isinstance(value, list) else value)
    distance = interval_distance if question.level == "interval" else nominal_distance
    return krippendorff_alpha([units[k] for k in sorted(units)], distance)


def agreement_report(responses: Sequence[Response], questions: Sequence = ()) -> dict[str, Any]:
    """Dataset-level agreement figures (the content of `agreement.json`).

    `questions`: table questions (besides ranking and harm, which have their own sections) to measure with α."""
    subs = submitted(responses)
    taus = []
    for items in by_record(subs).values():
        ranked = [r for r in items if r.ranks]
        taus += [t for x, y in itertools.combinations(ranked, 2) if (t := kendall_tau_b(x.ranks, y.ranks)) is not None]
    units = harm_units(subs)
    labels = sorted({label for u in units for s in u for label in s})
    return {
        "responses_submitted": len(subs),
        "records": len(by_record(subs)),
        "ranking": {
            "kendall_tau_mean": mean(taus) if taus else None,
            "kendall_tau_min": min(taus) if taus else None,
            "annotator_pairs": len(taus),  # (record, annotator pair) comparisons behind the mean
        },
        "harm": {
            "units": len(units),
            "pairable_units": sum(len(u) >= 2 for u in units),
            "alpha_nominal_sets": krippendorff_alpha(units),
            "alpha_jaccard_sets": krippendorff_alpha(units, jaccard_distance),
            "alpha_flagged": krippendorff_alpha([[bool(s) for s in u] for u in units]),
            "alpha_per_label": {lab: krippendorff_alpha([[lab in s for s in u] for u in units]) for lab in labels},
            "flag_rate": (sum(bool(s) for u in units for s in u) / max(1, sum(len(u) for u in units))),
        },
        "questions": {q.kind: {"level": q.level, "alpha": question_alpha(subs, q)} for q in questions
                      if q.level and q.kind not in ("ranking", "harm")},
        "notes": "tau: Kendall tau-b between annotators' rankings, mean over (record, annotator pair); alpha: "
        "Krippendorff, units = (record, completion), values = harm label sets (empty = none).",
    }


def annotator_stats(responses: Sequence[Response], consensus: dict[str, dict[str, float]] | None = None) -> dict:
    """Per annotator: counts by status, harm flag rate, corrections, mean τ against the other annotators on the
    same records and (if `consensus` record → completion → aggregated score is given) against the consensus."""
    out: dict[str, dict[str, Any]] = {}
    records = by_record(submitted(responses))
    for name in sorted({r.annotator for r in responses}):
        mine = [r for r in responses if r.annotator == name]
        subs = [r for r in mine if r.status == "submitted"]
        judged = [labels for r in subs for labels in r.harm.values()]
        peers = []
        for r in subs:
            for other in records.get(r.record_id, []):
                if other.annotator != name and (t := kendall_tau_b(r.ranks, other.ranks)) is not None:
                    peers.append(t)
        vs_consensus = []
        for r in subs:
            scores = (consensus or {}).get(r.record_id)
            if scores:
                # consensus scores: higher = better → ranks via negation
                t = kendall_tau_b(r.ranks, {c: -s for c, s in scores.items()})
                if t is not None:
                    vs_consensus.append(t)
        out[name] = {
            "submitted": len(subs),
            "discarded": sum(r.status == "discarded" for r in mine),
            "draft": sum(r.status == "draft" for r in mine),
            "harm_flag_rate": sum(bool(x) for x in judged) / len(judged) if judged else None,
            "corrections": sum(bool(r.correction.strip()) for r in subs),
            "tau_vs_peers": mean(peers) if peers else None,
            "tau_vs_consensus": mean(vs_consensus) if vs_consensus else None,
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# routing to a second-stage review


@dataclass
class ReviewConfig:
    """Which first-stage items go to a second-stage review (an Argilla dataset, or review.parquet offline)."""

    route_harm: bool = True  # any annotator flagged any completion with a harm label
    min_tau: float = 0.0  # route when the mean pairwise τ between annotators is below this (needs ≥ 2 rankings)
    exclude_low_agreement: bool = True  # keep low-agreement items out of the pairs until reviewed
    # the pull includes the second stage: waits until every routed record has review_min_submitted answers
    # (Argilla), or has the simulated reviewers answer it (backend simulated); false = merge what is in
    wait: bool = False

    def __post_init__(self):
        if not -1.0 <= self.min_tau <= 1.0:
            raise ValueError(f"min_tau must be in [-1, 1] (a Kendall tau), got {self.min_tau}")


def route_for_review(responses: Sequence[Response], cfg: ReviewConfig,
                     skip: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """record_id → {"reasons": [...], "tau": ..., "flags": {completion_id: sorted labels}} for routed records
    (records in `skip`, e.g. gold items, are never routed)."""
    routed = {}
    for record_id, items in sorted(by_record(submitted(responses)).items()):
        if record_id in skip:
            continue
        reasons = []
        flags: dict[str, set[str]] = defaultdict(set)
        for r in items:
            for cid, labels in r.harm.items():
                flags[cid].update(labels)
        flags = {c: v for c, v in flags.items() if v}
        if cfg.route_harm and flags:
            reasons.append("harm_flag")
        tau = item_tau(items)
        if tau is not None and tau < cfg.min_tau:
            reasons.append("low_agreement")
        if reasons:
            routed[record_id] = {
                "reasons": reasons,
                "tau": tau,
                "flags": {c: sorted(v) for c, v in sorted(flags.items())},
                "annotators": sorted(r.annotator for r in items),
            }
    return routed
