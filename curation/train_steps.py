"""`curate train reward|dpo`, `curate evaluate`, `curate gate`: round-store steps around `training/`.

    train_reward   pull/pairs.parquet (+ replay of earlier rounds' pairs) → train_reward/model, lineage.json
    train_dpo      same data → train_dpo/model (LoRA adapter on the policy), lineage.json
    evaluate       held-out set (evaluation.heldout) → evaluate/metrics.json, metrics.txt, pair_scores.parquet
    gate           registers the round's models, promotes them only if they beat the champion → gate/decision.json
    failures       the round's pairs the reward model still orders wrongly, as pool prompts with source
                   "failure:round-N" → failures/prompts.parquet (read by the next round's pool step)

Held-out prompts are removed from every training set (`training.data.drop_heldout_prompts`), so the held-out
evaluation stays clean even when the pool is drawn from the same file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from preference.plumbing.config import to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, read_rows, write_json, write_rows, write_text
from preference.schema import PreferencePair, Prompt

FAILURE_REASON = "reward model prefers the rejected answer"


# ------------------------------------------------------------------------------------------------- helpers
def heldout_pairs(cfg) -> list[PreferencePair]:
    """The held-out evaluation pairs of the config (deterministic; see `training.data.split_heldout`)."""
    from training.data import load_hh_pairs, split_heldout

    pairs = load_hh_pairs(cfg.evaluation.heldout)
    return split_heldout(pairs, min(cfg.evaluation.heldout_size, len(pairs) - 1))[1]


def _training_set(cfg, rnd, section) -> tuple:
    """(pairs with repeats, counts, lineage, replay input keys) for `section` (cfg.reward or cfg.dpo)."""
    from training.data import drop_heldout_prompts, earlier_round_pairs, load_round_pairs, mix_replay

    heldout = heldout_pairs(cfg)
    new = load_round_pairs(rnd)
    earlier = earlier_round_pairs(rnd, section.replay.rounds) if section.replay.ratio > 0 else []
    n_before = len(new) + sum(len(p) for _, p in earlier)
    new = drop_heldout_prompts(new, heldout)
    earlier = [(age, drop_heldout_prompts(pairs, heldout)) for age, pairs in earlier]
    n_after = len(new) + sum(len(p) for _, p in earlier)
    if not new:
        raise CurateError(
            f"round {rnd.number}: no training pairs left (pull produced {n_before} pairs, all on held-out prompts or "
            "none at all); label more items or use a different evaluation.heldout file"
        )
    rng = np.random.default_rng([cfg.seed, rnd.number])
    mixed = mix_replay(new, earlier, section.replay, rng, round_number=rnd.number)
    pairs = mixed.pairs[: section.max_train_pairs] if section.max_train_pairs else mixed.pairs
    counts = {**mixed.counts, "heldout_prompts_dropped": n_before - n_after, "trained": len(pairs)}
    return pairs, counts, mixed.lineage


def _replay_keys(rnd, rounds: int | None) -> dict[str, str]:
    """Manifest keys of earlier rounds' finished pull steps (part of a training step's key)."""
    return {f"round-{prev.number}": prev.step("pull").manifest()["key"]
            for prev in rnd.earlier(rounds) if prev.step("pull").done}


def _heldout_key(cfg) -> dict:
    return {"heldout": str(cfg.evaluation.heldout), "heldout_size": cfg.evaluation.heldout_size}


def _move_model(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)


def _done_and_active(step) -> bool:
    return step.done and not step.manifest().get("skipped", False)


# ---------------------------------------------------------------------------------------------- train steps
def _run_train(kind: str, cfg, rnd, *, force: bool, progress: bool) -> dict:
    """Step `train_<kind>`: train on the round's pairs plus replay → train_<kind>/model (skipped when disabled)."""
    from training.launch import run_training

    section, name = getattr(cfg, kind), f"train_{kind}"
    config = {kind: section, **_heldout_key(cfg), "replay_inputs": _replay_keys(rnd, section.replay.rounds)}
    run = rnd.start_step(name, config, inputs=(rnd.step("pull"),), seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step(name).manifest()
    with run:
        if not getattr(section, "enabled", True):
            run.extra["skipped"] = True
            run.counts["trained"] = 0
        else:
            pairs, counts, lineage = _training_set(cfg, rnd, section)
            stats = run_training(kind, pairs, section, run.parts_dir / "train", seed=cfg.seed, progress=progress)
            _move_model(run.parts_dir / "train" / "model", run.path / "model")
            write_json(run.path / "lineage.json", {"rounds": lineage, "counts": counts})
            write_json(run.path / "train_stats.json", stats)
            run.counts.update(counts)
            summary = stats["members"][0] if kind == "reward" else stats
            run.extra["train"] = {k: v for k, v in summary.items() if k not in ("losses", "reward_accuracies")}
    return rnd.step(name).manifest()


def run_train_reward(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Train the LoRA reward model (or ensemble) on the round's pairs plus replay → train_reward/model."""
    return _run_train("reward", cfg, rnd, force=force, progress=progress)


def run_train_dpo(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """DPO/LoRA on the policy with the round's pairs plus replay → train_dpo/model (skipped when disabled)."""
    return _run_train("dpo", cfg, rnd, force=force, progress=progress)


# --------------------------------------------------------------------------------------------------- evaluate
def run_evaluate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Evaluate the round's reward model (and DPO policy) on the held-out set; compare with the champion."""
    import torch

    from training.evaluate import evaluate_policy, evaluate_reward_model, format_report
    from training.registry import Registry, registry_root
    from training.reward import RewardModel

    reward_step, dpo_step = rnd.step("train_reward"), rnd.step("train_dpo")
    inputs = (reward_step, dpo_step) if dpo_step.done else (reward_step,)
    registry = Registry(registry_root(cfg))
    champion = registry.champion() if cfg.evaluation.compare_champion else None
    # the champion is not part of the step key: a promotion must not make this round's evaluation "stale"; the
    # gate notices when the champion changed since and falls back to the champion's stored metrics
    run = rnd.start_step("evaluate", cfg.evaluation, inputs=inputs, seeds={"seed": cfg.evaluation.seed}, force=force)
    if run is None:
        return rnd.step("evaluate").manifest()
    with run:
        torch.set_num_threads(cfg.evaluation.threads)
        heldout = heldout_pairs(cfg)
        rm = RewardModel.load(reward_step.path / "model")
        metrics = {"heldout": {"file": str(cfg.evaluation.heldout), "pairs": len(heldout)}}
        metrics["reward"], held_scores = evaluate_reward_model(rm, heldout, cfg.evaluation, progress=progress)
        # the round's own pairs: the ones still ordered wrongly become next round's error-based candidates
        from training.data import drop_heldout_prompts, load_round_pairs

        round_pairs = drop_heldout_prompts(load_round_pairs(rnd), heldout)
        c, r = rm.score_pairs(round_pairs, progress=progress) if round_pairs else (np.zeros(0), np.zeros(0))
        rows = [_score_row(p, ci, ri, "train") for p, ci, ri in zip(round_pairs, c, r, strict=True)]
        rows += [_score_row(p, ci, ri, "heldout") for p, ci, ri in zip(heldout, *held_scores, strict=True)]
        write_rows(run.path / "pair_scores.parquet", rows)
        metrics["reward"]["train_pairs_accuracy"] = float(np.mean(c > r)) if len(c) else None
        if _done_and_active(dpo_step):
            previous = _previous_policy(registry, champion, cfg)
            metrics["dpo"] = evaluate_policy(dpo_step.path / "model", previous, rm, heldout, cfg.evaluation,
                                             beta=cfg.dpo.beta, progress=progress)
        write_json(run.path / "metrics.json", metrics)
        text = format_report(metrics, f"candidate (round {rnd.number})")
        if champion is not None and (registry.path(champion) / "reward").is_dir():
            champ_rm = RewardModel.load(registry.path(champion) / "reward")
            champ_metrics = {"reward": evaluate_reward_model(champ_rm, heldout, cfg.evaluation, progress=progress)[0]}
            champ_metrics["version"] = champion
            write_json(run.path / "champion_metrics.json", champ_metrics)
            text += "\n\n" + format_report(champ_metrics, f"champion {champion}")
            run.extra["champion"] = {"version": champion, "reward_accuracy": champ_metrics["reward"]["accuracy"]}
        write_text(run.path / "metrics.txt", text + "\n")
        run.counts.update({"heldout_pairs": len(heldout), "round_pairs": len(round_pairs)})
        run.extra["reward_accuracy"] = metrics["reward"]["accuracy"]
        run.extra["reward_ci"] = metrics["reward"]["ci"]
    return rnd.step("evaluate").manifest()


def _score_row(p: PreferencePair, chosen: float, rejected: float, split: str) -> dict:
    return {"pair_id": p.id, "prompt_id": p.prompt_id, "split": split, "slice": p.slice,
            "chosen_reward": float(chosen), "rejected_reward": float(rejected), "correct": bool(chosen > rejected)}


def _previous_policy(registry, champion: str | None, cfg) -> str:
    """The policy to beat: the champion's DPO adapter, else the untuned base policy."""
    if champion is not None and (registry.path(champion) / "policy").is_dir():
        return str(registry.path(champion) / "policy")
    return cfg.dpo.base_model


# ------------------------------------------------------------------------------------------ gate + failures
def run_gate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Register the round's models, promote them only if they pass the gate, and write the failures step."""
    from training.registry import Registry, registry_root

    evaluate, reward_step, dpo_step = rnd.step("evaluate"), rnd.step("train_reward"), rnd.step("train_dpo")
    inputs = (evaluate, reward_step) + ((dpo_step,) if dpo_step.done else ())
    run = rnd.start_step("gate", cfg.gate, inputs=inputs, seeds={"seed": cfg.seed}, force=force)
    if run is not None:
        with run:
            registry = Registry(registry_root(cfg))
            note = f"round-{rnd.number} evaluate:{evaluate.manifest()['key']}"
            version = next((v["id"] for v in registry.versions() if v.get("note") == note), None)
            if version is None:  # not registered by an earlier, interrupted attempt
                files = {"reward": reward_step.path / "model"}
                lineage = {"reward": read_json(reward_step.file("lineage.json"))}
                if _done_and_active(dpo_step):
                    files["policy"] = dpo_step.path / "model"
                    lineage["dpo"] = read_json(dpo_step.file("lineage.json"))
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


__all__ = ["run_train_reward", "run_train_dpo", "run_evaluate", "run_gate", "run_failures", "failure_prompts", "heldout_pairs"]
