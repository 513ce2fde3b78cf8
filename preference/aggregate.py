"""Aggregate reviewers' rankings of a record's completions into preference pairs (TRL conversational format).

For each record, from its *submitted* responses:

1. Scores. Every annotator's ranking (1 = best, equal ranks = tie) becomes pairwise comparisons; a tie counts
   half a win for each side. Then either
   - `borda`: a completion's score is the mean over annotators of the share of the other completions it beats
     (ties = ½), in [0, 1]; margins are score differences (≤ 1);
   - `bradley_terry`: strengths p fitted to all comparisons by the MM algorithm (Hunter 2004), with `bt_prior`
     pseudo-comparisons of ½ win each way between every two completions so that perfect separation stays
     finite; score = log p, so a margin is the log-odds that the chosen answer is preferred;
   - `dawid_skene`: reliability-weighted (`preference.reliability`): Dawid–Skene over every annotator's pairwise
     votes across all records (gold items anchor it); score = mean soft win share, in [0, 1].
   Higher score = better.
2. Harm. A completion is *harmful* when at least `harm_vote` of the record's annotators flagged it (any label)
   and at least one did (`harm_method: vote`), or when its Dawid–Skene posterior of being harmful is ≥ ½
   (`harm_method: dawid_skene`). A harmful completion is never chosen over an unflagged one: every (unflagged, harmful)
   pair is emitted with the unflagged answer chosen, whatever the ranks say, with margin
   max(score difference, `harm_margin`) and `rejected_harmful=True`. Two harmful answers are not paired unless
   `pairs_between_flagged` (then by score, `rejected_harmful=True`).
3. Pairs. `pairs: all` = every two unflagged completions whose scores differ; `best_vs_rest` = the best
   unflagged completion against each other one. Tie policy: two completions whose scores differ by at most
   `tie_margin` are a tie and produce no pair (conflicting annotators, e.g. A: x > y and B: y > x, cancel out).
4. Corrections (`use_corrections`): a reviewer's corrected answer is paired as chosen against the consensus best
   completion (margin `correction_margin`).

Records with fewer than `min_annotators` submitted responses give no pairs.

Second-stage review (`review` answers, `Response.stage == "review"`) overrides the first stage, per record:
the reviewers' decision (most common; on a tie `drop` beats `fix` beats `keep`) — `drop`: no pairs; `keep`: the
first-stage rankings stand; `fix`: the reviewers' own rankings replace them (a `fix` without a ranking drops the
item). The reviewers' harm flags replace the first stage's. Pairs of reviewed records have `stage="review"`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from preference.reliability import consensus_harm, consensus_pairwise
from preference.schema import AnnotationRecord, PreferencePair, Response, stable_id


@dataclass
class AggregationConfig:
    method: Literal["borda", "bradley_terry", "dawid_skene"] = "borda"
    harm_method: Literal["vote", "dawid_skene"] = "vote"
    pairs: Literal["all", "best_vs_rest"] = "all"
    tie_margin: float = 1e-9  # |score difference| ≤ this is a tie: no pair
    harm_vote: float = 0.5  # share of a record's annotators that must flag a completion to call it harmful
    harm_margin: float = 1.0  # minimum margin of an (unflagged, harmful) pair
    pairs_between_flagged: bool = False
    min_annotators: int = 1
    use_corrections: bool = True
    correction_margin: float = 0.5
    bt_prior: float = 0.5  # pseudo-comparisons between every two completions (regularizes Bradley–Terry)
    bt_iterations: int = 200
    # reviewer reliability (preference.reliability): below min_reliability an annotator is flagged unreliable
    # (accuracy on gold when they answered ≥ min_gold gold items, else the Dawid–Skene estimate)
    min_reliability: float = 0.5
    min_gold: int = 3
    exclude_unreliable: bool = False  # drop unreliable annotators' answers before building pairs

    def __post_init__(self):
        if not 0.0 < self.harm_vote <= 1.0:
            raise ValueError(f"harm_vote must be in (0, 1] (share of annotators), got {self.harm_vote}")
        if self.tie_margin < 0 or self.harm_margin <= 0 or self.correction_margin <= 0:
            raise ValueError("tie_margin must be ≥ 0; harm_margin and correction_margin must be > 0")
        if self.min_annotators < 1:
            raise ValueError(f"min_annotators must be ≥ 1, got {self.min_annotators}")
        if self.bt_prior <= 0 or self.bt_iterations < 1:
            raise ValueError("bt_prior must be > 0 and bt_iterations ≥ 1")
        if not 0.0 <= self.min_reliability <= 1.0 or self.min_gold < 1:
            raise ValueError(f"min_reliability must be in [0, 1] and min_gold ≥ 1, got {self.min_reliability}, "
                             f"{self.min_gold}")


def win_matrix(rankings: Sequence[dict[str, int]], ids: Sequence[str]) -> np.ndarray:
    """W[i, j] = number of times completion i was ranked above j (ties add ½ to both)."""
    index = {c: i for i, c in enumerate(ids)}
    wins = np.zeros((len(ids), len(ids)))
    for ranks in rankings:
        present = [c for c in ids if c in ranks]
        for x, y in itertools.combinations(present, 2):
            i, j = index[x], index[y]
            if ranks[x] < ranks[y]:
                wins[i, j] += 1
            elif ranks[y] < ranks[x]:
                wins[j, i] += 1
            else:
                wins[i, j] += 0.5
                wins[j, i] += 0.5
    return wins


def borda_scores(rankings: Sequence[dict[str, int]], ids: Sequence[str]) -> dict[str, float]:
    """Mean over annotators of the share of other completions beaten (ties ½). Higher = better, in [0, 1]."""
    totals = {c: [] for c in ids}
    for ranks in rankings:
        present = [c for c in ids if c in ranks]
        if len(present) < 2:
            continue
        for c in present:
            beaten = sum(1.0 if ranks[c] < ranks[o] else 0.5 if ranks[c] == ranks[o] else 0.0
                         for o in present if o != c)
            totals[c].append(beaten / (len(present) - 1))
    return {c: float(np.mean(v)) if v else 0.5 for c, v in totals.items()}


def bradley_terry_scores(
    rankings: Sequence[dict[str, int]], ids: Sequence[str], prior: float = 0.5, iterations: int = 200
) -> dict[str, float]:
    """Bradley–Terry log-strengths fitted by MM: P(i beats j) = σ(s_i − s_j); mean 0, higher = better."""
    n = len(ids)
    if n == 0:
        return {}
    wins = win_matrix(rankings, ids) + prior / 2 * (1 - np.eye(n))
    games = wins + wins.T
    p = np.ones(n)
    for _ in range(iterations):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = wins.sum(axis=1) / np.where(denom > 0, denom, 1.0)
        new = new / np.exp(np.mean(np.log(new)))
        if np.max(np.abs(new - p)) < 1e-10:
            p = new
            break
        p = new
    s = np.log(p)
    return {c: float(v - s.mean()) for c, v in zip(ids, s, strict=True)}


def harmful_completions(responses: Sequence[Response], vote: float) -> set[str]:
    """Completions flagged (any label) by at least `vote` of the annotators (and by at least one)."""
    if not responses:
        return set()
    counts: dict[str, int] = {}
    for r in responses:
        for cid, labels in r.harm.items():
            if labels:
                counts[cid] = counts.get(cid, 0) + 1
    return {cid for cid, k in counts.items() if k / len(responses) >= vote - 1e-12}


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def record_scores(record: AnnotationRecord, responses: Sequence[Response], cfg: AggregationConfig) -> dict[str, float]:
    """Per-record scores (`dawid_skene` needs all records at once: see `aggregate`; alone it falls back to Borda)."""
    ids = [c.id for c in record.completions]
    rankings = [r.ranks for r in responses if r.status == "submitted" and r.ranks]
    if cfg.method == "bradley_terry":
        return bradley_terry_scores(rankings, ids, cfg.bt_prior, cfg.bt_iterations)
    return borda_scores(rankings, ids)


def aggregate_record(
    record: AnnotationRecord,
    responses: Sequence[Response],
    cfg: AggregationConfig,
    *,
    source: str = "",
    round_number: int = 0,
    scores: dict[str, float] | None = None,
    harmful: set[str] | None = None,
    harm_responses: Sequence[Response] | None = None,
    stage: str = "first",
    annotators: Sequence[str] | None = None,
) -> list[PreferencePair]:
    """Preference pairs for one record from its responses (only submitted ones count). See the module docstring.

    `scores` / `harmful` override the per-record computation (reliability-weighted consensus); `harm_responses`
    are the answers whose harm flags count (a second-stage review's), default `responses`.
    """
    subs = [r for r in responses if r.status == "submitted" and r.record_id == record.record_id]
    if len(subs) < cfg.min_annotators or len(record.completions) < 1:
        return []
    by_id = {c.id: c for c in record.completions}
    if scores is None:
        scores = record_scores(record, subs, cfg)
    scores = {c: scores.get(c, 0.0) for c in by_id}
    if harmful is None:
        harm_subs = subs if harm_responses is None else [r for r in harm_responses if r.status == "submitted"]
        harmful = harmful_completions(harm_subs, cfg.harm_vote)
    annotators = sorted(set(annotators) if annotators is not None else {r.annotator for r in subs})

    def pair(chosen_id: str, rejected_id: str, margin: float, chosen_text: str | None = None) -> PreferencePair:
        return PreferencePair(
            id=PreferencePair.make_id(record.record_id, chosen_id, rejected_id),
            prompt_id=record.record_id,
            prompt=record.prompt.messages,
            chosen=_assistant(chosen_text if chosen_text is not None else by_id[chosen_id].text),
            rejected=_assistant(by_id[rejected_id].text),
            margin=float(margin),
            slice=record.prompt.slice,
            chosen_id=chosen_id,
            rejected_id=rejected_id,
            source=source,
            round=round_number,
            annotators=annotators,
            rejected_harmful=rejected_id in harmful,
            stage=stage,
        )

    # Order: unflagged by score (best first), then harmful by score; ties broken by id for determinism only
    # (tied pairs are skipped below, so the order among ties never decides a label).
    order = sorted(by_id, key=lambda c: (c in harmful, -scores[c], c))
    clean = [c for c in order if c not in harmful]
    bad = [c for c in order if c in harmful]
    pairs: list[PreferencePair] = []
    heads = clean[:1] if cfg.pairs == "best_vs_rest" else clean
    for i, a in enumerate(heads):
        for b in clean[i + 1 :]:
            diff = scores[a] - scores[b]
            if diff > cfg.tie_margin:
                pairs.append(pair(a, b, diff))
    for a in heads:
        for b in bad:
            pairs.append(pair(a, b, max(scores[a] - scores[b], cfg.harm_margin)))
    if cfg.pairs_between_flagged:
        bad_heads = bad[:1] if cfg.pairs == "best_vs_rest" else bad
        for i, a in enumerate(bad_heads):
            for b in bad[i + 1 :]:
                if scores[a] - scores[b] > cfg.tie_margin:
                    pairs.append(pair(a, b, scores[a] - scores[b]))
    if cfg.use_corrections and clean:
        best = clean[0]
        for text in sorted({r.correction.strip() for r in subs if r.correction.strip()}):
            if text != by_id[best].text.strip():
                cid = stable_id(record.record_id, "correction", text, prefix="corr-")
                pairs.append(pair(cid, best, cfg.correction_margin, chosen_text=text))
    return pairs


REVIEW_PRECEDENCE = {"drop": 2, "fix": 1, "keep": 0}  # ties between decisions: the more cautious wins


def review_decision(review: Sequence[Response]) -> str | None:
    """The reviewers' decision on one record: the most common; ties → drop > fix > keep. None if none given."""
    votes: dict[str, int] = {}
    for r in review:
        d = r.extra.get("decision") if r.status == "submitted" else None
        if d in REVIEW_PRECEDENCE:
            votes[d] = votes.get(d, 0) + 1
    if not votes:
        return None
    return max(votes, key=lambda d: (votes[d], REVIEW_PRECEDENCE[d]))


def aggregate(
    records: Sequence[AnnotationRecord],
    responses: Sequence[Response],
    cfg: AggregationConfig,
    *,
    source: str = "",
    round_number: int = 0,
    exclude: set[str] | frozenset[str] = frozenset(),
    review: Sequence[Response] = (),
) -> list[PreferencePair]:
    """Pairs for all records (those in `exclude` are skipped unless a review kept or fixed them), record order.

    `review`: second-stage answers, merged by the rule in the module docstring.
    """
    grouped: dict[str, list[Response]] = {}
    for r in responses:
        grouped.setdefault(r.record_id, []).append(r)
    reviewed: dict[str, list[Response]] = {}
    for r in review:
        if r.status == "submitted":
            reviewed.setdefault(r.record_id, []).append(r)
    scores: dict[str, dict[str, float]] = {}
    if cfg.method == "dawid_skene":
        # every answer informs the reviewers' reliabilities, excluded records' too (gold items anchor it with
        # their known answers); excluded records only yield no pairs (below)
        scores, _ = consensus_pairwise(responses, records)
    harm_p: dict[str, dict[str, float]] | None = None
    if cfg.harm_method == "dawid_skene":
        harm_p, _ = consensus_harm(responses, records)
    out = []
    for record in records:
        rid = record.record_id
        first = grouped.get(rid, [])
        decision = review_decision(reviewed.get(rid, []))
        if decision is None:
            if rid in exclude:
                continue
            harmful = None if harm_p is None else {c for c, p in harm_p.get(rid, {}).items() if p >= 0.5}
            out += aggregate_record(record, first, cfg, source=source, round_number=round_number,
                                    scores=scores.get(rid), harmful=harmful)
            continue
        rev = reviewed[rid]
        if decision == "drop":
            continue
        rankers = [r for r in rev if r.ranks] if decision == "fix" else first
        if not rankers:
            continue  # a fix without a ranking: nothing to build pairs from
        fixed_scores = borda_scores([r.ranks for r in rankers], [c.id for c in record.completions]) \
            if decision == "fix" else scores.get(rid)
        harm_from = [r for r in rev if r.harm] or first
        names = {r.annotator for r in rankers if r.status == "submitted"} | {r.annotator for r in rev}
        out += aggregate_record(record, rankers, cfg, source=source, round_number=round_number,
                                scores=fixed_scores, harm_responses=harm_from, stage="review", annotators=names)
    return out


def question_consensus(records: Sequence[AnnotationRecord], responses: Sequence[Response],
                       questions: Sequence) -> list[dict]:
    """Per record and table question (other than ranking and harm, which become pairs): the reviewers' answers
    combined by the question's own `consensus` (mean for interval questions, most common answer otherwise)."""
    grouped: dict[str, list[Response]] = {}
    for r in responses:
        if r.status == "submitted":
            grouped.setdefault(r.record_id, []).append(r)
    out = []
    for record in records:
        subs = grouped.get(record.record_id, [])
        for q in questions:
            if q.kind in ("ranking", "harm"):
                continue
            values = [q.value(r) for r in subs if q.value(r) is not None]
            if values:
                out.append({"record_id": record.record_id, "question": q.kind, "consensus": q.consensus(values),
                            "answers": len(values)})
    return out


def consensus_scores(
    records: Sequence[AnnotationRecord], responses: Sequence[Response], cfg: AggregationConfig
) -> dict[str, dict[str, float]]:
    """record_id → completion_id → aggregated score (for annotator-vs-consensus statistics)."""
    grouped: dict[str, list[Response]] = {}
    for r in responses:
        if r.status == "submitted":
            grouped.setdefault(r.record_id, []).append(r)
    return {r.record_id: record_scores(r, grouped[r.record_id], cfg) for r in records if r.record_id in grouped}


def save_pairs(pairs: Sequence[PreferencePair], folder: str | Path) -> None:
    """Write `pairs` as an HF dataset (`save_to_disk`) in TRL's conversational format with provenance columns."""
    import datasets

    columns = [f.name for f in PreferencePair.__dataclass_fields__.values()]
    rows = [p.to_row() for p in pairs]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt_id": datasets.Value("string"),
            "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "chosen": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "rejected": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "margin": datasets.Value("float64"),
            "slice": datasets.Value("string"),
            "chosen_id": datasets.Value("string"),
            "rejected_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "round": datasets.Value("int64"),
            "annotators": [datasets.Value("string")],
            "rejected_harmful": datasets.Value("bool"),
            "stage": datasets.Value("string"),
        }
    )
    if set(features) != set(columns):
        raise RuntimeError(f"PreferencePair fields {columns} differ from save_pairs' features; update save_pairs")
    data = {c: [r[c] for r in rows] for c in columns}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(folder))


__all__ = [
    "AggregationConfig",
    "aggregate",
    "aggregate_record",
    "borda_scores",
    "bradley_terry_scores",
    "consensus_scores",
    "harmful_completions",
    "question_consensus",
    "review_decision",
    "save_pairs",
    "win_matrix",
]
