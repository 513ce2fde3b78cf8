"""`curate reviewers add|list|remove`: who reviews on the configured Argilla, and how far each one is.

Accounts and workspace membership live on the Argilla server (`preference.argilla_reviewers`), not in the project:
these commands write to Argilla only. `list` reads the project too (read-only): the latest round's pushed dataset
(its reviewers' answers and pending records, live from the server) and the reliability figures the latest
finished pull computed (`pull/annotators.json`: agreement with the consensus, accuracy on gold, Dawid–Skene
reliability, seconds per record).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from preference.argilla import ArgillaClient, queue_url
from preference.argilla_reviewers import ReviewerChange, add_reviewer, remove_reviewer, reviewer_progress
from preference.plumbing.io import read_json

FIGURES = (("reliability", "reliability"), ("agreement_with_consensus", "agreement"),
           ("gold_accuracy", "gold_acc"), ("seconds_per_record", "sec/record"))


def add(cfg, name: str, *, role: str = "annotator", password: str | Callable[[], str] | None = None) -> ReviewerChange:
    """Add reviewer `name` to the project's workspace (`password` may be a callable: asked only for a new account)."""
    a = cfg.annotation.argilla
    with ArgillaClient.from_config(a) as client:
        return add_reviewer(client, name, a.workspace, role=role, password=password)


def remove(cfg, name: str) -> ReviewerChange:
    a = cfg.annotation.argilla
    with ArgillaClient.from_config(a) as client:
        return remove_reviewer(client, name, a.workspace)


def latest_push(cfg):
    """(round, the push manifest's `argilla` block) of the latest round pushed to Argilla, or (None, {})."""
    from preference.plumbing.store import Project

    if not Path(cfg.project).is_dir():
        return None, {}
    project = Project(cfg.project)
    for number in reversed(project.rounds()):
        rnd = project.round(number)
        if rnd.step("push").done and (rnd.step("push").manifest().get("argilla") or {}).get("dataset_id"):
            return rnd, rnd.step("push").manifest()["argilla"]
    return None, {}


def latest_figures(cfg) -> tuple[int | None, dict[str, dict]]:
    """(round, annotators.json) of the latest finished pull, or (None, {})."""
    from preference.plumbing.store import Project

    if not Path(cfg.project).is_dir():
        return None, {}
    project = Project(cfg.project)
    for number in reversed(project.rounds()):
        pull = project.round(number).step("pull")
        if pull.done and (pull.path / "annotators.json").is_file():
            return number, read_json(pull.path / "annotators.json")
    return None, {}


def listing(cfg) -> tuple[list[str], list[dict]]:
    """Header lines and one row per workspace member: role, this round's answers and pending records, and the
    reliability figures of the latest pull."""
    a = cfg.annotation.argilla
    rnd, info = latest_push(cfg)
    with ArgillaClient.from_config(a) as client:
        rows = reviewer_progress(client, a.workspace, info.get("dataset_id"))
        url = client.url
    lines = [f"Argilla {url}, workspace {a.workspace!r}"]
    if rnd is None:
        lines.append("no round pushed to Argilla yet: answers and pending records appear after `curate push` "
                     "(or `curate round run`)")
    else:
        lines.append(f"round {rnd.number}: dataset {info['dataset']!r} (each record needs {a.min_submitted} "
                     f"answers); reviewers' queue: {info.get('queue_url') or queue_url(url, info['dataset_id'])}")
    figures_round, figures = latest_figures(cfg)
    if figures_round is not None:
        lines.append(f"reliability figures from round {figures_round}'s pull")
    out = []
    for row in rows:
        fig = figures.get(row["reviewer"]) or {}
        out.append({**row, **{short: fig.get(key) for key, short in FIGURES}})
    return lines, out


__all__ = ["add", "latest_figures", "latest_push", "listing", "remove"]
