"""Per-round report: one self-contained HTML file (PNG plots embedded, no server) plus a terminal summary.

It reads only what the round's finished steps wrote, so it can be produced at any point of a round; sections of
steps that have not run say so. Sections: steps and their wall time, pool, score distributions (heavy-tailed
scores such as perplexity on a log axis), selection (what was picked and why, with prompt and answer snippets),
annotation (progress, agreement), pairs, training curves, evaluation vs champion (with CIs), and across rounds:
labels used vs held-out accuracy, strategy arm vs random arm.

The page fits a 1200 px browser window: figures scale down with the page, long table cells wrap.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.acquisition.budget import learning_curve
from preference.plumbing.console import wall_time
from preference.plumbing.io import read_json, read_rows, write_text


@dataclass
class Section:
    title: str
    lines: list[str]
    figures: list[bytes]
    table: list[dict[str, Any]] | None = None
    pre: str | None = None  # preformatted text (e.g. the evaluation tables with CIs)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(rnd, step: str, name: str) -> list[dict] | None:
    s = rnd.step(step)
    path = s.path / name
    return read_rows(path) if s.done and path.is_file() else None


def _json(rnd, step: str, name: str) -> Any:
    s = rnd.step(step)
    path = s.path / name
    return read_json(path) if s.done and path.is_file() else None


def _counts(rnd, step: str) -> dict:
    s = rnd.step(step)
    return s.manifest().get("counts", {}) if s.done else {}


def section_steps(rnd) -> Section:
    """Every step the round has started: status and wall time (the manifests' `seconds`), with its share of the
    total, in the order the steps started (a step's folder appears when it starts)."""
    started = {r["step"]: r.get("started_at") or "~" for r in rnd.project.status() if r["round"] == rnd.number}
    present = [p.name for p in rnd.path.iterdir() if p.is_dir()] if rnd.path.is_dir() else []
    order = sorted(set(present) | set(started), key=lambda n: (started.get(n, "~"), n))
    rows, total = [], 0.0
    for name in order:
        step = rnd.step(name)
        seconds = step.manifest().get("seconds") if step.done else None
        total += seconds or 0.0
        status = "done" if step.done else ("incomplete" if step.path.is_dir() else "not run")
        rows.append({"step": name, "status": status, "seconds": seconds})
    for row in rows:
        share = f"{100 * row['seconds'] / total:.0f} %" if total and row["seconds"] is not None else ""
        row.update(wall=wall_time(row.pop("seconds")), share=share)
    done = sum(r["status"] == "done" for r in rows)
    slowest = sorted((r for r in rows if r["share"]), key=lambda r: -float(r["share"].rstrip(" %")))[:2]
    lines = [f"{done} of {len(rows)} steps finished; wall time so far {wall_time(total)}"
             + (" (most: " + ", ".join(f"{r['step']} {r['share']}" for r in slowest) + ")" if slowest else "")]
    return Section("Steps and wall time", lines, [], rows)


def section_pool(rnd) -> Section:
    c = _counts(rnd, "pool")
    if not c:
        return Section("Pool", ["pool step has not run"], [])
    lines = [f"{k.replace('_', ' ')}: {v}" for k, v in c.items()]
    return Section("Pool", lines, [])


SIGNALS = ("prompt_perplexity", "mean_logprob", "mean_entropy", "committee_disagreement", "vote_entropy",
           "semantic_spread")
NOT_SIGNALS = ("prompt_id", "slice", "embedding")
PANELS_PER_ROW = 3


def _signal_columns(rows: list[dict]) -> list[str]:
    """The known signals first, then any other numeric per-prompt score a scorer added."""
    numeric = [k for k, v in rows[0].items() if k not in NOT_SIGNALS and isinstance(v, int | float)
               and not isinstance(v, bool)]
    return [c for c in SIGNALS if c in numeric] + [c for c in numeric if c not in SIGNALS]


def _log_scale(column: str, finite: np.ndarray) -> bool:
    """Heavy-tailed positive scores (perplexities; anything spanning 3+ orders of magnitude) get a log axis."""
    if not finite.size or finite.min() <= 0:
        return False
    return "perplexity" in column or finite.max() / finite.min() > 1000


def _log_axis(ax) -> None:
    """A log x axis labelled at 1-2-5 steps in plain numbers (no crowded 4.8×10² minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def section_scores(rnd) -> Section:
    rows = _rows(rnd, "score", "prompt_scores.parquet")
    if not rows:
        return Section("Score distributions", ["score step has not run"], [])
    selected = {r["prompt_id"] for r in (_rows(rnd, "select", "selected.parquet") or [])}
    cols = _signal_columns(rows)
    plt = _plt()
    n_rows = -(-len(cols) // PANELS_PER_ROW)
    fig, axes = plt.subplots(n_rows, PANELS_PER_ROW, figsize=(3.7 * PANELS_PER_ROW, 2.5 * n_rows), squeeze=False)
    lines = []
    for ax, col in zip(axes.flat, cols, strict=False):
        values = np.array([r[col] for r in rows], dtype=float)
        picked = np.array([r[col] for r in rows if r["prompt_id"] in selected], dtype=float)
        finite = values[np.isfinite(values)]
        log = _log_scale(col, finite)
        if not finite.size:
            bins = 20
        elif log:
            bins = np.geomspace(finite.min(), finite.max() * (1 + 1e-9), 21)
        else:
            bins = np.histogram_bin_edges(finite, bins=20)
        ax.hist(finite, bins=bins, color="#9ab", label="pool")
        if picked.size:
            ax.hist(picked[np.isfinite(picked)], bins=bins, color="#d62", alpha=0.8, label="selected")
        if log:
            _log_axis(ax)
        ax.set_title(col + (" (log axis)" if log else ""), fontsize=9)
        ax.tick_params(labelsize=7)
        if finite.size:
            lines.append(f"{col}: median {np.median(finite):.3g} (IQR {np.percentile(finite, 25):.3g}–"
                         f"{np.percentile(finite, 75):.3g}), n={finite.size}")
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return Section("Score distributions", lines, [_png(fig)])


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def snippet(text: str, limit: int = 140) -> str:
    """One line of at most `limit` characters (control characters shown as �)."""
    flat = " ".join(_CONTROL.sub("\ufffd", str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _last_user(messages) -> str:
    users = [m.get("content", "") for m in messages or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def _shown_answers(rnd, prompt_ids: set[str], selected: list[dict]) -> dict[str, list[dict]]:
    """prompt id → the answers reviewers see: the pushed records when push ran, else `completion_ids`
    (select's choice), else the prompt's first generated completions."""
    push = rnd.step("push")
    if push.done and (push.path / "records.jsonl").is_file():
        from preference.plumbing.io import read_jsonl

        return {r["record_id"]: r.get("completions") or [] for r in read_jsonl(push.path / "records.jsonl")
                if r.get("record_id") in prompt_ids}
    completions = _rows(rnd, "generate", "completions.parquet") or []
    by_id = {c["id"]: c for c in completions}
    by_prompt: dict[str, list[dict]] = {}
    for c in completions:
        if c["prompt_id"] in prompt_ids:
            by_prompt.setdefault(c["prompt_id"], []).append(c)
    for row in selected:
        ids = row.get("completion_ids")
        if ids is not None and len(ids):
            by_prompt[row["prompt_id"]] = [by_id[i] for i in ids if i in by_id]
    return by_prompt


ANSWERS_SHOWN = 3


def section_selection(rnd) -> Section:
    rows = _rows(rnd, "select", "selected.parquet")
    if not rows:
        return Section("Selection", ["select step has not run"], [])
    arms: dict[str, int] = {}
    strategies: dict[str, int] = {}
    for r in rows:
        arms[r.get("arm", "?")] = arms.get(r.get("arm", "?"), 0) + 1
        strategies[r.get("strategy", "?")] = strategies.get(r.get("strategy", "?"), 0) + 1
    lines = [f"selected {len(rows)} items: " + ", ".join(f"{k}={v}" for k, v in sorted(arms.items())),
             "strategies: " + ", ".join(f"{k}={v}" for k, v in sorted(strategies.items()))]
    ids = {r["prompt_id"] for r in rows}
    prompts = {p["id"]: _last_user(p.get("messages")) for p in (_rows(rnd, "pool", "prompts.parquet") or [])
               if p["id"] in ids}
    answers = _shown_answers(rnd, ids, rows)
    table = []
    for r in rows[:50]:
        shown = answers.get(r["prompt_id"], [])
        table.append({
            "rank": r.get("rank"), "arm": r.get("arm"), "score": r.get("score"),
            "prompt": f"{r['prompt_id']} · {r.get('slice', '')}\n{snippet(prompts.get(r['prompt_id'], ''))}",
            "answers shown": "\n".join(f"{i}. {snippet(c.get('text', ''), 90)}"
                                        for i, c in enumerate(shown[:ANSWERS_SHOWN], 1))
                             + (f"\n(+{len(shown) - ANSWERS_SHOWN} more)" if len(shown) > ANSWERS_SHOWN else ""),
            "reason": r.get("reason"),
        })
    adaptive = _json(rnd, "select", "adaptive.json")
    if adaptive:
        lines += adaptive_lines(adaptive)
    return Section("Selection (what and why)", lines, [], table)


def adaptive_lines(state: dict) -> list[str]:
    """The adaptive strategy's state (`select/adaptive.json`) in words: per arm the labels it got before this
    round, its measured value per label with the 95 % interval, this round's picks; and the reason."""
    out = [f"adaptive strategy ({state.get('strategy')}): this round's allocation — {state.get('reason') or 'n/a'}"]
    values = state.get("values") or {}
    for arm in [*state.get("arms", []), "random"]:
        v = values.get(arm) or {}
        value = "not measured yet" if v.get("value") is None else (
            f"value {1000 * v['value']:+.2f}" + ("" if v.get("value_ci") is None else f" ± {1000 * v['value_ci']:.2f}")
            + f" mnats/label over {v.get('measured_rounds')} round(s)"
            + ("" if v.get("relative") is None else f", vs the round's arms {1000 * v['relative']:+.2f}"
               + ("" if v.get("relative_ci") is None else f" ± {1000 * v['relative_ci']:.2f}")))
        picked = (state.get("picked") or {}).get(arm)
        out.append(f"  {arm}: {(state.get('labels_before') or {}).get(arm, 0)} labels before this round, {value}"
                   + ("" if picked is None else f"; picks now {picked}"))
    return out


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def agreement_lines(agreement: dict) -> list[str]:
    """τ and α from a pull step's `agreement.json` (the shape `preference.agreement.agreement_report` writes)."""
    ranking, harm = agreement.get("ranking") or {}, agreement.get("harm") or {}
    lines = [f"Kendall τ between annotators' rankings: mean {_num(ranking.get('kendall_tau_mean'))}, "
             f"min {_num(ranking.get('kendall_tau_min'))} over {ranking.get('annotator_pairs', 0)} (record, "
             "annotator pair) comparisons",
             f"Krippendorff α on harm flags: label sets {_num(harm.get('alpha_nominal_sets'))} (nominal), "
             f"{_num(harm.get('alpha_jaccard_sets'))} (Jaccard), flagged at all {_num(harm.get('alpha_flagged'))}; "
             f"{harm.get('pairable_units', 0)} answers judged by ≥ 2 annotators, flag rate "
             f"{_num(harm.get('flag_rate'), 2)}"]
    per_label = harm.get("alpha_per_label") or {}
    if per_label:
        lines.append("α per harm label: " + ", ".join(f"{k} {_num(v)}" for k, v in sorted(per_label.items())))
    for name, q in sorted((agreement.get("questions") or {}).items()):
        lines.append(f"α on {name} ({q.get('level')}): {_num(q.get('alpha'))}")
    return lines


def section_annotation(rnd) -> Section:
    c = _counts(rnd, "pull")
    if not c:
        pushed = _counts(rnd, "push")
        return Section("Annotation", [f"pushed: {pushed}" if pushed else "push/pull have not run"], [])
    lines = [f"{k.replace('_', ' ')}: {v}" for k, v in c.items()]
    agreement = _json(rnd, "pull", "agreement.json")
    if agreement:
        lines += agreement_lines(agreement)
    return Section("Annotation progress and agreement", lines, [])


REVIEWER_COLUMNS = ("answers", "gold_items", "gold_accuracy", "agreement_with_consensus", "reliability",
                    "reliability_basis", "unreliable", "seconds_per_record", "tau_vs_peers", "harm_flag_rate",
                    "corrections")


def section_reviewers(rnd) -> Section:
    """The reviewer report: agreement, the per-annotator table (gold accuracy, agreement with the consensus,
    reliability, time per record, drift), unreliable annotators and the second-stage review's outcomes."""
    pull = rnd.step("pull")
    if not pull.done:
        return Section("Reviewers", ["pull has not run"], [])
    manifest, counts = pull.manifest(), _counts(rnd, "pull")
    lines = agreement_lines(_json(rnd, "pull", "agreement.json") or {})
    annotators = _json(rnd, "pull", "annotators.json") or {}
    gold = counts.get("gold_records", 0)
    if gold:
        scored = {k: v["gold_accuracy"] for k, v in annotators.items() if v.get("gold_accuracy") is not None}
        lines.append(f"gold: {gold} known-answer records in the queue (kept out of the pairs); accuracy "
                     + (", ".join(f"{k} {v:.2f}" for k, v in sorted(scored.items())) or "n/a (no gold answered)"))
    unreliable = sorted(k for k, v in annotators.items() if v.get("unreliable"))
    if unreliable:
        how = "their answers were left out of the pairs" if counts.get("excluded_unreliable") else \
            "flagged only (aggregation.exclude_unreliable: false)"
        lines.append(f"unreliable annotators: {', '.join(unreliable)}; {how}")
    review = manifest.get("review") or {}
    outcomes = review.get("outcomes") or {}
    lines.append(f"second-stage review: {counts.get('routed_to_review', 0)} records routed"
                 + (f" to {review['dataset']}" if review.get("dataset") else "")
                 + f", {counts.get('reviewed', 0)} reviewed (keep {outcomes.get('keep', 0)}, fix "
                   f"{outcomes.get('fix', 0)}, drop {outcomes.get('drop', 0)}), "
                   f"{counts.get('pairs_from_review', 0)} pairs decided by the review, "
                   f"{counts.get('excluded_low_agreement', 0)} low-agreement records left out unreviewed")
    drifts = [f"{k} {v['drift']['agreement_with_consensus']:+.2f}" for k, v in sorted(annotators.items())
              if (v.get("drift") or {}).get("agreement_with_consensus") is not None]
    if drifts:
        lines.append("drift of agreement with the consensus vs earlier rounds: " + ", ".join(drifts))
    for warning in manifest.get("warnings") or []:
        lines.append(f"warning: {warning}")
    table = [{"annotator": name, **{c: row.get(c) for c in REVIEWER_COLUMNS},
              "drift": (row.get("drift") or {}).get("agreement_with_consensus")}
             for name, row in sorted(annotators.items())]
    return Section("Reviewers", lines, [], table or None)


def section_pairs(rnd) -> Section:
    rows = _rows(rnd, "pull", "pairs.parquet")
    if rows is None:
        return Section("Preference pairs", ["no pairs yet"], [])
    margins = np.array([r.get("margin", 1.0) for r in rows], dtype=float)
    harmful = sum(bool(r.get("rejected_harmful")) for r in rows)
    lines = [f"pairs: {len(rows)} from {len({r['prompt_id'] for r in rows})} prompts",
             f"rejected answer flagged harmful: {harmful}"]
    if margins.size:
        lines.append(f"margin: mean {margins.mean():.2f}, min {margins.min():.2f}, max {margins.max():.2f}")
    return Section("Preference pairs", lines, [])


def _log_history(step_dir: Path) -> list[dict]:
    for name in ("log_history.json", "trainer_state.json"):
        for path in sorted(step_dir.rglob(name)):
            data = read_json(path)
            history = data.get("log_history", data) if isinstance(data, dict) else data
            if isinstance(history, list) and history:
                return history
    return []


def section_training(rnd) -> Section:
    """One loss curve and one summary line per trainer of the table (training/trainers.py)."""
    from training.trainers import TRAINERS

    figs, lines = [], []
    plt = _plt()
    for entry in TRAINERS.values():
        s = rnd.step(entry.step)
        if not s.done:
            lines.append(f"{entry.step}: has not run")
            continue
        manifest = s.manifest()
        if manifest.get("skipped"):
            lines.append(f"{entry.step}: disabled ({entry.kind}.enabled: false)")
            continue
        history = [h for h in _log_history(s.path) if "loss" in h]
        lines.append(f"{entry.step}: " + ", ".join(f"{k}={v}" for k, v in manifest.get("counts", {}).items()))
        if (s.path / "tensorboard").is_dir():
            lines.append(f"{entry.step}: TensorBoard logs in {s.path / 'tensorboard'}")
        if history:
            fig, ax = plt.subplots(figsize=(4.5, 2.6))
            ax.plot([h.get("step", i) for i, h in enumerate(history)], [h["loss"] for h in history], marker=".")
            ax.set_title(f"{entry.step} training loss", fontsize=9)
            ax.set_xlabel("step")
            figs.append(_png(fig))
    return Section("Training", lines, figs)


def section_evaluation(rnd) -> Section:
    """The evaluation tables (accuracy with bootstrap CIs per slice) and the gate's decision vs the champion."""
    lines: list[str] = []
    text = None
    evaluate, gate = rnd.step("evaluate"), rnd.step("gate")
    if evaluate.done and (evaluate.path / "metrics.txt").is_file():
        text = (evaluate.path / "metrics.txt").read_text()
    elif not evaluate.done:
        lines.append("evaluate: has not run")
    decision = _json(rnd, "gate", "decision.json")
    if decision:
        verdict = "PROMOTED" if decision.get("promote") else "not promoted"
        lines.append(f"gate: candidate {decision.get('version')} {verdict} "
                     f"({'; '.join(decision.get('reasons') or [])}); champion now {decision.get('champion')}")
        for metric, c in (decision.get("comparisons") or {}).items():
            champ = "—" if c.get("champion") is None else f"{c['champion']:.3f}"
            delta = "" if c.get("delta") is None else f", delta {c['delta']:+.3f}"
            lines.append(f"{metric}: candidate {c.get('candidate', float('nan')):.3f} vs champion {champ}{delta}")
    elif not gate.done:
        lines.append("gate: has not run")
    return Section("Evaluation vs champion", lines, [], pre=text)


def forecast_lines(curve: dict) -> list[str]:
    """`curation.acquisition.budget.learning_curve` in words: expected gain of the next round, labels to reach X, warnings."""
    def interval(low, high, fmt: str) -> str:
        return "" if low is None or high is None else f" (interval {low:{fmt}} to {high:{fmt}})"

    lines = []
    gain = curve.get("expected_gain_next_round")
    if gain:
        lines.append(f"expected gain of the next round (+{gain['labels']} labels): {gain['accuracy']:+.3f} "
                     f"accuracy" + interval(gain["low"], gain["high"], "+.3f"))
    for reach in curve.get("labels_to_reach") or []:
        if reach["labels"] is None:
            lines.append(f"labels to reach {reach['target']:.3f}: not reachable by the fitted curve (its ceiling "
                         f"is {curve['fit']['a']:.3f})")
        else:
            upper = "∞" if reach["high"] is None else str(reach["high"])
            spread = "" if reach["low"] is None else f" (interval {reach['low']} to {upper})"
            lines.append(f"labels to reach {reach['target']:.3f}: {reach['labels']} ({reach['more_labels']} more)"
                         + spread)
    lines += [f"warning: {curve['warning']}"] if curve.get("warning") else []
    lines += [f"note: {curve['note']}"] if curve.get("note") else []
    return lines


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _nested(data: dict, dotted: str) -> float | None:
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, int | float) and not isinstance(data, bool) else None


def round_points(rnd) -> list[dict]:
    """Per round (oldest first, up to `rnd`; round 0 = the bootstrap), from what its steps wrote: labels imported
    (round 0's labels step: its prompts) and requested per arm (select), cumulative labels, held-out reward accuracy with its CI (evaluate), and per arm the reviewers' mean
    Kendall τ (pull/agreement.json items) and the trained reward model's accuracy on that arm's pairs
    (evaluate/pair_scores.parquet, split "train": lower = items the model finds harder); and the round's
    agreement from pull/agreement.json: Kendall τ (ranking.kendall_tau_mean) and Krippendorff α over harm flags
    (harm.alpha_nominal_sets)."""
    from training.trainers import with_role

    points, cumulative = [], 0
    for r in reversed([rnd, *rnd.earlier()]):
        selected = _rows(r, "select", "selected.parquet") or []
        arm_of = {row["prompt_id"]: row.get("arm", "strategy") for row in selected}
        labels = {"strategy": 0, "random": 0}
        for arm in arm_of.values():
            labels[arm] = labels.get(arm, 0) + 1
        imported = int(_counts(r, "labels").get("records", 0)) if r.number == 0 else 0  # the bootstrap's prompts
        cumulative += len(selected) + imported
        metrics = _json(r, "evaluate", "metrics.json") or {}
        # the table's first reward-model trainer with metrics (training/trainers.py)
        reward = next((metrics[t.kind] for t in with_role("reward_model") if isinstance(metrics.get(t.kind), dict)),
                      {})
        agreement = _json(r, "pull", "agreement.json") or {}
        taus = agreement.get("items") if isinstance(agreement.get("items"), dict) else {}
        pair_rows = [x for x in (_rows(r, "evaluate", "pair_scores.parquet") or []) if x.get("split") == "train"]
        point = {"round": r.number, "imported": imported,
                 "strategy": labels.get("strategy", 0), "random": labels.get("random", 0),
                 "labels_cumulative": cumulative, "heldout_accuracy": reward.get("accuracy"),
                 "heldout_ci": reward.get("ci"), "kendall_tau": _nested(agreement, "ranking.kendall_tau_mean"),
                 "krippendorff_alpha": _nested(agreement, "harm.alpha_nominal_sets")}
        for arm in ("strategy", "random"):
            point[f"tau_{arm}"] = _mean([v for k, v in taus.items() if arm_of.get(k) == arm])
            point[f"rm_accuracy_{arm}"] = _mean([float(bool(x["correct"])) for x in pair_rows
                                                 if arm_of.get(x["prompt_id"]) == arm])
        points.append(point)
    return points


def _cross_round_figure(points: list[dict], curve: dict | None = None) -> bytes:
    plt = _plt()
    fig, (ax_acc, ax_tau, ax_rm) = plt.subplots(1, 3, figsize=(11.1, 2.9))
    measured = [p for p in points if p["heldout_accuracy"] is not None]
    x = [p["labels_cumulative"] for p in measured]
    y = [p["heldout_accuracy"] for p in measured]
    ci = [p["heldout_ci"] or [a, a] for p, a in zip(measured, y, strict=True)]
    err = np.array([[a - lo for (lo, _), a in zip(ci, y, strict=True)], [hi - a for (_, hi), a in zip(ci, y, strict=True)]])
    ax_acc.errorbar(x, y, yerr=np.clip(err, 0, None), marker="o", capsize=3, color="#357")
    for p in measured:
        ax_acc.annotate(f"r{p['round']}", (p["labels_cumulative"], p["heldout_accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    if curve and curve.get("forecast"):  # the fitted learning curve ahead, with its interval (curation.acquisition.budget)
        f = curve["forecast"]
        ax_acc.plot([q["labels"] for q in f], [q["accuracy"] for q in f], ls="--", color="#357", label="forecast")
        ax_acc.fill_between([q["labels"] for q in f], [q["low"] for q in f], [q["high"] for q in f], color="#357",
                            alpha=0.15, lw=0)
        ax_acc.legend(fontsize=7)
    ax_acc.set_xlabel("labels used (cumulative)", fontsize=8)
    ax_acc.set_title("held-out reward accuracy (95 % CI)", fontsize=9)
    rounds = [p["round"] for p in points]
    for ax, key, title in ((ax_tau, "tau", "reviewer agreement τ by arm"),
                           (ax_rm, "rm_accuracy", "reward model accuracy on the arm's pairs")):
        for arm, color in (("strategy", "#d62"), ("random", "#9ab")):
            values = [np.nan if p[f"{key}_{arm}"] is None else p[f"{key}_{arm}"] for p in points]
            ax.plot(rounds, values, marker="o", color=color, label=f"{arm} arm")
        ax.set_xlabel("round", fontsize=8)
        ax.set_xticks(rounds)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in (ax_acc, ax_tau, ax_rm):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def section_labels(rnd) -> Section:
    """Across rounds: labels used vs held-out accuracy, and the strategy arm vs the random arm."""
    points = round_points(rnd)
    total = {k: sum(p[k] for p in points) for k in ("strategy", "random")}
    lines = [f"labels requested so far: strategy arm {total['strategy']}, random arm {total['random']}"]
    imported = sum(p["imported"] for p in points)
    if imported:
        lines.append(f"imported seed labels (round 0, `curate bootstrap`): labels on {imported} prompts")
    curve = learning_curve(rnd)
    lines += forecast_lines(curve)
    figures = [_cross_round_figure(points, curve)] if any(p["heldout_accuracy"] is not None for p in points) else []
    table = [{"round": p["round"], **({"imported": p["imported"]} if any(q["imported"] for q in points) else {}),
              "strategy": p["strategy"], "random": p["random"],
              "labels used": p["labels_cumulative"],
              "held-out accuracy": "-" if p["heldout_accuracy"] is None else
              f"{p['heldout_accuracy']:.3f}" + (" [{:.3f}, {:.3f}]".format(*p["heldout_ci"]) if p["heldout_ci"] else ""),
              "Kendall τ": _fmt(p["kendall_tau"]), "Krippendorff α (harm)": _fmt(p["krippendorff_alpha"]),
              "τ strategy / random": f"{_fmt(p['tau_strategy'], 2)} / {_fmt(p['tau_random'], 2)}",
              "RM acc. on pairs, strategy / random": f"{_fmt(p['rm_accuracy_strategy'], 2)} / "
                                                     f"{_fmt(p['rm_accuracy_random'], 2)}"}
             for p in points]
    lines += arm_claim_lines(rnd)
    return Section("Labels used so far, across rounds", lines, figures, table)


def arm_claim_lines(rnd) -> list[str]:
    """Strategy arm(s) vs the random arm on the labels so far, per round and cumulatively
    (`curation.acquisition.arms.arms_report`), and the one sentence the data support."""
    from curation.acquisition.arms import arm_line, arms_report

    report = arms_report(rnd)
    lines = [f"round {p['round']} — " + arm_line(a) for p in report["per_round"] for a in p["arms"]]
    lines += ["all rounds — " + arm_line(a) for a in report["cumulative"]]
    lines += [f"round {m['round']} measured on {m['test']} random-arm pairs of other rounds: value per label, "
              f"selected {1000 * m['strategy']:+.2f}, random {1000 * m['random']:+.2f} mnats"
              for m in report["worth"]["rounds"]]
    lines.append("what the labels so far support: " + report["worth"]["sentence"])
    return lines


SECTIONS = (section_steps, section_pool, section_scores, section_selection, section_annotation, section_reviewers,
            section_pairs, section_training, section_evaluation, section_labels)


def build_sections(rnd) -> list[Section]:
    return [fn(rnd) for fn in SECTIONS]


CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,sans-serif;max-width:1160px;margin:1.5em auto;padding:0 16px;color:#222}
h1{margin:.2em 0}h2{border-bottom:1px solid #ddd;margin-top:1.6em}
nav{font-size:12px;color:#666}nav a{margin-right:.9em;color:#357;text-decoration:none}
.path{color:#666;font-size:12px;overflow-wrap:anywhere}
img{display:block;max-width:100%;height:auto;margin:.5em 0}
.table{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:12px;max-width:100%}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;white-space:pre-line;
overflow-wrap:anywhere}
th{background:#f4f4f4}
td.num{text-align:right;white-space:nowrap}.short{white-space:nowrap}
pre{font-size:12px;background:#fafafa;border:1px solid #eee;padding:6px;max-width:100%;overflow-x:auto}
"""


SHORT_CELL = 16  # characters


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _table_html(table: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for row in table for k in row))
    heads = "".join(f"<th{' class=short' if len(c) <= SHORT_CELL else ''}>{html.escape(c)}</th>" for c in cols)
    out = [f"<div class='table'><table><tr>{heads}</tr>"]
    for row in table:
        cells = []
        for c in cols:
            v = row.get(c, "")
            if isinstance(v, float):
                cells.append(f"<td class='num'>{v:.4g}</td>")
            elif isinstance(v, int) and not isinstance(v, bool):
                cells.append(f"<td class='num'>{v}</td>")
            else:
                text = "" if v is None else str(v)
                short = " class='short'" if len(text) <= SHORT_CELL else ""  # never broken mid-word
                cells.append(f"<td{short}>{html.escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def render_html(rnd, sections: list[Section]) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Round {rnd.number} report</title>",
        f"<style>{CSS}</style>",
        f"<h1>Round {rnd.number}</h1><p class='path'>{html.escape(str(rnd.path))}</p>",
        "<nav>" + "".join(f"<a href='#{_anchor(s.title)}'>{html.escape(s.title)}</a>" for s in sections) + "</nav>",
    ]
    for s in sections:
        parts.append(f"<h2 id='{_anchor(s.title)}'>{html.escape(s.title)}</h2><ul>")
        parts += [f"<li>{html.escape(line)}</li>" for line in s.lines]
        parts.append("</ul>")
        for fig in s.figures:
            parts.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,"
                         f"{base64.b64encode(fig).decode()}'>")
        if s.pre:
            parts.append(f"<pre>{html.escape(s.pre)}</pre>")
        if s.table:
            parts.append(_table_html(s.table))
    return "\n".join(parts)


def summary_text(rnd, sections: list[Section]) -> str:
    out = [f"Round {rnd.number} ({rnd.path})"]
    for s in sections:
        out.append(f"  {s.title}")
        out += [f"    {line}" for line in s.lines]
        if s.pre:
            out += [f"    {line}" for line in s.pre.splitlines()]
    return "\n".join(out)


def run_report(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Write `report/report.html` and `report/summary.txt` for the round.

    Rebuilt whenever a step it reads has changed (or finished since), so it can be produced mid-round."""
    sections = build_sections(rnd)
    inputs = tuple(rnd.step(n) for n in ("pool", "select", "pull", "evaluate", "gate") if rnd.step(n).done)
    run = rnd.start_step("report", {"sections": [s.title for s in sections]}, inputs=inputs, force=force,
                         rebuild=True)
    if run is None:
        return rnd.step("report").manifest()
    with run:
        write_text(run.path / "report.html", render_html(rnd, sections))
        text = summary_text(rnd, sections)
        write_text(run.path / "summary.txt", text + "\n")
        run.counts["sections"] = len(sections)
        run.counts["figures"] = sum(len(s.figures) for s in sections)
    if progress:
        print(text)
        print(f"report: {run.path / 'report.html'}")
    return rnd.step("report").manifest()


def snapshot_report(rnd, *, progress: bool = True) -> Path:
    """The report as the round stands, without recording a step: `<project>/snapshots/round-NNNN/report.html`
    (+ summary.txt). What `curate report` writes while another command holds the project's write lock."""
    sections = build_sections(rnd)
    folder = rnd.project.root / "snapshots" / rnd.path.name
    write_text(folder / "report.html", render_html(rnd, sections))
    text = summary_text(rnd, sections)
    write_text(folder / "summary.txt", text + "\n")
    if progress:
        print(text)
    return folder / "report.html"


__all__ = ["run_report", "snapshot_report", "build_sections", "render_html", "section_reviewers", "summary_text"]
