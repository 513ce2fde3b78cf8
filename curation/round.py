"""The loop: `curate round run` runs every step of a round in order (`STEPS`), each skipped if its manifest exists;
`curate bootstrap` runs round 0 (`BOOTSTRAP_STEPS`).

The loop is a plain list of steps (nanochat style: it reads as the pipeline). Each step function is idempotent
and resumable, so a round killed at any point continues where it stopped when the same command is rerun.
With the Argilla backend the round stops after `push` until reviewers have answered (`pull` raises
`WaitingForReviewers`); rerun `curate round run` later to continue.

Round 0, the bootstrap (`curate bootstrap`; `round run` does it first when `labels.sources` lists files, round 0
has not finished, no loop round has drawn its pool and the registry has no champion):

    labels:                  the seed labels (curation/steps/labels.py)
    embed                    their answers embedded as `curate score` embeds completions (`labels.embed_pairs`), so
                             round 1 can fit its fast reward ensemble on them (the disagreement of a one-head
                             champion is 0 everywhere; with `reward.ensemble ≥ 2` the champion's heads serve)
    train_<kind>             every trainer of the table on the imported pairs (and unpaired judgements), with the
                             trainer sections as `labels.train` overrides them (round 0 usually has many more pairs
                             than a round: more steps)
    evaluate                 the held-out evaluation every round runs (`evaluation.heldout`)
    gate                     registers the models (registry version with `round: 0`) and promotes them when they
                             pass the gate: round 1's `rewards` step then scores its completions with them, so
                             reviewers see suggestions and selection has the champion's ensemble

The steps live in `<project>/round-0000/`, with the same step/manifest machinery as a loop round: `curate status`
lists them, later rounds replay round 0's pairs (`training.data.earlier_round_pairs`), the learning curve and the
report's cross-round table start with round 0, the registry lineage names `round-0`. Round 0's imported prompts leave
every loop round's pool (`curation.steps.pool.drop_seed_prompts`), so the labels must be in place before round 1 draws its
pool: `curate bootstrap` refuses once a loop round has (start a new project to import labels later).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from curation.config import bootstrap_config
from curation.steps.embed import run_embed
from curation.steps.evaluate import run_evaluate
from curation.steps.failures import run_failures
from curation.steps.gate import run_gate
from curation.steps.generate import run_generate
from curation.steps.labels import run_labels
from curation.steps.pool import run_pool
from curation.steps.pull import run_pull
from curation.steps.push import run_push
from curation.steps.report import run_report
from curation.steps.rewards import run_rewards
from curation.steps.score import run_score
from curation.steps.select import run_select
from curation.steps.train import train_step
from preference.plumbing.errors import CurateError, WaitingForReviewers
from training.trainers import TRAINERS

STEPS: list[Callable] = [
    run_pool,
    run_generate,
    run_score,
    run_rewards,
    run_select,
    run_push,
    run_pull,
    *(train_step(kind) for kind in TRAINERS),  # train_reward, train_dpo, train_kto, ...: the trainer table's order
    run_evaluate,
    run_gate,
    run_failures,
    run_report,
]

BOOTSTRAP_STEPS: list[Callable] = [  # round 0: the labels a team already has, and a first champion
    run_labels,
    run_embed,
    *(train_step(kind) for kind in TRAINERS),
    run_evaluate,
    run_gate,
]


def step_name(fn: Callable) -> str:
    """A step function's step name: `run_pool` → "pool" (its folder in the round store and its CLI command)."""
    return fn.__name__.removeprefix("run_")


def step_function(name: str, steps: list[Callable] = STEPS) -> Callable:
    """The step function named `name` (CurateError naming the steps when unknown)."""
    by_name = {step_name(fn): fn for fn in steps}
    if name not in by_name:
        raise CurateError(f"unknown round step {name!r}; the steps: {', '.join(by_name)}")
    return by_name[name]


def run_round(cfg, rnd, *, force: bool = False, progress: bool = True, verbose: bool = False, echo=print) -> str:
    """Run the round's remaining steps. Returns "done" or "waiting" (for reviewers).

    Each step runs inside `step_console`: its progress bar and this loop's one-line summary reach the console,
    library output goes to `<round>/<step>/log.txt` (`verbose`: everything shows on the console).
    When `labels.sources` lists seed labels and the project has no champion yet, the bootstrap (round 0) runs
    first."""
    if rnd.number >= 1 and not rnd.step("pool").done and bootstrap_due(cfg, rnd.project):
        run_bootstrap(cfg, rnd.project, progress=progress, verbose=verbose, echo=echo)
    return run_steps(cfg, rnd, STEPS, force=force, progress=progress, verbose=verbose, echo=echo)


