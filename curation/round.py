"""`curate round run`: every step of a round in order, each skipped if its manifest exists.

The loop is a plain list of steps (nanochat style: it reads as the pipeline). Each step function is idempotent
and resumable, so a round killed at any point continues where it stopped when the same command is rerun.
With the Argilla backend the round stops after `push` until reviewers have answered (`pull` raises
`WaitingForReviewers`); rerun `curate round run` later to continue.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from preference.plumbing.errors import WaitingForReviewers
from training.trainers import TRAINERS

STEPS: list[tuple[str, str]] = [
    ("pool", "curation.pool.run_pool"),
    ("generate", "curation.generate.run_generate"),
    ("score", "curation.score.run_score"),
    ("rewards", "curation.rewards.run_rewards"),
    ("select", "curation.select.run_select"),
    ("push", "curation.annotate.run_push"),
    ("pull", "curation.annotate.run_pull"),
    # one train step per trainer of the table, in its order (train_reward, train_dpo, train_kto, ...)
    *((t.step, f"curation.train_steps.run_{t.step}") for t in TRAINERS.values()),
    ("evaluate", "curation.train_steps.run_evaluate"),
    ("gate", "curation.train_steps.run_gate"),
    ("failures", "curation.train_steps.run_failures"),
    ("report", "curation.report.run_report"),
]


def step_function(import_path: str) -> Callable:
    module, _, attr = import_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


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


def run_steps(cfg, rnd, steps: list[tuple[str, str]], *, force: bool = False, progress: bool = True,
              verbose: bool = False, echo=print, title: str | None = None) -> str:
    """Run `steps` (name, import path) of round `rnd` in order, each skipped when finished. "done" or "waiting"."""
    from preference.plumbing.console import step_console

    echo(title or f"round {rnd.number} → {rnd.path}")
    if not verbose:
        echo(f"  (library output of each step: {rnd.path}/<step>/log.txt; --verbose shows it here)")
    for name, path in steps:
        step = rnd.step(name)
        was_done = step.done
        t0 = time.monotonic()
        try:
            with step_console(step, verbose=verbose):
                manifest = step_function(path)(cfg, rnd, force=force, progress=progress)
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
