"""Step `gate`: register the round's models (one registry artifact per trained kind), promote them only if they beat
the champion → gate/decision.json."""

from __future__ import annotations

import json

from curation.steps.train import trained_and_active
from preference.plumbing.config import to_dict
from preference.plumbing.io import read_json, write_json
from training.trainers import TRAINERS


def run_gate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Register the round's models (one registry artifact per trained kind), promote them only if they pass the
    gate."""
    from training.registry import Registry, registry_root

    evaluate = rnd.step("evaluate")
    trained = {kind: rnd.step(t.step) for kind, t in TRAINERS.items() if trained_and_active(rnd.step(t.step))}
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


__all__ = ["run_gate"]