def run_steps(cfg, rnd, steps: list[Callable], *, force: bool = False, progress: bool = True,
              verbose: bool = False, echo=print, title: str | None = None) -> str:
    """Run the step functions `steps` of round `rnd` in order, each skipped when finished. "done" or "waiting"."""
    from preference.plumbing.console import step_console

    echo(title or f"round {rnd.number} → {rnd.path}")
    if not verbose:
        echo(f"  (library output of each step: {rnd.path}/<step>/log.txt; --verbose shows it here)")
    for fn in steps:
        name = step_name(fn)
        step = rnd.step(name)
        was_done = step.done
        t0 = time.monotonic()
        try:
            with step_console(step, verbose=verbose):
                manifest = fn(cfg, rnd, force=force, progress=progress)
        except WaitingForReviewers as exc:
            echo(f"  {name:<13} waiting for reviewers: {exc}")
            echo("  rerun `curate round run` once reviewers have answered; finished steps are kept")
            return "waiting"
        counts = ", ".join(f"{k}={v}" for k, v in (manifest.get("counts") or {}).items())
        state = "skipped (finished earlier)" if was_done and not force else f"done in {time.monotonic() - t0:.1f}s"
        echo(f"  {name:<13} {state}  {counts}")
    echo(f"round {rnd.number} finished; artifacts in {rnd.path}" if rnd.number else
         f"bootstrap finished; artifacts in {rnd.path}")
    return "done"


# ------------------------------------------------------------------------------------------ round 0
def loop_started(project) -> int | None:
    """The first loop round that drew its pool (seed labels can no longer leave it), or None."""
    return next((n for n in project.rounds() if n >= 1 and project.round(n).step("pool").done), None)


def bootstrap_due(cfg, project) -> bool:
    """Whether `curate round run` bootstraps first (see the module docstring)."""
    from training.registry import Registry, registry_root

    if not cfg.labels.sources or loop_started(project) is not None:
        return False
    if 0 in project.rounds() and project.bootstrap_round().step("gate").done:
        return False
    return Registry(registry_root(cfg)).champion() is None


def check_can_bootstrap(cfg, project, *, force: bool = False) -> None:
    """Refuse a bootstrap that cannot be consistent with the project's rounds (one line, exit 2)."""
    if not cfg.labels.sources:
        raise CurateError("labels.sources is empty: list the preference files to start from, e.g. "
                          "`labels: {sources: [{path: data/pairs.jsonl}]}` (formats: curation/steps/labels.py)")
    started = loop_started(project)
    imported = 0 in project.rounds() and project.bootstrap_round().step("labels").done
    if started is not None and (force or not imported):
        raise CurateError(
            f"round {started} of {project.root} already drew its pool: seed labels must be imported before round "
            "1's pool (their prompts leave it, and later rounds replay them); import them into a new project "
            "(another `project:`)")


def run_bootstrap(cfg, project, *, force: bool = False, progress: bool = True, verbose: bool = False,
                  echo=print) -> str:
    """Run round 0's steps (skipping finished ones). Returns "done"."""
    check_can_bootstrap(cfg, project, force=force)
    rnd = project.bootstrap_round(create=True)
    outcome = run_steps(bootstrap_config(cfg), rnd, BOOTSTRAP_STEPS, force=force, progress=progress,
                        verbose=verbose, echo=echo, title=f"bootstrap (round 0) → {rnd.path}")
    echo(f"  {summary(rnd)}")
    return outcome


def summary(rnd) -> str:
    """One line: what round 0 imported, its held-out reward accuracy with CI, and the gate's outcome."""
    labels = rnd.step("labels").manifest().get("counts", {})
    parts = [f"imported {labels.get('pairs', 0)} pairs and {labels.get('feedback', 0)} unpaired judgements "
             f"({labels.get('rejected', 0)} rows rejected)"]
    evaluate = rnd.step("evaluate")
    if evaluate.done and evaluate.manifest().get("reward_accuracy") is not None:
        m = evaluate.manifest()
        lo, hi = m.get("reward_ci") or (None, None)
        parts.append(f"held-out reward accuracy {m['reward_accuracy']:.3f}"
                     + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""))
    gate = rnd.step("gate")
    if gate.done:
        g = gate.manifest()
        parts.append(f"{g.get('version')} {'promoted to champion' if g.get('promoted') else 'not promoted'}")
    return "; ".join(parts)
