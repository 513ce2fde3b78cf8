"""`curate train <kind>`, `curate evaluate`, `curate gate`: round-store steps around `training/`.

    train_<kind>   one step per trainer of the table (training/trainers.py), in table order:
                   pull/pairs.parquet (+ pool/feedback.parquet for trainers on feedback) + replay of earlier
                   rounds → train_<kind>/model, lineage.json, train_stats.json, tensorboard/ (TRL report_to);
                   a section with `enabled: false` records a "skipped" manifest
    evaluate       held-out set (evaluation.heldout) → evaluate/metrics.json (one entry per trained kind),
                   metrics.txt, pair_scores.parquet (the round's pairs scored by its reward model)
    gate           registers the round's models (one artifact per trained kind), promotes them only if they beat
                   the champion → gate/decision.json
    failures       the round's pairs the reward model still orders wrongly, as pool prompts with source
                   "failure:round-N" → failures/prompts.parquet (read by the next round's pool step)

`run_train_<kind>` (e.g. `run_train_reward`) is `run_train` bound to a kind of the table: `curation.round.STEPS`
and the CLI name the steps that way. Held-out prompts are removed from every training set
(`training.data.drop_heldout_prompts`), so the held-out evaluation stays clean even when the pool is drawn from
the same file.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np

from preference.plumbing.config import to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import hardware_summary, resolve_dtype, resolve_threads
from preference.plumbing.io import read_json, read_rows, write_json, write_rows, write_text
from preference.schema import PreferencePair, Prompt, stable_id
from training.trainers import TRAINERS, trainer

FAILURE_REASON = "reward model prefers the rejected answer"


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


def _done_and_active(step) -> bool:
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


def __getattr__(name: str):
    """`run_train_<kind>`: the train step of each trainer of the table (what `curation.round.STEPS` names)."""
    kind = name.removeprefix("run_train_")
    if name.startswith("run_train_") and kind in TRAINERS:
        step = functools.partial(run_train, kind)
        step.__doc__ = f"Step train_{kind}: {TRAINERS[kind].help}"
        return step
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------- evaluate
def run_evaluate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Evaluate each model the round trained (the table's trainers, in order) on the held-out set; compare the
    reward model with the champion's on the same set."""
    import torch

    from training.data import drop_heldout_prompts, load_round_pairs
    from training.evaluate import EvalContext, format_report
    from training.registry import Registry, registry_root

    # reward models are required (they judge policies and the round's pairs); other trainers when they trained
    steps = {kind: rnd.step(t.step) for kind, t in TRAINERS.items()}
    inputs = tuple(s for kind, s in steps.items() if TRAINERS[kind].role == "reward_model" or _done_and_active(s))
    registry = Registry(registry_root(cfg))
    champion = registry.champion() if cfg.evaluation.compare_champion else None
    # the champion is not part of the step key: a promotion must not make this round's evaluation "stale"; the
    # gate notices when the champion changed since and falls back to the champion's stored metrics
    run = rnd.start_step("evaluate", cfg.evaluation, inputs=inputs, seeds={"seed": cfg.evaluation.seed}, force=force)
    if run is None:
        return rnd.step("evaluate").manifest()
    with run:
        threads, dtype = resolve_threads(cfg.evaluation.threads), resolve_dtype(cfg.evaluation.dtype)
        torch.set_num_threads(threads)
        heldout = heldout_pairs(cfg)
        ctx = EvalContext(heldout, cfg.evaluation, dtype=dtype, progress=progress,
                          previous_policy=registry.artifact(champion, "policy"))
        metrics = {"heldout": {"file": str(cfg.evaluation.heldout), "pairs": len(heldout),
                               "key": stable_id([p.id for p in heldout])}}
        judged_by, held_scores = None, None
        timings: dict[str, float] = {}  # seconds per part: where the step's time goes (manifest `timings`)
        # reward models first: the first one becomes the judge of the policies' win rates
        for entry in sorted(TRAINERS.values(), key=lambda t: t.role != "reward_model"):
            kind = entry.kind
            if not _done_and_active(steps[kind]):
                continue
            started = time.perf_counter()
            evaluation = entry.evaluate_function(steps[kind].path / "model", getattr(cfg, kind), ctx)
            timings[kind] = round(time.perf_counter() - started, 2)
            metrics[kind] = evaluation.metrics
            if evaluation.judge is not None and ctx.judge is None:
                ctx.judge, judged_by, held_scores = evaluation.judge, kind, evaluation.heldout_scores
        # the round's own pairs: the ones its reward model still orders wrongly become error-based candidates
        # (round 0's imported pairs are not scored: no failures step and no arms follow the bootstrap)
        round_pairs = drop_heldout_prompts(load_round_pairs(rnd), heldout) if rnd.number else []
        rows = []
        started = time.perf_counter()
        if ctx.judge is not None:
            c, r = ctx.judge.score_pairs(round_pairs, progress=progress) if round_pairs else (np.zeros(0), np.zeros(0))
            rows = [_score_row(p, ci, ri, "train") for p, ci, ri in zip(round_pairs, c, r, strict=True)]
            rows += [_score_row(p, ci, ri, "heldout") for p, ci, ri in zip(heldout, *held_scores, strict=True)]
            metrics[judged_by]["train_pairs_accuracy"] = float(np.mean(c > r)) if len(c) else None
        timings["round pairs"] = round(time.perf_counter() - started, 2)
        write_rows(run.path / "pair_scores.parquet", rows, schema=None if rows else _score_schema())
        write_json(run.path / "metrics.json", metrics)
        text = format_report(metrics, f"candidate (round {rnd.number})")
        started = time.perf_counter()
        champ_metrics = _evaluate_champion(registry, champion, cfg, ctx, metrics["heldout"]["key"])
        timings["champion"] = round(time.perf_counter() - started, 2)
        if champ_metrics:
            write_json(run.path / "champion_metrics.json", champ_metrics)
            text += "\n\n" + format_report(champ_metrics, f"champion {champion}")
            run.extra["champion"] = {"version": champion, "source": champ_metrics["source"],
                                     **{f"{k}_accuracy": champ_metrics[k]["accuracy"] for k in TRAINERS
                                        if k in champ_metrics}}
        write_text(run.path / "metrics.txt", text + "\n")
        run.counts.update({"heldout_pairs": len(heldout), "round_pairs": len(round_pairs)})
        for kind in (t.kind for t in TRAINERS.values() if t.role == "reward_model" and t.kind in metrics):
            run.extra[f"{kind}_accuracy"] = metrics[kind]["accuracy"]
            run.extra[f"{kind}_ci"] = metrics[kind]["ci"]
        run.extra["hardware"] = hardware_summary(dtype, threads)
        run.extra["timings"] = timings
    return rnd.step("evaluate").manifest()


