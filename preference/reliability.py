"""Reviewer reliability: gold items, Dawid–Skene consensus for harm flags and pairwise votes, per-annotator quality.

Consensus beside Borda / Bradley–Terry (`preference.aggregate`), weighting each reviewer by how reliable they are:

- pairwise votes: every two completions (a, b) of a record, in a fixed order, are one *task*; a reviewer's
  ranking gives it the label "a" (a ranked better), "b" or "tie". Dawid–Skene (crowd-kit's `DawidSkene`, EM on
  one confusion matrix per reviewer and class priors) estimates P(label | all votes) per task. Gold items anchor
  it (their known answers are passed as `true_labels`). A completion's consensus score is its mean soft win share
  over the record's other completions (ties ½): Borda with reliability-weighted votes. A reviewer who answers
  against the truth gets a confusion matrix that turns their votes around instead of cancelling a good one.
- harm flags: every (record, completion) is a task labelled "flagged" / "clean" by each reviewer who answered
  it; Dawid–Skene gives P(flagged). A completion is harmful when that posterior is ≥ ½.

Per annotator (`annotator_quality`): answers, accuracy on gold items (the known better answer ranked above the other,
ties ½), agreement with the consensus (share of
pairwise votes that agree with the consensus label), the Dawid–Skene accuracy estimate, mean seconds per record
(gaps between the reviewer's consecutive answers, from response timestamps; gaps over 30 min are breaks and left
out), and whether the reviewer is *unreliable*: accuracy below `min_reliability`, measured on gold when they
answered at least `min_gold` gold items, else the Dawid–Skene estimate (needs ≥ 3 reviewers to mean anything).

Implementation: Dawid–Skene here is a small numpy port of crowd-kit's `DawidSkene` (Apache-2.0, maintained by
Toloka; it installs beside the pinned stack and is a test dependency): the tests check that both give the same
posteriors, and `scripts/bench_consensus.py` compares it with crowd-kit's GLAD, MACE, Wawa and majority vote on
PandaLM's 3-annotator set. The port exists for speed: crowd-kit's pandas EM takes ~0.1 s per step on a
200-record round and needs 100+ steps when one reviewer answers against the others (~20 s per pull); the
port does the same in well under a second.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from statistics import mean
from typing import Any

import numpy as np

from preference.schema import AnnotationRecord, Response

BREAK_S = 1800.0  # a gap longer than this between two answers is a break, not time spent on a record


def pair_label(ranks: dict[str, int], a: str, b: str) -> str | None:
    """"a" / "b" / "tie" for completions a, b in one ranking (lower rank = better); None if either is unranked."""
    if a not in ranks or b not in ranks:
        return None
    return "a" if ranks[a] < ranks[b] else "b" if ranks[b] < ranks[a] else "tie"


def pairwise_votes(responses: Sequence[Response]) -> list[tuple[str, str, str]]:
    """(task, annotator, label) for every pair of completions each submitted ranking orders."""
    out = []
    for r in responses:
        if r.status != "submitted" or not r.ranks:
            continue
        for a, b in itertools.combinations(sorted(r.ranks), 2):
            out.append((_task(r.record_id, a, b), r.annotator, pair_label(r.ranks, a, b)))
    return out


def _task(record_id: str, a: str, b: str) -> str:
    return f"{record_id}\t{a}\t{b}"


FLAG, CLEAN = "flagged", "clean"


def harm_votes(responses: Sequence[Response]) -> list[tuple[str, str, str]]:
    """(task = record\\tcompletion, annotator, "flagged" | "clean") for every harm answer of a submitted response."""
    return [(f"{r.record_id}\t{cid}", r.annotator, FLAG if labels else CLEAN)
            for r in responses if r.status == "submitted" for cid, labels in r.harm.items()]


def gold_pair_labels(records: Sequence[AnnotationRecord]) -> dict[str, str]:
    """Known pairwise labels of gold records (task → "a" / "b")."""
    out = {}
    for rec in records:
        gold = rec.metadata.get("gold")
        if isinstance(gold, dict) and gold.get("chosen") and gold.get("rejected"):
            a, b = sorted((gold["chosen"], gold["rejected"]))
            out[_task(rec.record_id, a, b)] = "a" if a == gold["chosen"] else "b"
    return out


EPS = 1e-10


def dawid_skene(votes: Sequence[tuple[str, str, Any]], true_labels: dict[str, Any] | None = None,
                n_iter: int = 500, tol: float = 1e-5) -> tuple[dict[str, dict[Any, float]], dict[str, float]]:
    """Dawid–Skene on (task, worker, label) votes → (task → label → posterior, worker → accuracy).

    The EM of crowd-kit's `DawidSkene` (same initialisation from majority-vote shares, same M and E steps, same
    evidence-lower-bound stopping rule; `tests/test_reliability.py` checks the two agree), in numpy: crowd-kit's
    pandas version takes ~0.1 s per EM step on a 200-record round and needs 100+ steps when one reviewer answers
    against the others. Gold tasks (`true_labels`) are clamped to their label after every E step. A worker's
    accuracy is Σ_k prior_k · P(worker says k | truth k).
    """
    if not votes:
        return {}, {}
    tasks = sorted({t for t, _, _ in votes})
    workers = sorted({w for _, w, _ in votes})
    labels = sorted({lab for _, _, lab in votes}, key=str)
    t_ix, w_ix, l_ix = ({x: i for i, x in enumerate(xs)} for xs in (tasks, workers, labels))
    t = np.array([t_ix[v[0]] for v in votes])
    w = np.array([w_ix[v[1]] for v in votes])
    lab = np.array([l_ix[v[2]] for v in votes])
    n_t, n_w, n_l = len(tasks), len(workers), len(labels)
    observed = np.zeros((n_w, n_l), dtype=bool)
    observed[w, lab] = True
    gold = [(t_ix[k], l_ix[v]) for k, v in (true_labels or {}).items() if k in t_ix and v in l_ix]

    def clamp(p: np.ndarray) -> np.ndarray:
        for ti, li in gold:
            p[ti] = 0.0
            p[ti, li] = 1.0
        return p

    def m_step(p: np.ndarray) -> np.ndarray:  # errors[w, observed label, true label]
        errors = np.zeros((n_w, n_l, n_l))
        np.add.at(errors, (w, lab), p[t])
        errors = np.where(observed[:, :, None], np.maximum(errors, EPS), 0.0)
        return errors / errors.sum(axis=1, keepdims=True)

    def elbo(p: np.ndarray, priors: np.ndarray, errors: np.ndarray) -> float:
        with np.errstate(divide="ignore"):
            joint = (p[t] * (np.log(errors[w, lab]) + np.log(np.maximum(priors, EPS)))).sum()
        q = np.maximum(p, EPS)
        return float(joint - (np.log(q) * q).sum()) / len(votes)

    probas = np.zeros((n_t, n_l))
    np.add.at(probas, (t, lab), 1.0)
    probas = clamp(probas / probas.sum(axis=1, keepdims=True))
    priors = probas.mean(axis=0)
    errors = m_step(probas)
    loss = -np.inf
    for _ in range(n_iter):
        with np.errstate(divide="ignore"):
            log_err = np.log2(errors)
        log_lik = np.tile(np.log2(np.maximum(priors, EPS)), (n_t, 1))
        np.add.at(log_lik, t, log_err[w, lab])
        scaled = np.exp2(log_lik - log_lik.max(axis=1, keepdims=True))
        probas = clamp(scaled / scaled.sum(axis=1, keepdims=True))
        priors = probas.mean(axis=0)
        errors = m_step(probas)
        new_loss = elbo(probas, priors, errors)
        if new_loss - loss < tol:
            break
        loss = new_loss
    posterior = {task: {labels[j]: float(probas[i, j]) for j in range(n_l)} for i, task in enumerate(tasks)}
    accuracy = {worker: float(sum(priors[k] * errors[i, k, k] for k in range(n_l))) for i, worker in enumerate(workers)}
    return posterior, accuracy


def consensus_pairwise(responses: Sequence[Response], records: Sequence[AnnotationRecord] = ()
                       ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Reliability-weighted scores: record → completion → mean soft win share (higher = better), and the
    Dawid–Skene accuracy of every annotator."""
    probas, accuracy = dawid_skene(pairwise_votes(responses), gold_pair_labels(records))
    wins: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task, p in probas.items():
        rid, a, b = task.split("\t")
        tie = p.get("tie", 0.0)
        wins[rid][a].append(p.get("a", 0.0) + tie / 2)
        wins[rid][b].append(p.get("b", 0.0) + tie / 2)
    scores = {rid: {cid: float(mean(v)) for cid, v in per.items()} for rid, per in wins.items()}
    return scores, accuracy


