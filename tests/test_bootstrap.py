"""Seed labels → round 0 → round 1, end to end on the tiny model (dummy generation and scoring: no vLLM, seconds):
`curate round run` bootstraps first (labels imported, a 2-member reward ensemble and DPO trained, evaluated and
promoted), then round 1 draws its pool without the seed prompts, scores every completion with the champion (the
reviewers' suggestions, the ensemble's disagreement for selection), replays round 0's pairs and plots two points on
the learning curve. `curate export` ships both rounds (tests/test_export.py reuses this project)."""

from __future__ import annotations

import pytest
from seeded_fixture import SEED_OVERLAP, TINY, UNPAIRED, curate

from preference.plumbing.io import read_json, read_rows
from preference.plumbing.store import Project

pytestmark = pytest.mark.xdist_group("seeded")  # the session's seeded project (tests/seeded_fixture.py)


def config(args: list[str]):
    from curation.config import load_config
    from preference.plumbing.config import replace_path

    cfg = load_config(TINY)
    for key, value in (a.split("=", 1) for a in args[3::2]):
        cfg = replace_path(cfg, key, value)
    return cfg


def test_round_run_bootstraps_first_then_round_one_uses_the_champion(seeded):
    project, _, out = seeded
    r0, r1 = project / "round-0000", project / "round-0001"
    lines = out.stdout.splitlines()
    assert lines[0] == f"bootstrap (round 0) → {r0}" and f"round 1 → {r1}" in lines
    summary = next(line for line in lines if "imported" in line and "held-out reward accuracy" in line)
    assert "imported 13 pairs and 4 unpaired judgements" in summary and "v0001 promoted to champion" in summary
    labels = read_json(r0 / "labels" / "manifest.json")
    assert labels["counts"]["pairs"] == 13 and labels["counts"]["feedback"] == UNPAIRED
    assert [s["name"] for s in labels["sources"]] == ["last-quarter", "hh", "thumbs"]
    # the bootstrap's trainer settings (labels.train) and each imported pair once (new_weight is for loop labels)
    reward = read_json(r0 / "train_reward" / "manifest.json")
    assert reward["config"]["reward"]["max_steps"] == 3 and reward["counts"]["new"] == 13
    assert read_json(r1 / "train_reward" / "manifest.json")["config"]["reward"]["max_steps"] == 2
    index = read_json(project / "registry" / "index.json")
    v1 = next(v for v in index["versions"] if v["id"] == "v0001")
    assert v1["round"] == 0 and index["champions"][0] == "v0001" and sorted(v1["files"]) == ["policy", "reward"]
    lineage = read_json(project / "registry" / "v0001" / "lineage.json")
    seed_ids = {r["id"] for r in read_rows(r0 / "labels" / "pairs.parquet")}
    assert set(lineage["reward"]["rounds"]["round-0"]) == seed_ids
    # round 1: seed prompts left the pool; every completion scored by the champion's 2 heads; suggestions
    pool = read_json(r1 / "pool" / "manifest.json")["counts"]
    assert pool["seed_prompts_removed"] == SEED_OVERLAP and pool["prompts"] == 24 - SEED_OVERLAP
    rewards = read_json(r1 / "rewards" / "manifest.json")
    assert rewards["reward_model"] == {"version": "v0001", "registry": str(project / "registry"), "members": 2}
    assert rewards["counts"]["completions"] == len(read_rows(r1 / "generate" / "completions.parquet"))
    push = read_json(r1 / "push" / "manifest.json")["counts"]
    assert push["with_suggestions"] == push["records"]
    assert read_json(r1 / "select" / "manifest.json")["reward_signals"] == "champion"
    # replay: round 1's reward model saw round 0's pairs too
    replayed = read_json(r1 / "train_reward" / "lineage.json")["rounds"]["round-0"]
    assert replayed and set(replayed) <= seed_ids


