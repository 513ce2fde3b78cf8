"""What each arm's labels are worth: the strategy arm(s) against the random arm, on the labels that came back.

Every round picks most of its items with the strategy (or, with `adaptive`, with several strategies: each
selected row's `strategy` column names the arm that picked it) and the rest at random from the same pool. This
module reads what the rounds wrote — `select/selected.parquet` (the arm of every item), `pull/pairs.parquet` (the
pairs that came back), `score/completion_scores.parquet` (the answers' embeddings), `pull/agreement.json`
(reviewer agreement per item) and `evaluate/pair_scores.parquet` (the reward model's verdict on each pair) — and
says, per round and cumulatively:

- per arm: items asked, pairs back, the share of items that came back without any pair (a tie or no answer: a
  spent label that teaches nothing), the reviewers' mean Kendall τ on the arm's items, the reward model's accuracy
  on the arm's pairs — each with a 95 % interval (Wilson for shares, t for means);
- the measured value of a label: `curation.acquisition.strategies.measure_round` — a Bradley–Terry model's held-out
  log-likelihood on the random arm's labels with vs without the arm's batch, per label spent — and from it one
  sentence that claims no more than the data support: "so far the N selected labels are worth M ± E random ones"
  only when the selected labels' value differs from the random ones' with the 95 % interval excluding 0 (and the
  random labels' value is itself measurably positive), else "not yet distinguishable from random".

`round_label_log` is also what the `adaptive` strategy's select step measures its arms on (`curation.steps.select`).
"""

from __future__ import annotations

import math

import numpy as np

from curation.acquisition.ensemble import Pairs, heldout_loglik
from curation.acquisition.strategies import CONTROL, Heldout, LabelLog, measure_round
from preference.plumbing.io import read_json, read_rows

STRATEGY = "strategy"  # every non-random arm pooled


def _rows(rnd, step: str, name: str) -> list[dict]:
    s = rnd.step(step)
    path = s.path / name
    return read_rows(path) if s.done and path.is_file() else []


def selected_arms(rnd) -> dict[str, str]:
    """prompt id → the arm that picked it in `rnd` (`CONTROL` for the random arm, else the `strategy` column:
    the strategy's name, or with `adaptive` the portfolio arm's)."""
    return {row["prompt_id"]: CONTROL if row.get("arm") == "random" else str(row.get("strategy") or STRATEGY)
            for row in _rows(rnd, "select", "selected.parquet")}


def round_label_log(rounds: list) -> tuple[LabelLog, Pairs | None]:
    """The label log of `rounds` (any order; rounds without a finished select + pull are skipped): one unit per
    pair that came back, its arm and round, and per (round, arm) the items asked; with the pairs' answer
    embeddings (from each round's scores; rounds whose embeddings have another dimension than the newest's are
    left out)."""
    from preference.plumbing.io import read_scores

    arms, numbers, chosen, rejected, spent = [], [], [], [], {}
    dim = None
    for r in sorted(rounds, key=lambda x: -x.number):
        if not (r.step("select").done and r.step("pull").done and r.step("score").done):
            continue
        scores = r.step("score").path / "completion_scores.parquet"
        if not scores.is_file():  # a score step without completions: no embeddings for its pairs
            continue
        arm_of = selected_arms(r)
        table, emb = read_scores(scores)
        if emb is None or (dim is not None and emb.shape[1] != dim):
            continue
        dim = emb.shape[1]
        index = {cid: i for i, cid in enumerate(table.column("completion_id").to_pylist())}
        for arm in arm_of.values():
            spent[(r.number, arm)] = spent.get((r.number, arm), 0) + 1
        for row in _rows(r, "pull", "pairs.parquet"):
            a, b = index.get(row.get("chosen_id")), index.get(row.get("rejected_id"))
            if a is None or b is None:
                continue
            arms.append(arm_of.get(row.get("prompt_id"), "other"))
            numbers.append(r.number)
            chosen.append(emb[a])
            rejected.append(emb[b])
    log = LabelLog(np.array(arms, dtype=object), np.array(numbers, dtype=np.int64), spent)
    return log, (Pairs(np.stack(chosen), np.stack(rejected)) if chosen else None)


