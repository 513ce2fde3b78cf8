"""`curate round run`: every step of a round in order, each skipped if its manifest exists.

The loop is a plain list of steps (nanochat style: it reads as the pipeline). Each step function is idempotent
and resumable, so a round killed at any point continues where it stopped when the same command is rerun.
With the Argilla backend the round stops after `push` until reviewers have answered (`pull` raises
`WaitingForReviewers`); rerun `curate round run` later to continue.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from curation.steps.evaluate import run_evaluate
from curation.steps.failures import run_failures
from curation.steps.gate import run_gate
from curation.steps.generate import run_generate
from curation.steps.pool import run_pool
from curation.steps.pull import run_pull
from curation.steps.push import run_push
from curation.steps.report import run_report
from curation.steps.rewards import run_rewards
from curation.steps.score import run_score
from curation.steps.select import run_select
from curation.steps.train import train_step
from preference.plumbing.errors import WaitingForReviewers
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


def step_name(fn: Callable) -> str:
    """A step function's step name: `run_pool` → "pool" (its folder in the round store and its CLI command)."""
    return fn.__name__.removeprefix("run_")


def step_function(name: str, steps: list[Callable] = STEPS) -> Callable:
    """The step function named `name` (CurateError naming the steps when unknown)."""
    by_name = {step_name(fn): fn for fn in steps}
    if name not in by_name:
        from preference.plumbing.errors import CurateError

        raise CurateError(f"unknown round step {name!r}; the steps: {', '.join(by_name)}")
    return by_name[name]


def run_round(cfg, rnd, *, force: bool = False, progress: bool = True, verbose: bool = False, echo=print) -> str:
    """Run the round's remaining steps. Returns "done" or "waiting" (for reviewers).

    Each step runs inside `step_console`: its progress bar and this loop's one-line summary reach the console,
    library output goes to `<round>/<step>/log.txt` (`verbose`: everything shows on the console).
    When `labels.sources` lists seed labels and the project has no champion yet, the bootstrap (round 0,
    `curation.bootstrap`) runs first."""
    from curation.bootstrap import bootstrap_due, run_bootstrap

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
