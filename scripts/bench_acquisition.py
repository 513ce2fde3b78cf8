"""Acquisition benchmark: do curated labels beat random ones? One protocol on three kinds of real data.

    python scripts/bench_acquisition.py                                  # all three datasets, TF-IDF features
    python scripts/bench_acquisition.py --dataset qa-feedback --features smollm2
    python scripts/bench_acquisition.py --data my.jsonl.gz --format qa-feedback   # your data, same shape

Protocol (the same for every strategy; paired by seed): per seed the items (prompts) are split into a held-out
test set and an unlabelled pool; every strategy starts from the same `--init` random labels, then runs `--rounds`
rounds of `--budget` labels: fit the current model on the labels so far, score the pool (reward margin and
ensemble disagreement, plus SmolLM2 logprob/entropy signals with `--features smollm2`), let the strategy pick
`--budget` prompts, and have the simulated reviewer answer exactly what is asked, with the dataset's own human
label. After every fit the held-out quality is recorded. Datasets (`--dataset`; the data, formats and learners
are in `scripts/bench_tasks.py`):

- `hh-harmless` (`--format hh`): fixed pairs; the quality is the Bradley–Terry ensemble's held-out pairwise
  accuracy. 300 test prompts, 25 init + 8 × 25 labels.
- `qa-feedback` (`--format qa-feedback`): 4 answers per question and 6 human pairwise judgements with ties. The
  strategy picks questions, then its completion chooser (`strategy/chooser`, `curation/acquisition/pairing.py`: info_gain,
  thompson, diverse, random) picks which of the question's not-yet-asked comparisons to ask; the reviewer gives
  the human judgement of exactly that comparison. A tie ("no preference") is a spent label that teaches nothing;
  the table reports each strategy's tie rate. Quality: pairwise accuracy on the test questions' non-tie
  judgements. 75 test questions, 25 init + 8 × 25 labels.
- `skewed-moderation` (`--format moderation`): a skewed pool — per seed half of each slice goes to the test
  set; the pool keeps every benign prompt and, of each harm slice (a prompt's rarest flag), at most
  `--rare-share` × (benign prompts in the pool): rare categories mixed into a majority of benign prompts. The
  reviewer gives the harm label; the model is a harm classifier; the quality is the rare-slice balanced accuracy
  ½ (benign accuracy + mean recall over the harm slices). 20 init + 8 × 15 labels; `--rare-share 0.05` (≤ 14
  prompts of each of the 8 harm slices beside ~278 benign ones in the pool).

Strategies: `curation.acquisition.strategies` specs (`random`, `reward_margin`, `kcenter`, `hybrid` = weighted reward
margin + disagreement, top 4k, then k-center …), optionally `spec@share` (a `RandomArm` keeping that share of each
batch random, as rounds do) and `spec/chooser` (qa-feedback; default `random`). `random` (random prompts, random
comparisons) is the baseline every row is compared with. A strategy needing a signal the features do not give is
refused before anything runs.

Table (per dataset): labels spent, final quality (mean ± 95 % t-interval over seeds), AUC (mean quality over the
curve), ΔAUC vs random paired by seed (± 95 % t-interval), labels the seed-averaged curve needs to reach random's
final quality (linear interpolation; "—" = not reached), the label savings vs random's own labels-to-target with a
95 % bootstrap CI over seeds (seeds resampled, paired; a resample that never reaches the target counts as −∞), the
tie rate (qa-feedback), and wall seconds per run. Goals: on at least two datasets a strategy saves ≥ 30 % with the
CI above 0 (every such strategy is listed, with how many were compared: one of many may pass by chance); the
shipped configs' default (`CONFIG_DEFAULT`: `reward_disagreement|kcenter@0.25`, `/info_gain` on multi-completion
data) is never significantly worse than random (ΔAUC CI below 0).

The tables in scripts/README.md were made with (2 CPU cores under load from other work, `nice -n 10`; then `--report` prints the tables
and the goals). SmolLM2 features first (computed once per dataset, cached, resumable; the default strategy lists
plus the LM strategies, `under_dense` left out for time):

    S="random,reward_margin,reward_disagreement,kcenter,hybrid,hybrid@0.15,hybrid@0.25,entropy,low_logprob"
    Q="random,random/info_gain,reward_margin/info_gain,reward_disagreement/info_gain,reward_disagreement/thompson,"
    Q+="kcenter/diverse,hybrid/info_gain,hybrid@0.15/info_gain,hybrid@0.25/info_gain,entropy/info_gain,"
    Q+="low_logprob/info_gain"
    for d in skewed-moderation:$S qa-feedback:$Q hh-harmless:$S; do
      nice -n 10 python scripts/bench_acquisition.py --dataset ${d%%:*} --features smollm2 --seeds 10 \
        --strategies ${d#*:} --json runs/bench/smollm2-${d%%:*}.json
    done
    python scripts/bench_acquisition.py --report runs/bench/smollm2-*.json

The goal check reran the strategies those tables single out plus the default with 30 seeds (`--seeds 30`, one
`--json runs/bench/smollm2-<dataset>-30seeds.json` per dataset, and the default's own rows in
`runs/bench/smollm2-<dataset>-default-30seeds.json`; the lists are in scripts/README.md).

Adaptive strategy and the `maxmin` / `delta_ucb` choosers — protocol fixed BEFORE the runs (2026-12-04):

`adaptive@0.25` is `curation.acquisition.strategies.Adaptive` (the same class and update rule rounds run; this loop gives it the
label history: every label unit with the arm that chose it — the initial labels are random, so they count as the
control arm's — and the round it was chosen in; the learner's held-out score is `PreferenceLearner.heldout` /
`HarmClassifier.heldout`: one deterministic Bradley–Terry / class-balanced logistic model, C = `--c`, log-likelihood
on the control arm's labels), portfolio `reward_disagreement, low_logprob, entropy, kcenter`, beside a 25 % random
arm, as the configs would run it. Same protocol as above (the presets, paired seeds 0–29, SmolLM2 features in fp32:
`--features smollm2 --dtype float32 --seeds 30`), one process at a time under `nice -n 10`. Rows run:

    A="random,reward_disagreement,low_logprob,entropy,kcenter,low_logprob@0.25,entropy@0.25,kcenter@0.25,"
    A+="reward_disagreement|kcenter@0.25,adaptive@0.25"                             # hh-harmless, skewed-moderation
    Q="random,random/info_gain,random/maxmin,random/delta_ucb,reward_disagreement/info_gain,low_logprob/info_gain,"
    Q+="entropy/info_gain,kcenter/info_gain,low_logprob@0.25/info_gain,entropy@0.25/info_gain,"
    Q+="kcenter@0.25/info_gain,reward_disagreement|kcenter@0.25/info_gain,reward_disagreement|kcenter@0.25/maxmin,"
    Q+="reward_disagreement|kcenter@0.25/delta_ucb,reward_disagreement|kcenter@0.25/random,adaptive@0.25/info_gain"
    for d in skewed-moderation:$A qa-feedback:$Q hh-harmless:$A; do
      nice -n 10 python scripts/bench_acquisition.py --dataset ${d%%:*} --features smollm2 --dtype float32 \
        --seeds 30 --strategies ${d#*:} --json runs/bench/adaptive-${d%%:*}.json
    done
    python scripts/bench_acquisition.py --report runs/bench/adaptive-*.json

(`reward_disagreement@0.25` is not run: in the benchmark a reward model always exists, so it equals the default
`reward_disagreement|kcenter@0.25`.) Pass rules (`adaptive_goals`), per dataset, for `adaptive@0.25` (`/info_gain` on
qa-feedback):
- G1 never significantly worse than random: ΔAUC + its 95 % CI ≥ 0, on all three datasets;
- G2 ΔAUC ≥ (the best fixed strategy's ΔAUC) − 0.005 on all three datasets; "fixed" = every row run except
  `random` and the adaptive one — the pure strategies and those with a 25 % random arm — and on qa-feedback only
  rows with the configs' chooser `/info_gain`, so the comparison is of strategies, not choosers;
- G3 savings ≥ 30 % with the savings CI's low end > 0 on at least two datasets.
Decision rule: all three met → `adaptive` becomes the shipped default (configs/*.yaml, `SelectionConfig.strategy`,
`CONFIG_DEFAULT = "adaptive@0.25"`). Otherwise scripts/README.md says which goal failed, and the default becomes, of the
shipped-form candidates run on all three datasets (`DEFAULT_CANDIDATES`: `low_logprob@0.25`, `entropy@0.25`,
`kcenter@0.25`, `reward_disagreement|kcenter@0.25`, `adaptive@0.25`), one never significantly worse than random on
any dataset — the one with the highest worst-dataset ΔAUC (a tie keeps the current default). Choosers: the
qa-feedback rows `random/<chooser>` and `reward_disagreement|kcenter@0.25/<chooser>` compare `info_gain`, `maxmin`,
`delta_ucb` and `random` (ΔAUC and tie rate); they are reported, the chooser default is not changed by this run.
Every row run is reported, with the adaptive rows' labels per arm and their first and last allocations.

TF-IDF features (one process per dataset):

    for d in hh-harmless qa-feedback skewed-moderation; do
      nice -n 10 python scripts/bench_acquisition.py --dataset $d --features tfidf --seeds 10 \
        --json runs/bench/tfidf-$d.json --quiet &
    done; wait
    python scripts/bench_acquisition.py --report runs/bench/tfidf-*.json

all-MiniLM-L6-v2 features (`--features minilm`: the embeddings rounds use with the shipped configs), same loop
with `--features minilm` and `--json runs/bench/minilm-$d.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preference.plumbing.env import apply_env_defaults  # noqa: E402

apply_env_defaults()  # before torch is imported

from curation.acquisition.pairing import CHOOSERS, make_chooser  # noqa: E402
from curation.acquisition.strategies import (  # noqa: E402
    CONTROL,
    EMBEDDING,
    Items,
    LabelLog,
    RandomArm,
    Strategy,
    build_strategy,
    find_adaptive,
)
from preference.plumbing.errors import CurateError  # noqa: E402
from scripts.bench_tasks import (  # noqa: E402,I001
    LOADERS,
    HarmClassifier,
    PreferenceLearner,
    Task,
    minilm_features,
    smollm2_features,
    tfidf_features,
)

DATA = ROOT / "data"
HYBRID_WEIGHTS = {"reward_margin": 1.0, "reward_disagreement": 1.0}
LM_SIGNALS = {"mean_logprob", "mean_entropy"}
PRESETS = {
    "hh-harmless": dict(data=DATA / "hh-harmless-dev.jsonl.gz", format="hh", test=300, init=25, rounds=8, budget=25),
    "qa-feedback": dict(data=DATA / "qa-feedback-dev.jsonl.gz", format="qa-feedback", test=75, init=25, rounds=8,
                        budget=25),
    "skewed-moderation": dict(data=DATA / "moderation-dev.jsonl.gz", format="moderation", test=0.5, init=20,
                              rounds=8, budget=15),
}
# What the shipped configs (configs/*.yaml) run: `selection.strategy` @ `selection.random_share`, and
# `selection.completion_choice` where a prompt has several answers (tests/test_bench_acquisition.py keeps it true).
CONFIG_DEFAULT = "reward_disagreement|kcenter@0.25"
CONFIG_CHOOSER = "info_gain"
DEFAULT_STRATEGIES = {  # each list ends with the configs' default (CONFIG_DEFAULT, with its chooser)
    "hh": "random,reward_margin,reward_disagreement,kcenter,under_dense,hybrid,hybrid@0.15,hybrid@0.25,"
          "reward_disagreement|kcenter@0.25",
    "qa-feedback": "random,random/info_gain,reward_margin/info_gain,reward_disagreement/info_gain,"
                   "reward_disagreement/thompson,kcenter/diverse,hybrid/info_gain,hybrid@0.15/info_gain,"
                   "hybrid@0.25/info_gain,reward_disagreement|kcenter@0.25/info_gain",
    "moderation": "random,reward_margin,reward_disagreement,kcenter,under_dense,hybrid,hybrid@0.15,hybrid@0.25,"
                  "reward_disagreement|kcenter@0.25",
}
LM_STRATEGIES = "low_logprob,entropy"


# ----------------------------------------------------------------------------------------------- strategies
@dataclass
class Spec:
    text: str
    strategy: Strategy
    chooser: str

    @classmethod
    def parse(cls, text: str, candidate_factor: float) -> Spec:
        head, _, chooser = text.partition("/")
        base, _, share = head.partition("@")
        chooser = chooser or "random"
        if chooser not in CHOOSERS:
            raise CurateError(f"--strategies {text!r}: unknown completion chooser {chooser!r}; expected one of "
                              f"{', '.join(CHOOSERS)}")
        strategy = build_strategy(base, weights=HYBRID_WEIGHTS, candidate_factor=candidate_factor)
        if share:
            try:
                strategy = RandomArm(strategy, float(share))
            except ValueError as exc:
                raise CurateError(f"--strategies {text!r}: '@{share}' must be a random share in [0, 1)") from exc
        return cls(text, strategy, chooser)


# --------------------------------------------------------------------------------------------------- splits
@dataclass
class Split:
    test: np.ndarray  # items
    pool: np.ndarray  # items
    init: list  # label units: (item, a, b, outcome) comparisons or items


def make_split(task: Task, args, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    if task.kind == "classification":
        test, pool = [], []
        by_slice = {s: rng.permutation(np.flatnonzero(task.slices == s)) for s in sorted(set(task.slices.tolist()))}
        for rows in by_slice.values():
            half = int(len(rows) * args.test)
            test += rows[:half].tolist()
            pool.append(rows[half:])
        benign = [p for s, p in zip(by_slice, pool, strict=True) if s == "benign"]
        n_benign = len(benign[0]) if benign else 0
        cap = max(1, int(round(args.rare_share * n_benign))) if n_benign else None
        kept = [p if s == "benign" or cap is None else p[:cap] for s, p in zip(by_slice, pool, strict=True)]
        pool_items = rng.permutation(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
        check_sizes(task, args, len(test), len(pool_items), "prompts")
        init = rng.choice(pool_items, size=args.init, replace=False).tolist()
        return Split(np.asarray(test, dtype=np.int64), pool_items, init)
    order = rng.permutation(len(task))
    n_test = int(round(args.test * len(task))) if 0 < args.test < 1 else int(args.test)  # a share or a count
    test, pool = order[:n_test], order[n_test:]
    units = [c for i in pool for c in task.comparisons[i]]
    check_sizes(task, args, sum(1 for i in test for c in task.comparisons[i] if c[2] != 0), len(units), "comparisons")
    init = [units[j] for j in rng.choice(len(units), size=args.init, replace=False)]
    return Split(test, pool, init)


def check_sizes(task: Task, args, n_test: int, n_pool: int, unit: str) -> None:
    need = args.init + args.rounds * args.budget
    if n_pool < need:
        raise CurateError(
            f"--data {args.data}: the pool holds {n_pool} {unit} but --init {args.init} + --rounds {args.rounds} × "
            f"--budget {args.budget} = {need} labels are asked for; lower them or give a larger file"
        )
    if n_test < 10:
        raise CurateError(f"--data {args.data}: only {n_test} test {unit} (--test {args.test}); need at least 10 "
                          "to measure anything: raise --test or give a larger file")


# ------------------------------------------------------------------------------------------------------ run
def item_signals(task: Task, feats: dict, learner, cand: np.ndarray, open_comps: dict) -> tuple[dict, dict]:
    """Per candidate item: reward_margin, reward_disagreement (+ LM signals), and the member rewards of its
    answers (preference) for the completion chooser."""
    signals: dict[str, np.ndarray] = {}
    answer_rewards: dict[int, np.ndarray] = {}
    if task.kind == "classification":
        logits = learner.logits(cand)
        signals["reward_margin"] = np.abs(logits.mean(axis=0))
        signals["reward_disagreement"] = logits.std(axis=0)
        rows = cand
    else:
        answers = np.array([a for i in cand for a in task.answers[i]])
        rewards = learner.rewards(answers)
        col = {int(a): j for j, a in enumerate(answers)}
        margin, disagreement = np.zeros(len(cand)), np.zeros(len(cand))
        for r, i in enumerate(cand):
            answer_rewards[int(i)] = rewards[:, [col[a] for a in task.answers[i]]]
            gaps = np.stack([rewards[:, col[a]] - rewards[:, col[b]] for a, b, _ in open_comps[int(i)]], axis=1)
            margin[r] = np.abs(gaps.mean(axis=0)).min()
            disagreement[r] = gaps.std(axis=0).max()
        signals["reward_margin"], signals["reward_disagreement"] = margin, disagreement
        rows = None
    if "logprob" in feats:
        if rows is not None:
            signals["mean_logprob"], signals["mean_entropy"] = feats["logprob"][rows], feats["entropy"][rows]
        else:
            signals["mean_logprob"] = np.array([feats["logprob"][task.answers[i]].mean() for i in cand])
            signals["mean_entropy"] = np.array([feats["entropy"][task.answers[i]].mean() for i in cand])
    return signals, answer_rewards


def item_embeddings(task: Task, feats: dict, items) -> np.ndarray:
    items = np.asarray(items, dtype=np.int64)
    if task.kind == "classification":
        return feats["emb"][items]
    return np.stack([feats["emb"][task.answers[i]].mean(axis=0) for i in items]) if len(items) else \
        np.zeros((0, feats["emb"].shape[1]), np.float32)


def run(task: Task, feats: dict, spec: Spec, split: Split, args, seed: int) -> dict:
    """One strategy on one seed's split: the learning curve, ties, labels spent; for an adaptive strategy also the
    labels each arm got and its allocation per round. The strategy is built afresh (an adaptive one carries state
    across rounds — never across seeds) and an adaptive one is measured by its own `update` on the loop's label
    history: every label unit with the arm that chose it (the initial labels are random, so they count as the
    control arm's) and the round it was chosen in."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 1])
    spec = Spec.parse(spec.text, args.candidate_factor)
    adaptive = find_adaptive(spec.strategy)
    if task.kind == "classification":
        learner = HarmClassifier(task, feats, args.members, args.c, seed)
        labelled_items = list(split.init)
        spent, ties = len(labelled_items), 0
        units = labelled_items
    else:
        learner = PreferenceLearner(task, feats, args.members, args.c, seed)
        asked = {(a, b) for a, b, _ in split.init}
        labels = list(split.init)
        spent, ties = len(labels), sum(o == 0 for _, _, o in labels)
        units = labels
    unit_arm, unit_round = [CONTROL] * len(units), [0] * len(units)
    arm_spent: dict[tuple[int, str], int] = {(0, CONTROL): len(units)}
    allocations = []
    test_comps = [c for i in split.test for c in task.comparisons[i]] if task.kind != "classification" else None
    chooser = make_chooser(spec.chooser, args.near_duplicate)
    curve = []
    for r in range(args.rounds + 1):
        if task.kind == "classification":
            learner.fit(labelled_items)
            curve.append((spent, learner.quality(split.test)))
        else:
            learner.fit(labels)
            curve.append((spent, learner.quality(test_comps)))
        if r == args.rounds:
            break
        if task.kind == "classification":
            done = set(labelled_items)
            cand = np.array([i for i in split.pool if i not in done], dtype=np.int64)
            open_comps: dict = {}
            labelled_rows = labelled_items
        else:
            open_comps = {int(i): [c for c in task.comparisons[i] if (c[0], c[1]) not in asked] for i in split.pool}
            cand = np.array([i for i in split.pool if open_comps[int(i)]], dtype=np.int64)
            labelled_rows = sorted({task.answer_prompt[a] for a, _ in asked})
        signals, answer_rewards = item_signals(task, feats, learner, cand, open_comps)
        items = Items(ids=cand, signals=signals, embeddings=item_embeddings(task, feats, cand),
                      slices=task.slices[cand], labelled=item_embeddings(task, feats, labelled_rows))
        if adaptive is not None:
            adaptive.new_batch()
            log = LabelLog(np.array(unit_arm, dtype=object), np.array(unit_round), dict(arm_spent))
            adaptive.update(log, learner.heldout(units), np.random.default_rng([seed, 2, r]))
        strategy_rows, control_rows = spec.strategy.select_arms(items, args.budget, rng)
        picks = cand[np.concatenate([strategy_rows, control_rows]).astype(np.int64)]
        arm_of = [adaptive.attribution.get(str(i), "strategy") if adaptive is not None else "strategy"
                  for i in cand[strategy_rows]] + [CONTROL] * len(control_rows)
        if adaptive is not None:
            allocations.append({"round": r + 1, "allocation": dict(adaptive.allocation), "reason": adaptive.reason})
        for i, arm in zip(picks, arm_of, strict=True):
            spent += 1
            arm_spent[(r + 1, arm)] = arm_spent.get((r + 1, arm), 0) + 1
            if task.kind == "classification":
                labelled_items.append(int(i))
                unit_arm.append(arm)
                unit_round.append(r + 1)
                continue
            comps = open_comps[int(i)]
            local = {a: j for j, a in enumerate(task.answers[i])}
            allowed = np.zeros((len(local), len(local)), dtype=bool)
            for a, b, _ in comps:
                allowed[local[a], local[b]] = allowed[local[b], local[a]] = True
            emb = feats["emb"][task.answers[i]]
            x, y = chooser.choose(answer_rewards[int(i)], emb, 2, rng, allowed=allowed)
            ga, gb = task.answers[i][x], task.answers[i][y]
            outcome = next(c for c in comps if {c[0], c[1]} == {ga, gb})
            asked.add((outcome[0], outcome[1]))
            labels.append(outcome)
            unit_arm.append(arm)
            unit_round.append(r + 1)
            ties += outcome[2] == 0
    out = {"curve": curve, "ties": ties, "spent": spent, "seconds": time.perf_counter() - t0}
    if adaptive is not None:
        out["allocations"] = allocations
        out["arm_labels"] = {a: sum(n for (rnd, arm), n in arm_spent.items() if arm == a and rnd > 0)
                             for a in [*adaptive.arms, CONTROL]}
        out["values"] = adaptive.state()["values"]
    return out


# --------------------------------------------------------------------------------------------------- tables
def labels_to_reach(labels: np.ndarray, acc: np.ndarray, target: float) -> float | None:
    """First label count (linear interpolation) where the curve reaches `target`; None when it never does."""
    for j in range(len(acc)):
        if acc[j] >= target:
            if j == 0:
                return float(labels[0])
            frac = (target - acc[j - 1]) / (acc[j] - acc[j - 1])
            return float(labels[j - 1] + frac * (labels[j] - labels[j - 1]))
    return None


def savings(labels, acc_random, acc, rng, resamples: int = 2000) -> tuple[float, float, float]:
    """(share of random's labels-to-target saved, CI low, CI high); the target is random's final quality."""

    def one(rows) -> float:
        curve_r = acc_random[rows].mean(axis=0)
        target = curve_r[-1] - 1e-12  # random's final mean quality (it reaches it by its last point at the latest)
        need_r = labels_to_reach(labels, curve_r, target)
        need_s = labels_to_reach(labels, acc[rows].mean(axis=0), target)
        return -np.inf if need_s is None else 1.0 - need_s / need_r

    seeds = len(acc)
    point = one(np.arange(seeds))
    boot = np.array([one(rng.integers(0, seeds, seeds)) for _ in range(resamples)])
    return point, float(np.percentile(boot, 2.5, method="nearest")), float(np.percentile(boot, 97.5, method="nearest"))


def summarize(name: str, task: Task, results: dict, args) -> dict:
    from scipy.stats import t as student_t

    specs = list(results)
    labels = np.array([n for n, _ in results[specs[0]][0]["curve"]])
    acc = {s: np.array([[a for _, a in r["curve"]] for r in results[s]]) for s in specs}
    seeds = len(acc["random"])
    half = student_t.ppf(0.975, seeds - 1) / np.sqrt(seeds) if seeds > 1 else float("nan")
    target = acc["random"].mean(axis=0)[-1] - 1e-12
    rng = np.random.default_rng(0)
    rows = []
    for s in specs:
        final = acc[s][:, -1]
        auc = acc[s].mean(axis=1)
        delta = auc - acc["random"].mean(axis=1)
        need = labels_to_reach(labels, acc[s].mean(axis=0), target)
        sav = savings(labels, acc["random"], acc[s], rng) if s != "random" else (0.0, 0.0, 0.0)
        rows.append({
            "strategy": s, "labels": int(labels[-1]), "final": float(final.mean()),
            "final_ci": float(half * final.std(ddof=1)) if seeds > 1 else None, "auc": float(auc.mean()),
            "delta_auc": float(delta.mean()), "delta_ci": float(half * delta.std(ddof=1)) if seeds > 1 else None,
            "labels_to_target": need, "savings": sav,
            "tie_rate": float(np.mean([r["ties"] / r["spent"] for r in results[s]])),
            "seconds": float(np.mean([r["seconds"] for r in results[s]])),
            "curve": acc[s].mean(axis=0).tolist(),
        })
        if "allocations" in results[s][0]:  # an adaptive strategy: labels per arm and its last allocation
            arms = list(results[s][0]["arm_labels"])
            rows[-1]["arm_labels"] = {a: float(np.mean([r["arm_labels"][a] for r in results[s]])) for a in arms}
            last = [r["allocations"][-1]["allocation"] for r in results[s]]
            first = [r["allocations"][0]["allocation"] for r in results[s]]
            rows[-1]["first_allocation"] = {a: float(np.mean([x.get(a, 0) for x in first])) for a in arms[:-1]}
            rows[-1]["final_allocation"] = {a: float(np.mean([x.get(a, 0) for x in last])) for a in arms[:-1]}
    return {"dataset": name, "labels": labels.tolist(), "target": float(target), "seeds": seeds, "rows": rows,
            "kind": task.kind}


def fmt_savings(sav) -> str:
    point, low, high = sav

    def pct(x):
        return "−∞" if not np.isfinite(x) else f"{100 * x:+.0f}%"

    return f"{pct(point)} [{pct(low)}, {pct(high)}]"


def print_table(summary: dict, header: str) -> None:
    print(f"\n## {summary['dataset']}: {header}")
    print(f"target = random's final quality {summary['target']:.3f}; {summary['seeds']} seeds\n")
    qa = summary["kind"] == "preference" and any(r["tie_rate"] > 0 for r in summary["rows"])
    head = (f"| {'strategy':<34} | labels | final ± 95% CI  |  AUC  | ΔAUC vs random (paired) | labels to target |"
            f" savings [95% CI]      |{' ties |' if qa else ''} s/run |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in summary["rows"]:
        need = "—" if r["labels_to_target"] is None else f"{r['labels_to_target']:.0f}"
        ci = f"{r['final_ci']:.3f}" if r["final_ci"] is not None else "nan"
        dci = f"{r['delta_ci']:.3f}" if r["delta_ci"] is not None else "nan"
        sav = "(baseline)" if r["strategy"] == "random" else fmt_savings(r["savings"])
        ties = f" {100 * r['tie_rate']:3.0f}% |" if qa else ""
        print(f"| {r['strategy']:<34} | {r['labels']:>6} | {r['final']:.3f} ± {ci} | {r['auc']:.3f} |"
              f" {r['delta_auc']:+.3f} ± {dci}          | {need:>16} | {sav:<21} |{ties} {r['seconds']:5.1f} |")
    for r in summary["rows"]:
        if "final_allocation" in r:
            print(f"\n{r['strategy']}: labels per arm over the rounds (mean over seeds): "
                  + ", ".join(f"{a} {n:.1f}" for a, n in r["arm_labels"].items())
                  + "; first round's allocation: " + ", ".join(f"{a} {n:.1f}" for a, n in r["first_allocation"].items())
                  + "; last round's allocation: " + ", ".join(f"{a} {n:.1f}" for a, n in r["final_allocation"].items()))
    print("\nmean quality by labels used:")
    print(f"{'strategy':<36} " + " ".join(f"{n:>6}" for n in summary["labels"]))
    for r in summary["rows"]:
        print(f"{r['strategy']:<36} " + " ".join(f"{a:>6.3f}" for a in r["curve"]))


def goals(summaries: list[dict], default: dict[str, str]) -> None:
    """The issue's goals, per dataset: the best strategy by savings; every strategy that saves ≥ 30 % with its
    CI above 0 (a dataset meets the goal when one does — with several strategies compared, one may pass by chance,
    so the count compared is printed); the configs' default never significantly worse than random."""
    print("\n## goals")
    met = 0
    for s in summaries:
        rows = [r for r in s["rows"] if r["strategy"] != "random"]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["savings"][0])
        passing = [r for r in rows if r["savings"][0] >= 0.30 and r["savings"][1] > 0]
        met += bool(passing)
        print(f"- {s['dataset']}: best {best['strategy']} saves {fmt_savings(best['savings'])}; "
              f"≥ 30 % with CI > 0: " + (", ".join(f"{r['strategy']} {fmt_savings(r['savings'])}" for r in passing)
                                         or "none") + f" (of {len(rows)} strategies compared)")
        d = next((r for r in s["rows"] if r["strategy"] == default.get(s["dataset"])), None)
        if d is not None:
            worse = d["delta_ci"] is not None and d["delta_auc"] + d["delta_ci"] < 0
            print(f"  default {d['strategy']}: ΔAUC {d['delta_auc']:+.3f} ± {d['delta_ci']:.3f} "
                  f"({'significantly WORSE than random' if worse else 'not significantly worse than random'})")
    print(f"- savings goal met on {met} of {len(summaries)} datasets (needed: 2)")


# The adaptive protocol (the docstring's "Adaptive strategy" section): the row the goals are about, the shipped-form
# candidates a default is chosen from when it fails, and the tolerance to the best fixed strategy.
ADAPTIVE_ROW = "adaptive@0.25"
DEFAULT_CANDIDATES = ("low_logprob@0.25", "entropy@0.25", "kcenter@0.25", "reward_disagreement|kcenter@0.25",
                      "adaptive@0.25")
WITHIN = 0.005


def _parts(text: str) -> tuple[str, str]:
    head, _, chooser = text.partition("/")
    return head, chooser or "random"


def adaptive_goals(summaries: list[dict]) -> dict:
    """The issue's goals for `ADAPTIVE_ROW` (with the configs' chooser on multi-answer data), per dataset: G1 not
    significantly worse than random (ΔAUC + CI ≥ 0), G2 ΔAUC ≥ the best fixed strategy's − WITHIN (fixed: every
    row but random and adaptive ones, on qa-feedback those with the configs' chooser), G3 savings ≥ 30 % with the
    CI's low end > 0 (needed on ≥ 2 datasets); then the default by the rule fixed beforehand: the adaptive row when
    every goal is met, else of `DEFAULT_CANDIDATES` run on every dataset, those never significantly worse than
    random, the one with the highest worst-dataset ΔAUC. Prints the verdicts and returns them."""
    print("\n## adaptive strategy: goals fixed before running")
    verdict: dict = {"datasets": {}, "default": None}
    minima: dict[str, list[float]] = {}
    for s in summaries:
        chooser = CONFIG_CHOOSER if s.get("kind") == "preference" and any(
            "/" in r["strategy"] for r in s["rows"]) else "random"
        rows = {r["strategy"]: r for r in s["rows"]}
        name = ADAPTIVE_ROW + (f"/{chooser}" if chooser != "random" else "")
        fixed = [r for r in s["rows"] if _parts(r["strategy"])[0] != "random"
                 and not _parts(r["strategy"])[0].startswith("adaptive") and _parts(r["strategy"])[1] == chooser]
        for cand in DEFAULT_CANDIDATES:
            row = rows.get(cand + (f"/{chooser}" if chooser != "random" else ""))
            if row is not None:
                worse = row["delta_ci"] is not None and row["delta_auc"] + row["delta_ci"] < 0
                minima.setdefault(cand, []).append(-np.inf if worse else row["delta_auc"])
        a = rows.get(name)
        if a is None or not fixed:
            print(f"- {s['dataset']}: no {name} row or no fixed strategy row: not judged")
            continue
        best = max(fixed, key=lambda r: r["delta_auc"])
        g1 = a["delta_ci"] is not None and a["delta_auc"] + a["delta_ci"] >= 0
        g2 = a["delta_auc"] >= best["delta_auc"] - WITHIN
        g3 = a["savings"][0] >= 0.30 and a["savings"][1] > 0
        verdict["datasets"][s["dataset"]] = {"not_worse": g1, "near_best": g2, "saves": g3}
        print(f"- {s['dataset']}: {name} ΔAUC {a['delta_auc']:+.3f} ± {a['delta_ci']:.3f} — G1 not significantly "
              f"worse than random: {'PASS' if g1 else 'FAIL'}; G2 within {WITHIN} of the best fixed "
              f"({best['strategy']} {best['delta_auc']:+.3f} ± {best['delta_ci']:.3f}, of {len(fixed)}): "
              f"{'PASS' if g2 else 'FAIL'} (gap {a['delta_auc'] - best['delta_auc']:+.3f}); savings "
              f"{fmt_savings(a['savings'])}: {'≥ 30 % with CI > 0' if g3 else 'not ≥ 30 % with CI > 0'}")
    judged = verdict["datasets"].values()
    n_saves = sum(v["saves"] for v in judged)
    met = len(judged) == len(summaries) and all(v["not_worse"] and v["near_best"] for v in judged) and n_saves >= 2
    verdict["met"] = met
    print(f"- G1 on every dataset: {all(v['not_worse'] for v in judged)}; G2 on every dataset: "
          f"{all(v['near_best'] for v in judged)}; G3 on {n_saves} of {len(judged)} (needed: 2) → goals "
          f"{'MET' if met else 'NOT met'}")
    complete = {c: m for c, m in minima.items() if len(m) == len(summaries)}
    eligible = {c: min(m) for c, m in complete.items() if np.isfinite(min(m))}
    if met:
        verdict["default"] = ADAPTIVE_ROW
    elif eligible:
        top = max(eligible.values())
        verdict["default"] = next((c for c in eligible if eligible[c] == top and c == CONFIG_DEFAULT),
                                  next(c for c in eligible if eligible[c] == top))
    print("- never significantly worse than random on every dataset (worst-dataset ΔAUC): "
          + (", ".join(f"{c} {v:+.3f}" for c, v in sorted(eligible.items(), key=lambda kv: -kv[1])) or "none")
          + f" → default by the rule: {verdict['default'] or 'none (keep the current one)'}")
    return verdict


# ----------------------------------------------------------------------------------------------------- main
FEATURES = {  # --features: name → the task's feature arrays ("emb", plus "logprob"/"entropy" for LM features)
    "tfidf": lambda task, progress, dtype: tfidf_features(task),  # no model: no precision
    "smollm2": smollm2_features,
    "minilm": minilm_features,  # the shipped configs' embedder, the answer's text alone (as rounds embed it)
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=[*PRESETS, "all"], default="all")
    ap.add_argument("--data", type=Path, help="another file of the same shape as --format (overrides --dataset)")
    ap.add_argument("--format", choices=list(LOADERS), help="shape of --data")
    ap.add_argument("--features", choices=tuple(FEATURES), default="tfidf")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="precision of the model features (smollm2, minilm): auto = bf16 only where the hardware "
                         "computes it natively, else fp32; part of the feature cache key and printed in the header")
    ap.add_argument("--strategies", help="comma-separated specs (default: per format, see the docstring)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--budget", type=int, help="labels per round")
    ap.add_argument("--init", type=int, help="random labels every strategy starts from")
    ap.add_argument("--test", type=float, help="test prompts: a count, or a share of the file when < 1 (moderation: "
                                               "the share of each slice; default 0.25 of a --data file, 0.5 moderation)")
    ap.add_argument("--rare-share", type=float, default=0.05,
                    help="moderation: each harm slice keeps at most this share × benign prompts in the pool")
    ap.add_argument("--members", type=int, default=5, help="ensemble members of the learner")
    ap.add_argument("--c", type=float, default=0.02, help="inverse L2 strength of the learners' logistic regressions")
    ap.add_argument("--candidate-factor", type=float, default=4.0, help="hybrid: top factor·k, then k-center")
    ap.add_argument("--near-duplicate", type=float, default=0.98, help="chooser: cosine of near-identical answers")
    ap.add_argument("--json", type=Path, help="also write the tables as JSON here")
    ap.add_argument("--report", type=Path, nargs="+", help="print the tables and goals of earlier --json files")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if (args.data is None) != (args.format is None):
        ap.error("--data and --format go together")
    return args


