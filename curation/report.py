"""Per-round report: one self-contained HTML file (PNG plots embedded, no server) plus a terminal summary.

It reads only what the round's finished steps wrote, so it can be produced at any point of a round; sections of
steps that have not run say so. Sections: pool, score distributions, selection (strategy mix, random arm),
annotation (progress, agreement), pairs, training curves, evaluation vs champion (with CIs), labels used so far
by arm across rounds.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def section_pool(rnd) -> Section:
    c = _counts(rnd, "pool")
    if not c:
        return Section("Pool", ["pool step has not run"], [])
    lines = [f"{k.replace('_', ' ')}: {v}" for k, v in c.items()]
    return Section("Pool", lines, [])


SIGNALS = ("prompt_perplexity", "mean_logprob", "mean_entropy", "committee_disagreement", "vote_entropy",
           "semantic_spread")


def section_scores(rnd) -> Section:
    rows = _rows(rnd, "score", "prompt_scores.parquet")
    if not rows:
        return Section("Score distributions", ["score step has not run"], [])
    selected = {r["prompt_id"] for r in (_rows(rnd, "select", "selected.parquet") or [])}
    cols = [c for c in SIGNALS if c in rows[0]]
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.6), squeeze=False)
    lines = []
    for ax, col in zip(axes[0], cols, strict=True):
        values = np.array([r[col] for r in rows], dtype=float)
        picked = np.array([r[col] for r in rows if r["prompt_id"] in selected], dtype=float)
        finite = values[np.isfinite(values)]
        bins = np.histogram_bin_edges(finite, bins=20) if finite.size else 20
        ax.hist(finite, bins=bins, color="#9ab", label="pool")
        if picked.size:
            ax.hist(picked[np.isfinite(picked)], bins=bins, color="#d62", alpha=0.8, label="selected")
        ax.set_title(col, fontsize=9)
        if finite.size:
            lines.append(f"{col}: median {np.median(finite):.3g} (IQR {np.percentile(finite, 25):.3g}–"
                         f"{np.percentile(finite, 75):.3g}), n={finite.size}")
    axes[0][0].legend(fontsize=7)
    return Section("Score distributions", lines, [_png(fig)])


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
    table = [{k: r.get(k) for k in ("rank", "prompt_id", "slice", "arm", "strategy", "score", "reason")} for r in rows]
    return Section("Selection (what and why)", lines, [], table[:50])


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
    figs, lines = [], []
    plt = _plt()
    for step in ("train_reward", "train_dpo"):
        s = rnd.step(step)
        if not s.done:
            lines.append(f"{step}: has not run")
            continue
        history = [h for h in _log_history(s.path) if "loss" in h]
        lines.append(f"{step}: " + ", ".join(f"{k}={v}" for k, v in s.manifest().get("counts", {}).items()))
        if history:
            fig, ax = plt.subplots(figsize=(4.5, 2.6))
            ax.plot([h.get("step", i) for i, h in enumerate(history)], [h["loss"] for h in history], marker=".")
            ax.set_title(f"{step} training loss", fontsize=9)
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


def section_labels(rnd) -> Section:
    """Labels used so far, by arm, across this and earlier rounds."""
    per_round = []
    for r in reversed([rnd, *rnd.earlier()]):
        rows = _rows(r, "select", "selected.parquet") or []
        arms = {"strategy": 0, "random": 0}
        for row in rows:
            arms[row.get("arm", "strategy")] = arms.get(row.get("arm", "strategy"), 0) + 1
        per_round.append({"round": r.number, **arms})
    total = {k: sum(x.get(k, 0) for x in per_round) for k in ("strategy", "random")}
    lines = [f"labels requested so far: strategy arm {total['strategy']}, random arm {total['random']}"]
    return Section("Labels used so far", lines, [], per_round)


SECTIONS = (section_pool, section_scores, section_selection, section_annotation, section_reviewers, section_pairs,
            section_training, section_evaluation, section_labels)


def build_sections(rnd) -> list[Section]:
    return [fn(rnd) for fn in SECTIONS]


def render_html(rnd, sections: list[Section]) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>Round {rnd.number} report</title>",
        "<style>body{font:14px system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:left;vertical-align:top}h2{border-bottom:1px solid #ddd}</style>",
        f"<h1>Round {rnd.number}</h1><p>{html.escape(str(rnd.path))}</p>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2><ul>")
        parts += [f"<li>{html.escape(line)}</li>" for line in s.lines]
        parts.append("</ul>")
        for fig in s.figures:
            parts.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,"
                         f"{base64.b64encode(fig).decode()}'>")
        if s.pre:
            parts.append(f"<pre>{html.escape(s.pre)}</pre>")
        if s.table:
            cols = list(dict.fromkeys(k for row in s.table for k in row))
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
            for row in s.table:
                cells = []
                for c in cols:
                    v = row.get(c, "")
                    v = f"{v:.4g}" if isinstance(v, float) else v
                    cells.append(f"<td>{html.escape(str(v))}</td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table>")
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


__all__ = ["run_report", "build_sections", "render_html", "section_reviewers", "summary_text"]