# evaluation settings a reward model's held-out metrics depend on (besides the held-out pairs and the dtype)
REWARD_METRIC_SETTINGS = ("bootstrap", "confidence", "seed", "long_tail_share", "flip_check_pairs")


def _evaluate_champion(registry, champion: str | None, cfg, ctx, heldout_key: str) -> dict:
    """The champion's reward model(s) on the same held-out set ({} without a champion holding one), with
    `source`: "registry" when the champion's own evaluation (stored with it) was made on these held-out pairs
    with the same settings and dtype — the same numbers, so it is not scored again — else "scored"."""
    from training.evaluate import EvalContext

    if champion is None:
        return {}
    kinds = [k for k, e in TRAINERS.items() if e.role == "reward_model" and (registry.path(champion) / e.artifact).is_dir()]
    if not kinds:
        return {}
    stored, settings = registry.metrics(champion), registry.config(champion).get("evaluation", {})
    if (stored.get("heldout", {}).get("key") == heldout_key
            and all(settings.get(f) == getattr(cfg.evaluation, f) for f in REWARD_METRIC_SETTINGS)
            and all(stored.get(k, {}).get("dtype") == ctx.dtype for k in kinds)):
        reused = {k: {m: v for m, v in stored[k].items() if m != "train_pairs_accuracy"} for k in kinds}
        return {**reused, "version": champion, "source": "registry"}
    same_set = EvalContext(ctx.heldout, ctx.cfg, dtype=ctx.dtype, progress=ctx.progress)
    out = {k: TRAINERS[k].evaluate_function(registry.path(champion) / TRAINERS[k].artifact, getattr(cfg, k),
                                            same_set).metrics for k in kinds}
    return {**out, "version": champion, "source": "scored"}


def _score_row(p: PreferencePair, chosen: float, rejected: float, split: str) -> dict:
    return {"pair_id": p.id, "prompt_id": p.prompt_id, "split": split, "slice": p.slice,
            "chosen_reward": float(chosen), "rejected_reward": float(rejected), "correct": bool(chosen > rejected)}


