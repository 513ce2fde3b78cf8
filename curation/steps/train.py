"""Steps `train_<kind>`: one per trainer of the table (training/trainers.py), in table order.

pull/pairs.parquet (+ pool/feedback.parquet for trainers on feedback) + replay of earlier rounds →
train_<kind>/model, lineage.json, train_stats.json, tensorboard/ (TRL report_to); a section with `enabled: false`
records a "skipped" manifest. Held-out prompts are removed from every training set
(`training.data.drop_heldout_prompts`), so the held-out evaluation stays clean even when the pool is drawn from the
same file. `train_step(kind)` is the step function `curation.round.STEPS` lists for each trainer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import hardware_summary
from preference.plumbing.io import write_json
from preference.schema import PreferencePair
from training.trainers import TRAINERS, trainer


# ------------------------------------------------------------------------------------------------- helpers
def heldout_pairs(cfg) -> list[PreferencePair]:
    """The held-out evaluation pairs of the config (deterministic; see `training.data.split_heldout`)."""
    from training.data import load_hh_pairs, split_heldout

    pairs = load_hh_pairs(cfg.evaluation.heldout)
    return split_heldout(pairs, min(cfg.evaluation.heldout_size, len(pairs) - 1))[1]


def _mixed(cfg, rnd, section, new: list, earlier: list, heldout) -> tuple[list, dict, dict]:
    """`new` + replay of `earlier` (pairs or feedback), held-out prompts dropped, capped at max_train_pairs.

    Round 0 (the bootstrap) trains on the imported labels alone, each once per epoch: `replay.new_weight` is for
    the loop's own labels (later rounds replay the imported ones with `replay.weight`, like any earlier round's)."""
    import dataclasses

    from training.data import drop_heldout_prompts, mix_replay

    n_before = len(new) + sum(len(items) for _, items in earlier)
    new = drop_heldout_prompts(new, heldout)
    earlier = [(age, drop_heldout_prompts(items, heldout)) for age, items in earlier]
    n_after = len(new) + sum(len(items) for _, items in earlier)
    rng = np.random.default_rng([cfg.seed, rnd.number])
    replay = section.replay
    if rnd.number == 0:
        replay = dataclasses.replace(replay, new_weight=1.0)
    mixed = mix_replay(new, earlier, replay, rng, round_number=rnd.number) if new else None
    items = (mixed.pairs if mixed else [])
    items = items[: section.max_train_pairs] if section.max_train_pairs else items
    counts = {**(mixed.counts if mixed else {"new": 0, "replay": 0, "total": 0, "unique": 0}),
              "heldout_prompts_dropped": n_before - n_after, "trained": len(items)}
    return items, counts, (mixed.lineage if mixed else {})


def _training_set(cfg, rnd, section) -> tuple:
    """(pairs with repeats, counts, lineage) for a trainer's section: the round's pairs plus replay."""
    from training.data import earlier_round_pairs, load_round_pairs

    earlier = earlier_round_pairs(rnd, section.replay.rounds) if section.replay.ratio > 0 else []
    return _mixed(cfg, rnd, section, load_round_pairs(rnd), earlier, heldout_pairs(cfg))


def _feedback_set(cfg, rnd, section) -> tuple:
    """(feedback with repeats, counts, lineage): the round's thumbs up/down plus replay, like pairs."""
    from training.data import earlier_round_feedback, load_round_feedback

    earlier = earlier_round_feedback(rnd, section.replay.rounds) if section.replay.ratio > 0 else []
    return _mixed(cfg, rnd, section, load_round_feedback(rnd), earlier, heldout_pairs(cfg))


def _replay_keys(rnd, rounds: int | None, step: str = "pull") -> dict[str, str]:
    """Manifest keys of earlier rounds' finished `step` (part of a training step's key): "pull" = the step with
    a round's pairs, "pool" = the one with its feedback (round 0: `labels` for both)."""
    from training.data import feedback_step, pairs_step

    which = pairs_step if step == "pull" else feedback_step
    return {f"round-{prev.number}": which(prev).manifest()["key"]
            for prev in rnd.earlier(rounds) if which(prev).done}