def pair_heldout(pairs: Pairs | None, c: float) -> Heldout:
    """score(train, test) over the units of a label log built with `pairs` (`curation.acquisition.ensemble.heldout_loglik`)."""

    def score(train: np.ndarray, test: np.ndarray) -> float:
        if pairs is None:
            return float("nan")
        return heldout_loglik(pairs.subset(np.asarray(train, dtype=np.int64)),
                              pairs.subset(np.asarray(test, dtype=np.int64)), c)

    return score


# ------------------------------------------------------------------------------------------------- intervals
def wilson(successes: int, n: int) -> tuple[float | None, float | None, float | None]:
    """(share, low, high): the 95 % Wilson interval of a share (None without observations)."""
    if n == 0:
        return None, None, None
    z, p = 1.959964, successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of its 95 % t-interval; None with fewer than 2 values)."""
    from scipy.stats import t as student_t

    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return None, None
    if len(v) < 2:
        return float(v.mean()), None
    return float(v.mean()), float(student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


# ---------------------------------------------------------------------------------------------------- report
def arm_rows(rounds: list) -> list[dict]:
    """Per arm, over `rounds` (pooled): items asked, pairs back, no-pair share, reviewer τ, reward-model accuracy
    on the arm's pairs, each with its interval. Rounds whose pull has not run count only their items asked."""
    stats: dict[str, dict] = {}
    for r in rounds:
        arm_of = selected_arms(r)
        pulled = r.step("pull").done
        pairs = _rows(r, "pull", "pairs.parquet")
        with_pairs = {p.get("prompt_id") for p in pairs}
        agreement = read_json(r.step("pull").file("agreement.json")) if pulled and \
            r.step("pull").file("agreement.json").is_file() else {}
        taus = agreement.get("items") if isinstance(agreement.get("items"), dict) else {}
        verdicts = [x for x in _rows(r, "evaluate", "pair_scores.parquet") if x.get("split") == "train"]
        for pid, arm in arm_of.items():
            s = stats.setdefault(arm, {"asked": 0, "pulled": 0, "no_pair": 0, "pairs": 0, "tau": [], "rm": []})
            s["asked"] += 1
            if pulled:
                s["pulled"] += 1
                s["no_pair"] += pid not in with_pairs
                if taus.get(pid) is not None:
                    s["tau"].append(float(taus[pid]))
        for p in pairs:
            arm = arm_of.get(p.get("prompt_id"))
            if arm in stats:
                stats[arm]["pairs"] += 1
        for x in verdicts:
            arm = arm_of.get(x.get("prompt_id"))
            if arm in stats:
                stats[arm]["rm"].append(float(bool(x.get("correct"))))
    out = []
    for arm in sorted(stats, key=lambda a: (a == CONTROL, a)):
        s = stats[arm]
        tie, tie_lo, tie_hi = wilson(s["no_pair"], s["pulled"])
        rm, rm_lo, rm_hi = wilson(int(sum(s["rm"])), len(s["rm"]))
        tau, tau_ci = mean_ci(s["tau"])
        out.append({"arm": arm, "asked": s["asked"], "pairs": s["pairs"], "no_pair": tie, "no_pair_ci": (tie_lo, tie_hi),
                    "tau": tau, "tau_ci": tau_ci, "tau_n": len(s["tau"]), "rm_accuracy": rm,
                    "rm_accuracy_ci": (rm_lo, rm_hi), "rm_n": len(s["rm"])})
    return out