def configure(args, name: str) -> argparse.Namespace:
    preset = dict(PRESETS.get(name, {}))
    out = argparse.Namespace(**vars(args))
    for key in ("rounds", "budget", "init", "test"):
        if getattr(out, key) is None:
            default = preset.get(key, {"rounds": 8, "budget": 25, "init": 25}.get(key))
            if key == "test" and default is None:
                default = 0.5 if args.format == "moderation" else 0.25
            setattr(out, key, default)
    if out.data is None:
        out.data, out.format = preset["data"], preset["format"]
    for key in ("rounds", "budget", "init", "seeds"):
        if getattr(out, key) < 1:
            raise CurateError(f"--{key} must be ≥ 1, got {getattr(out, key)}")
    return out


def check_signals(specs: list[Spec], features: str) -> None:
    have = {"reward_margin", "reward_disagreement", EMBEDDING} | (LM_SIGNALS if features == "smollm2" else set())
    for spec in specs:
        adaptive = find_adaptive(spec.strategy)
        if adaptive is not None:  # arms whose signals are missing sit the rounds out; two must be left
            usable = [n for n, a in adaptive.arms.items() if set(a.inputs) <= have]
            if len(usable) < 2:
                raise CurateError(f"--strategies {spec.text}: only {usable or 'none'} of its arms have their signals "
                                  f"with --features {features}; use --features smollm2")
            continue
        missing = sorted(set(spec.strategy.inputs) - have)
        if missing:
            raise CurateError(f"--strategies {spec.text}: needs the signal(s) {', '.join(missing)}, which --features "
                              f"{features} does not give; use --features smollm2 or drop it")