def _score_schema():
    """Arrow schema of pair_scores rows (so a round without a reward model still writes the file's columns)."""
    import pyarrow as pa

    return pa.schema([("pair_id", pa.string()), ("prompt_id", pa.string()), ("split", pa.string()),
                      ("slice", pa.string()), ("chosen_reward", pa.float64()), ("rejected_reward", pa.float64()),
                      ("correct", pa.bool_())])


# ------------------------------------------------------------------------------------------ gate + failures
def run_gate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Register the round's models (one registry artifact per trained kind), promote them only if they pass the
    gate."""
    from training.registry import Registry, registry_root

    evaluate = rnd.step("evaluate")
    trained = {kind: rnd.step(t.step) for kind, t in TRAINERS.items() if _done_and_active(rnd.step(t.step))}
    run = rnd.start_step("gate", cfg.gate, inputs=(evaluate, *trained.values()), seeds={"seed": cfg.seed},
                         force=force)
    if run is not None:
        with run:
            registry = Registry(registry_root(cfg))
            note = f"round-{rnd.number} evaluate:{evaluate.manifest()['key']}"
            version = next((v["id"] for v in registry.versions() if v.get("note") == note), None)
            if version is None:  # not registered by an earlier, interrupted attempt
                files = {TRAINERS[kind].artifact: step.path / "model" for kind, step in trained.items()}
                lineage = {kind: read_json(step.file("lineage.json")) for kind, step in trained.items()}
                version = registry.register(
                    files, metrics=read_json(evaluate.file("metrics.json")), lineage=lineage,
                    config=json.loads(json.dumps(to_dict(cfg), default=str)), round=rnd.number, note=note,
                )
            champion_file = evaluate.path / "champion_metrics.json"
            champion_metrics = read_json(champion_file) if champion_file.is_file() else None
            if champion_metrics is not None and champion_metrics.get("version") != registry.champion():
                champion_metrics = None  # the champion changed since evaluation: use its stored metrics
            decision = registry.gate_and_promote(version, cfg.gate, champion_metrics=champion_metrics)
            write_json(run.path / "decision.json", {"version": version, **decision.to_dict(),
                                                     "champion": registry.champion()})
            run.counts.update({"promoted": int(decision.promote)})
            run.extra.update({"version": version, "promoted": decision.promote, "reasons": decision.reasons})
    return rnd.step("gate").manifest()


def failure_prompts(pairs: list[PreferencePair], scores: list[dict], round_number: int,
                    limit: int | None = None) -> list[Prompt]:
    """Pool prompts for the pairs the reward model orders wrongly (most wrong first, one per prompt)."""
    by_id = {p.id: p for p in pairs}
    wrong = sorted((s for s in scores if s["split"] == "train" and not s["correct"] and s["pair_id"] in by_id),
                   key=lambda s: s["chosen_reward"] - s["rejected_reward"])
    out, seen = [], set()
    for s in wrong:
        pair = by_id[s["pair_id"]]
        if pair.prompt_id in seen:
            continue
        seen.add(pair.prompt_id)
        margin = s["chosen_reward"] - s["rejected_reward"]
        out.append(Prompt(
            id=pair.prompt_id, messages=pair.prompt, slice=pair.slice, source=f"failure:round-{round_number}",
            metadata={"reason": FAILURE_REASON, "pair_id": pair.id, "reward_margin": f"{margin:.4f}",
                      "round": str(round_number)},
        ))
    return out[:limit] if limit is not None else out


def run_failures(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """The round's pairs the reward model still orders wrongly → failures/prompts.parquet (next round's pool)."""
    from training.data import load_round_pairs

    evaluate = rnd.step("evaluate")
    run = rnd.start_step("failures", {"max_failures": cfg.gate.max_failures}, inputs=(evaluate,),
                         seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("failures").manifest()
    with run:
        scores = read_rows(evaluate.file("pair_scores.parquet"))
        prompts = failure_prompts(load_round_pairs(rnd), scores, rnd.number, cfg.gate.max_failures)
        write_rows(run.path / "prompts.parquet", [p.to_row() for p in prompts], schema=_prompt_schema() if not prompts else None)
        run.counts.update({"failures": len(prompts),
                           "train_pairs_scored": sum(1 for s in scores if s["split"] == "train")})
    return rnd.step("failures").manifest()


def _prompt_schema():
    """Arrow schema of Prompt rows (so an empty failures file still has the right columns)."""
    import pyarrow as pa

    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.schema([("id", pa.string()), ("messages", msg), ("slice", pa.string()), ("source", pa.string()),
                      ("metadata", pa.string())])


__all__ = ["run_train", "run_evaluate", "run_gate", "run_failures", "failure_prompts", "heldout_pairs"]
