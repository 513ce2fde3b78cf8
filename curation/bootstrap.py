"""`curate bootstrap`: round 0 — the labels a team already has, and the first champion trained on them.

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

`curate round run` runs the bootstrap first when `labels.sources` lists files, round 0 has not finished, no loop
round has drawn its pool and the registry has no champion. Each step is resumable and skipped when finished, as in a
round.
"""

from __future__ import annotations

from collections.abc import Callable

from curation.steps.embed import run_embed
from curation.steps.evaluate import run_evaluate
from curation.steps.gate import run_gate
from curation.steps.labels import run_labels
from curation.steps.train import train_step
from preference.plumbing.errors import CurateError
from training.trainers import TRAINERS

BOOTSTRAP_STEPS: list[Callable] = [
    run_labels,
    run_embed,
    *(train_step(kind) for kind in TRAINERS),
    run_evaluate,
    run_gate,
]


def bootstrap_config(cfg):
    """The round config round 0 runs with: `labels.train` applied over the trainer sections (type-checked)."""
    from preference.plumbing.config import replace_path

    for kind, overrides in cfg.labels.train.items():
        for key, value in overrides.items():
            cfg = replace_path(cfg, f"{kind}.{key}", value)
    return cfg


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
    from curation.round import run_steps

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


__all__ = ["BOOTSTRAP_STEPS", "bootstrap_config", "bootstrap_due", "check_can_bootstrap", "run_bootstrap"]