def main(argv=None) -> int:
    from preference.plumbing.hardware import describe, resolve_dtype

    args = parse_args(argv)
    if args.report:
        summaries = [s for path in args.report for s in json.loads(path.read_text())]
        for summary in summaries:
            print_table(summary, summary["header"])
        goals(summaries, {s["dataset"]: s["default"] for s in summaries})
        adaptive_goals(summaries)
        return 0
    names = ["custom"] if args.data is not None else (list(PRESETS) if args.dataset == "all" else [args.dataset])
    print(f"hardware: {describe()}")
    summaries, defaults = [], {}
    for name in names:
        cfg = configure(args, name)
        task = LOADERS[cfg.format](cfg.data)
        if name == "custom":
            name = task.name
            if cfg.format == "moderation" and cfg.test >= 1:
                raise CurateError("--test for --format moderation is the share of each slice held out, e.g. 0.5")
        lm = ",".join(f"{s}/{CONFIG_CHOOSER}" if cfg.format == "qa-feedback" else s for s in LM_STRATEGIES.split(","))
        text = cfg.strategies or DEFAULT_STRATEGIES[cfg.format] + ("," + lm if cfg.features == "smollm2" else "")
        specs = [Spec.parse(s.strip(), cfg.candidate_factor) for s in text.split(",") if s.strip()]
        if "random" not in [s.text for s in specs]:
            specs.insert(0, Spec.parse("random", cfg.candidate_factor))
        check_signals(specs, cfg.features)
        make_split(task, cfg, 0)  # too few rows for the protocol: say so before minutes of feature extraction
        defaults[name] = CONFIG_DEFAULT + (f"/{CONFIG_CHOOSER}" if cfg.format == "qa-feedback" else "")
        t0 = time.perf_counter()
        feats = FEATURES[cfg.features](task, progress=not cfg.quiet, dtype=cfg.dtype)
        precision = "" if cfg.features == "tfidf" else f" {resolve_dtype(cfg.dtype)}"
        header = (f"{len(task)} items from {cfg.data}, features {cfg.features}{precision} ({feats['emb'].shape[1]}-d, "
                  f"{time.perf_counter() - t0:.0f} s); init {cfg.init} + {cfg.rounds} rounds × {cfg.budget} labels, "
                  f"test {cfg.test}, learner: {cfg.members} members, C = {cfg.c}")
        if not cfg.quiet:
            print(f"{name}: {header}", flush=True)
        results: dict[str, list] = {s.text: [] for s in specs}
        for seed in range(cfg.seeds):
            split = make_split(task, cfg, seed)
            for spec in specs:
                results[spec.text].append(run(task, feats, spec, split, cfg, seed))
            if not cfg.quiet:
                print(f"  seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.json:  # the raw curves first: a table bug must not lose an hour of runs
            raw = args.json.with_name(args.json.stem + f"-{name}-raw.json")
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text(json.dumps({k: [{**r, "curve": r["curve"]} for r in v] for k, v in results.items()}))
        summary = summarize(name, task, results, cfg)
        summary["header"], summary["default"] = header, defaults[name]
        summaries.append(summary)
        print_table(summary, header)
    goals(summaries, defaults)
    adaptive_goals(summaries)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CurateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