def _heldout_key(cfg) -> dict:
    return {"heldout": str(cfg.evaluation.heldout), "heldout_size": cfg.evaluation.heldout_size}


def _copy_folder(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)


def trained_and_active(step) -> bool:
    """The step finished and trained something (not a disabled trainer's "skipped" manifest)."""
    return step.done and not step.manifest().get("skipped", False)


# ---------------------------------------------------------------------------------------------- train steps
def run_train(kind: str, cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Step `train_<kind>`: train trainer `kind` of the table on the round's pairs (and feedback) plus replay
    → train_<kind>/model; a disabled section records a skipped step."""
    entry = trainer(kind)
    section, name = getattr(cfg, kind), entry.step
    from training.data import feedback_step, pairs_step

    config = {kind: section, **_heldout_key(cfg), "replay_inputs": _replay_keys(rnd, section.replay.rounds)}
    inputs = (pairs_step(rnd),)  # pull (round 0: the imported labels)
    if entry.uses_feedback:  # feedback comes from the pool step (traffic sources), when it ran
        config["feedback_replay_inputs"] = _replay_keys(rnd, section.replay.rounds, "pool")
        fb = feedback_step(rnd)
        inputs += (fb,) if fb.done and fb.name != inputs[0].name else ()
    run = rnd.start_step(name, config, inputs=inputs, seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step(name).manifest()
    with run:
        if section.enabled:
            _train(entry, section, cfg, rnd, run, progress)
        else:
            run.extra["skipped"] = True
            run.counts["trained"] = 0
    return rnd.step(name).manifest()


def _train(entry, section, cfg, rnd, run, progress: bool) -> None:
    from training.launch import run_training

    kind = entry.kind
    pairs, counts, lineage = _training_set(cfg, rnd, section)
    extra, lineage = {}, {"rounds": lineage, "counts": counts}
    if entry.uses_feedback:
        feedback, fcounts, flineage = _feedback_set(cfg, rnd, section)
        extra["feedback"] = feedback
        lineage.update({"feedback_rounds": flineage, "feedback_counts": fcounts})
        counts = {**counts, "feedback": fcounts["trained"]}
    if not pairs and not extra.get("feedback"):
        what = "pairs or feedback" if entry.uses_feedback else "pairs"
        raise CurateError(
            f"round {rnd.number}: no training {what} left for {kind} ({counts['heldout_prompts_dropped']} on "
            "held-out prompts, none otherwise); label more items or use a different evaluation.heldout file"
        )
    stats = run_training(kind, pairs, section, run.parts_dir / "train", seed=cfg.seed, progress=progress, **extra)
    _copy_folder(run.parts_dir / "train" / "model", run.path / "model")
    if (run.parts_dir / "train" / "tensorboard").is_dir():
        _copy_folder(run.parts_dir / "train" / "tensorboard", run.path / "tensorboard")
    write_json(run.path / "lineage.json", lineage)
    write_json(run.path / "train_stats.json", stats)
    run.counts.update(counts)
    run.extra["train"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None)))}
    run.extra["hardware"] = hardware_summary("bfloat16" if section.use_bf16() else "float32",
                                             section.threads_per_process(section.num_processes))


def train_step(kind: str) -> Callable:
    """Round step `train_<kind>`: `run_train` bound to trainer `kind` of the table (training/trainers.py)."""
    if kind not in TRAINERS:
        raise CurateError(f"unknown trainer {kind!r}; known: {', '.join(TRAINERS)}")

    def step(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
        return run_train(kind, cfg, rnd, force=force, progress=progress)

    step.__name__ = step.__qualname__ = f"run_train_{kind}"
    step.__doc__ = f"Step train_{kind}: {TRAINERS[kind].help}"
    return step


__all__ = ["heldout_pairs", "run_train", "train_step", "trained_and_active"]