def test_learning_curve_and_report_start_at_round_zero(seeded):
    from curation.acquisition.budget import learning_curve
    from curation.steps.report import round_points

    project, _, _ = seeded
    r1 = Project(project).round(1)
    curve = learning_curve(r1)
    assert [p["round"] for p in curve["points"]] == [0, 1] and curve["fit"] is not None
    assert curve["points"][0]["labels"] == 15 and curve["points"][1]["labels"] > 15
    points = round_points(r1)
    assert [(p["round"], p["imported"]) for p in points] == [(0, 15), (1, 0)]  # 13 pairs' + 2 unpaired prompts
    assert points[1]["labels_cumulative"] == 15 + points[1]["strategy"] + points[1]["random"]
    summary = (project / "round-0001" / "report" / "summary.txt").read_text()
    assert "imported seed labels (round 0, `curate bootstrap`): labels on 15 prompts" in summary


def test_status_lists_round_zero_and_bootstrap_is_not_redone(seeded):
    project, args, _ = seeded
    status = curate("status", *args)
    assert status.returncode == 0
    rows = [line.split() for line in status.stdout.splitlines()[1:]]
    assert [r[1] for r in rows if r[0] == "0"][:7] == ["labels", "embed", "train_reward", "train_dpo", "train_kto",
                                                     "evaluate", "gate"]
    again = curate("bootstrap", *args, "-q")  # finished: every step skipped
    assert again.returncode == 0 and again.stdout.count("skipped (finished earlier)") == 7
    forced = curate("bootstrap", *args, "--force")  # round 1 drew its pool: refused, one line
    assert forced.returncode == 2 and len(forced.stderr.strip().splitlines()) == 1
    assert "already drew its pool: seed labels must be imported before round 1's pool" in forced.stderr


def test_bootstrap_is_due_only_before_the_loop_without_a_champion(seeded, tmp_path):
    from curation.round import bootstrap_due

    project, args, _ = seeded
    cfg = config(args)
    assert not bootstrap_due(cfg, Project(project))  # round 0 finished, round 1 drew its pool
    fresh = Project(tmp_path / "fresh")
    assert bootstrap_due(cfg.__class__(**{**cfg.__dict__, "project": fresh.root}), fresh)
    without = cfg.__class__(**{**cfg.__dict__, "project": fresh.root,
                               "labels": cfg.labels.__class__(sources=[])})
    assert not bootstrap_due(without, fresh)
    shared = cfg.__class__(**{**cfg.__dict__, "project": fresh.root,
                              "gate": cfg.gate.__class__(**{**cfg.gate.__dict__, "registry": project / "registry"})})
    assert not bootstrap_due(shared, fresh)  # the registry already has a champion


def test_embed_step_feeds_the_fast_ensemble_the_imported_pairs(seeded, tiny_sentence_model, tmp_path):
    """With a sentence embedder, round 0's embed step embeds the imported answers as the score step embeds
    completions, and selection's `earlier_pairs` finds round 0's pairs with them (the fast reward ensemble that
    `reward_source: auto` takes over a one-head champion)."""
    import shutil

    from curation.steps.embed import run_embed
    from curation.steps.select import earlier_pairs
    from preference.plumbing.config import replace_path

    project, args, _ = seeded
    copy = tmp_path / "proj"
    shutil.copytree(project / "round-0000", copy / "round-0000")
    cfg = config(args)
    for key, value in (("project", str(copy)), ("scoring.backend.name", "transformers"),
                       ("scoring.embedding_model", str(tiny_sentence_model))):
        cfg = replace_path(cfg, key, value)
    r0 = Project(copy).bootstrap_round()
    assert "not a sentence embedder" in read_json(r0.path / "embed" / "manifest.json")["note"]  # the fixture's
    manifest = run_embed(cfg, r0, force=True, progress=False)
    pairs = read_rows(r0.path / "labels" / "pairs.parquet")
    assert manifest["counts"] == {"pairs": len(pairs), "texts": len({p[k] for p in pairs
                                                                    for k in ("chosen_id", "rejected_id")})}
    found, missing = earlier_pairs([r0])
    assert len(found) == len(pairs) and missing == 0 and found.chosen.shape[1] == 32
    small = replace_path(cfg, "labels.embed_pairs", "5")
    run_embed(small, r0, force=True, progress=False)
    found, missing = earlier_pairs([r0])
    assert len(found) == 5 and missing == len(pairs) - 5