def consensus_harm(responses: Sequence[Response], records: Sequence[AnnotationRecord] = ()
                   ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """record → completion → P(harmful) by Dawid–Skene over the reviewers' flags, and each reviewer's accuracy."""
    probas, accuracy = dawid_skene(harm_votes(responses))
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for task, p in probas.items():
        rid, cid = task.split("\t")
        out[rid][cid] = float(p.get(FLAG, 0.0))
    return dict(out), accuracy


def _seconds_per_record(stamps: list[str]) -> float | None:
    times = []
    for s in stamps:
        try:
            times.append(datetime.fromisoformat(s.replace("Z", "+00:00")))
        except ValueError:
            continue
    times.sort()
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    gaps = [g for g in gaps if 0 <= g <= BREAK_S]
    return float(mean(gaps)) if gaps else None


def annotator_quality(responses: Sequence[Response], records: Sequence[AnnotationRecord],
                      consensus_labels: dict[str, str] | None = None, *, min_reliability: float = 0.5,
                      min_gold: int = 3) -> dict[str, dict[str, Any]]:
    """Per annotator: answers, gold accuracy, agreement with consensus, DS accuracy, seconds/record, unreliable.

    `consensus_labels`: task → consensus pairwise label (default: the Dawid–Skene labels).
    """
    subs = [r for r in responses if r.status == "submitted"]
    votes = pairwise_votes(subs)
    probas, ds_accuracy = dawid_skene(votes, gold_pair_labels(records))
    if consensus_labels is None:
        consensus_labels = {t: max(p, key=p.get) for t, p in probas.items()}
    gold = {r.record_id: r.metadata["gold"] for r in records if isinstance(r.metadata.get("gold"), dict)}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({r.annotator for r in responses}):
        mine = [r for r in subs if r.annotator == name]
        agree = [consensus_labels.get(t) == label for t, who, label in votes if who == name and t in consensus_labels]
        gold_scores = []
        for r in mine:
            g = gold.get(r.record_id)
            if g and g.get("chosen") in r.ranks and g.get("rejected") in r.ranks:
                c, x = r.ranks[g["chosen"]], r.ranks[g["rejected"]]
                gold_scores.append(1.0 if c < x else 0.5 if c == x else 0.0)
        gold_acc = mean(gold_scores) if gold_scores else None
        reliability, basis = (gold_acc, "gold") if len(gold_scores) >= min_gold else (ds_accuracy.get(name), "dawid_skene")
        out[name] = {
            "answers": len(mine),
            "discarded": sum(r.status == "discarded" for r in responses if r.annotator == name),
            "gold_items": len(gold_scores),
            "gold_accuracy": gold_acc,
            "agreement_with_consensus": mean(agree) if agree else None,
            "ds_accuracy": ds_accuracy.get(name),
            "seconds_per_record": _seconds_per_record([r.updated_at for r in mine if r.updated_at]),
            "reliability": reliability,
            "reliability_basis": basis if reliability is not None else None,
            "unreliable": reliability is not None and reliability < min_reliability,
        }
    return out


__all__ = [
    "annotator_quality",
    "CLEAN",
    "FLAG",
    "consensus_harm",
    "consensus_pairwise",
    "dawid_skene",
    "gold_pair_labels",
    "harm_votes",
    "pair_label",
    "pairwise_votes",
]
