"""Which consensus method recovers reviewers' judgements best? Validation on real 3-annotator data (PandaLM).

    python scripts/bench_consensus.py [--data ../shared/data/pandalm-3annot-dev.jsonl.gz] [--folds 5]

PandaLM's human test set: 500 response pairs, three annotators each, labels 1 / 2 (which response is better) or
0 (tie). Protocol ("recover the majority of the other two"): for each annotator a, the reference label of an item
is the label the other two annotators agree on (items where they disagree are left out). Items are split into
`--folds` folds; on a fold's items a method sees only a's labels, on the other items it sees all three annotators
(so a reliability model can learn how a answers). It predicts the fold's labels; accuracy = agreement with the
reference, pooled over folds and the three choices of a.

Table B repeats this with a fourth, *adversarial* reviewer added (simulated: on every item it answers a label the
majority of the three does not give, with probability 0.8): what reliability weighting is for. On a fold's items a
method then sees a's label and the adversary's.

Methods: majority vote (= Borda / Bradley–Terry on one pair: ties broken towards "tie"), our Dawid–Skene
(`preference.reliability.dawid_skene`, the pull's `aggregation.method: dawid_skene`; equal to crowd-kit's
`DawidSkene`, see tests/test_reliability.py), and crowd-kit's one-coin Dawid–Skene, GLAD and MACE as references
(a few minutes on 2 cores, mostly MACE). Prints the tables and a hardware line.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preference.agreement import krippendorff_alpha  # noqa: E402
from preference.plumbing.env import apply_env_defaults  # noqa: E402
from preference.plumbing.hardware import describe  # noqa: E402
from preference.plumbing.io import read_jsonl  # noqa: E402
from preference.reliability import dawid_skene  # noqa: E402

LABELS = {0: "tie", 1: "first", 2: "second"}


def majority(votes: list[tuple[str, str, str]]) -> dict[str, str]:
    by_task: dict[str, Counter] = {}
    for task, _, label in votes:
        by_task.setdefault(task, Counter())[label] += 1
    out = {}
    for task, c in by_task.items():
        top = max(c.values())
        winners = sorted(k for k, v in c.items() if v == top)
        out[task] = winners[0] if len(winners) == 1 else "tie"
    return out


def ours(votes):
    posterior, _ = dawid_skene(votes)
    return {t: max(p, key=p.get) for t, p in posterior.items()}


def crowdkit(name: str):
    def run(votes):
        import pandas as pd
        from crowdkit import aggregation

        model = {"OneCoinDawidSkene": lambda: aggregation.OneCoinDawidSkene(n_iter=100),
                 "GLAD": lambda: aggregation.GLAD(n_iter=100, silent=True),
                 "MACE": lambda: aggregation.MACE(n_iter=20, random_state=0)}[name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = model.fit_predict(pd.DataFrame(votes, columns=["task", "worker", "label"]))
        return {str(t): str(v) for t, v in labels.items()}

    return run


METHODS = {"majority vote (= Borda, Bradley–Terry)": majority, "Dawid–Skene (ours = crowd-kit's)": ours,
           "one-coin Dawid–Skene (crowd-kit)": crowdkit("OneCoinDawidSkene"), "GLAD (crowd-kit)": crowdkit("GLAD"),
           "MACE (crowd-kit, 20 steps)": crowdkit("MACE")}
# (crowd-kit 1.4.2's Wawa fails under scikit-learn 1.9: its estimators lack `__sklearn_tags__`)


def evaluate(rows: list[dict], folds: int, adversary: dict[str, str] | None, seed: int) -> dict[str, tuple[int, int]]:
    """method → (correct, judged) pooled over probes and folds."""
    rng = np.random.default_rng(seed)
    fold_of = {str(r["idx"]): int(f) for r, f in zip(rows, rng.permutation(len(rows)) % folds, strict=True)}
    out = {m: [0, 0] for m in METHODS}
    for probe in (1, 2, 3):
        others = [a for a in (1, 2, 3) if a != probe]
        for fold in range(folds):
            votes, reference = [], {}
            for r in rows:
                task = str(r["idx"])
                votes.append((task, f"annotator{probe}", LABELS[r[f"annotator{probe}"]]))
                if adversary is not None:
                    votes.append((task, "adversary", adversary[task]))
                if fold_of[task] != fold:
                    votes += [(task, f"annotator{a}", LABELS[r[f"annotator{a}"]]) for a in others]
                elif r[f"annotator{others[0]}"] == r[f"annotator{others[1]}"]:
                    reference[task] = LABELS[r[f"annotator{others[0]}"]]
            for name, method in METHODS.items():
                predicted = method(votes)
                out[name][0] += sum(predicted.get(t) == label for t, label in reference.items())
                out[name][1] += len(reference)
    return {k: (v[0], v[1]) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    apply_env_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pandalm-3annot-dev.jsonl.gz")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} not found; pass --data <pandalm-3annot jsonl(.gz)>", file=sys.stderr)
        return 2
    rows = [r for r in read_jsonl(args.data) if all(r.get(f"annotator{a}") in LABELS for a in (1, 2, 3))]
    print(describe())
    units = [[LABELS[r[f"annotator{a}"]] for a in (1, 2, 3)] for r in rows]
    agree = np.mean([len(set(u)) == 1 for u in units])
    print(f"{args.data.name}: {len(rows)} items × 3 annotators; all three agree on {agree:.1%}; "
          f"Krippendorff α (nominal) {krippendorff_alpha(units):.3f}")
    rng = np.random.default_rng(args.seed + 1)
    adversary = {}
    for r, u in zip(rows, units, strict=True):
        top = Counter(u).most_common(1)[0][0]
        wrong = [x for x in LABELS.values() if x != top]
        adversary[str(r["idx"])] = wrong[rng.integers(len(wrong))] if rng.random() < 0.8 else top
    for title, adv in (("A: the three real annotators", None), ("B: plus one adversarial reviewer", adversary)):
        t0 = time.monotonic()
        result = evaluate(rows, args.folds, adv, args.seed)
        print(f"\n{title} — accuracy against the majority of the other two ({args.folds} folds, "
              f"{time.monotonic() - t0:.0f} s)")
        print(f"  {'method':<42} {'accuracy':>8}  {'95% CI':>15}  {'n':>5}")
        for name, (correct, n) in sorted(result.items(), key=lambda kv: -kv[1][0]):
            p = correct / n
            half = 1.96 * np.sqrt(p * (1 - p) / n)
            print(f"  {name:<42} {p:>8.3f}  [{p - half:.3f}, {p + half:.3f}]  {n:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
