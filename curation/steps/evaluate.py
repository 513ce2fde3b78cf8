"""Step `evaluate`: each model the round trained on the held-out set (evaluation.heldout) → evaluate/metrics.json (one
entry per trained kind), metrics.txt, pair_scores.parquet (the round's pairs scored by its reward model)."""

from __future__ import annotations

import time

import numpy as np

from curation.steps.train import heldout_pairs, trained_and_active
from preference.plumbing.hardware import hardware_summary, resolve_dtype, resolve_threads
from preference.plumbing.io import write_json, write_rows, write_text
from preference.schema import PreferencePair, stable_id
from training.trainers import TRAINERS


def run_evaluate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Evaluate each model the round trained (the table's trainers, in order) on the held-out set; compare the
    reward model with the champion's on the same set."""
    import torch

    from training.data import drop_heldout_prompts, load_round_pairs
    from training.evaluate import EvalContext, format_report
    from training.registry import Registry, registry_root

    # reward models are required (they judge policies and the round's pairs); other trainers when they trained
    steps = {kind: rnd.step(t.step) for kind, t in TRAINERS.items()}
    inputs = tuple(s for kind, s in steps.items() if TRAINERS[kind].role == "reward_model" or trained_and_active(s))
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
            if not trained_and_active(steps[kind]):
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


__all__ = ["run_evaluate"]