def measured_worth(rounds: list, c: float, seed: int = 0) -> dict:
    """The selected labels (every non-random arm pooled) against the random ones, measured round by round
    (`measure_round`, on the random arm's labels of the other rounds), and the claim the data support."""
    log, pairs = round_label_log(rounds)
    log.arm = np.where(log.arm == CONTROL, CONTROL, np.where(log.arm == "other", "other", STRATEGY)).astype(object)
    spent: dict[tuple[int, str], int] = {}
    for (r, a), n in log.spent.items():
        key = (r, CONTROL if a == CONTROL else STRATEGY)
        spent[key] = spent.get(key, 0) + n
    log.spent = spent
    heldout = pair_heldout(pairs, c)
    per_round = []
    for number in sorted({r for r, _ in log.spent}):
        ms = {m["arm"]: m for m in measure_round(log, number, [STRATEGY], heldout,
                                                 np.random.default_rng([seed, number]))}
        if STRATEGY in ms and CONTROL in ms:
            per_round.append({"round": number, "strategy": ms[STRATEGY]["value"], "random": ms[CONTROL]["value"],
                              "strategy_labels": ms[STRATEGY]["labels"], "test": ms[STRATEGY]["test"]})
    selected = sum(n for (_, a), n in log.spent.items() if a == STRATEGY)
    return {"rounds": per_round, "selected_labels": selected, **worth_claim(per_round, selected)}


def worth_claim(per_round: list[dict], selected: int) -> dict:
    """The sentence about the selected labels, from per-round values per label (strategy, random). A claim of
    worth needs ≥ 2 measured rounds, the mean difference's 95 % interval excluding 0 and the random labels' value
    interval above 0 (so the ratio means something); the ± is the delta-method 95 % interval of N·ratio."""
    n = len(per_round)
    if n == 0:
        return {"claim": None, "sentence": "not yet measurable: the random arm's labels of at least two rounds are "
                                           "needed to test each round's labels on labels they did not choose"}
    s = np.array([p["strategy"] for p in per_round])
    r = np.array([p["random"] for p in per_round])
    diff, diff_ci = mean_ci((s - r).tolist())
    rand, rand_ci = mean_ci(r.tolist())
    out = {"difference": diff, "difference_ci": diff_ci, "random_value": rand, "random_value_ci": rand_ci,
           "measured_rounds": n}
    if diff_ci is None or rand_ci is None or abs(diff) <= diff_ci or rand - rand_ci <= 0:
        ci = "n/a with one round" if diff_ci is None else f"± {1000 * diff_ci:.2f}"
        out.update(claim=None, sentence=(
            f"not yet distinguishable from random (selected − random value per label: {1000 * diff:+.2f} {ci} "
            f"mnats of held-out log-likelihood, over {n} measured round{'s' if n > 1 else ''})"))
        return out
    ratio = s.mean() / r.mean()
    cov = np.cov(np.vstack([s, r]), ddof=1) / n
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio * ratio * cov[1, 1]) / (r.mean() ** 2)
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1) * math.sqrt(max(var, 0.0)) * selected)
    worth = float(ratio * selected)
    out.update(claim={"worth": worth, "worth_ci": half, "ratio": float(ratio)}, sentence=(
        f"so far the {selected} selected labels are worth {worth:.0f} ± {half:.0f} random ones (value per label "
        f"measured on the random arm's labels over {n} rounds)"))
    return out


def arms_report(rnd, c: float = 0.02, seed: int = 0) -> dict:
    """Per round (oldest first, up to `rnd`) and cumulatively: the arm rows and the measured worth."""
    rounds = list(reversed([rnd, *rnd.earlier()]))
    per_round = [{"round": r.number, "arms": arm_rows([r])} for r in rounds if r.step("select").done]
    return {"per_round": per_round, "cumulative": arm_rows(rounds), "worth": measured_worth(rounds, c, seed)}


def _share(value, ci) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f} % [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def arm_line(row: dict) -> str:
    """One arm in words: asked, pairs, no-pair share, τ and the reward model's accuracy with their intervals."""
    tau = "-" if row["tau"] is None else f"{row['tau']:.2f}" + ("" if row["tau_ci"] is None else
                                                                 f" ± {row['tau_ci']:.2f}")
    return (f"{row['arm']}: {row['asked']} asked, {row['pairs']} pairs, no pair (tie / unanswered) "
            f"{_share(row['no_pair'], row['no_pair_ci'])}, reviewer τ {tau} (n={row['tau_n']}), reward model "
            f"accuracy on its pairs {_share(row['rm_accuracy'], row['rm_accuracy_ci'])} (n={row['rm_n']})")
