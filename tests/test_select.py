"""`curate select` on constructed round stores: arms, exclusions, quotas, budget, error-based, reward signals."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import RoundConfig
from curation.steps.select import SelectionConfig, run_select
from preference.plumbing.config import ConfigError, from_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_rows, write_rows
from preference.plumbing.store import Project
from preference.schema import PreferencePair, Prompt

SIGNALS = ("prompt_perplexity", "mean_completion_perplexity", "mean_logprob", "mean_entropy",
           "committee_disagreement", "committee_range", "vote_entropy", "semantic_spread")


def finish(rnd, name, files, config=None):
    run = rnd.start_step(name, config or {"constructed": name})
    with run:
        for fname, rows in files.items():
            write_rows(run.path / fname, rows)


def build_round(rnd, n=40, dim=6, seed=0, failures=(), n_completions=3):
    """A round with finished pool and score steps holding exactly the scoring step's columns."""
    rng = np.random.default_rng(seed + rnd.number)
    ids = [f"q{i:03d}" for i in range(n)]
    slices = ["harmless" if i % 2 else "helpful" for i in range(n)]
    prompts = [
        Prompt(id=pid, messages=[{"role": "user", "content": f"question {pid}"}], slice=s,
               source="failure:round-1" if pid in failures else "data/x.jsonl",
               metadata={"failure": "harm_flagged"} if pid in failures else {})
        for pid, s in zip(ids, slices, strict=True)
    ]
    finish(rnd, "pool", {"prompts.parquet": [p.to_row() for p in prompts]})
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    scores = []
    for i, pid in enumerate(ids):
        row = {"prompt_id": pid, "slice": slices[i]}
        row.update({name: float(rng.normal()) for name in SIGNALS})
        row["mean_entropy"] = float(i)  # known order: the last ids are the most uncertain
        row["embedding"] = emb[i].tolist()
        scores.append(row)
    completions = []
    for i, pid in enumerate(ids):
        for j in range(n_completions):
            completions.append({
                "completion_id": f"{pid}-c{j}", "prompt_id": pid, "model": "m",
                "logprob_mean::m": -1.0, "ppl::m": 3.0, "committee_std": 0.0,
                "embedding": (emb[i] + rng.normal(size=dim)).astype(np.float32).tolist(),
            })
    finish(rnd, "score", {"prompt_scores.parquet": scores, "completion_scores.parquet": completions})
    return ids


def config(tmp_path, **selection):
    return RoundConfig(project=tmp_path, seed=3, selection=SelectionConfig(**selection))


def selected(rnd):
    return read_rows(rnd.step("select").file("selected.parquet"))


def test_end_to_end_arms_columns_and_reasons(tmp_path):
    rnd = Project(tmp_path).round(1, create=True)
    build_round(rnd)
    cfg = config(tmp_path, strategy="entropy", k=10, random_share=0.2, near_duplicate_threshold=1.0)
    manifest = run_select(cfg, rnd, progress=False)
    rows = selected(rnd)
    assert manifest["counts"]["selected"] == 10
    strategy = [r for r in rows if r["arm"] == "strategy"]
    random_arm = [r for r in rows if r["arm"] == "random"]
    assert len(strategy) == 8 and len(random_arm) == 2
    # entropy = index: the strategy arm holds the 8 highest, best first
    assert [r["prompt_id"] for r in strategy] == [f"q{i:03d}" for i in range(39, 31, -1)]
    assert [r["rank"] for r in strategy] == list(range(1, 9))
    assert not {r["prompt_id"] for r in random_arm} & {r["prompt_id"] for r in strategy}
    assert {r["strategy"] for r in random_arm} == {"random"} and strategy[0]["strategy"] == "entropy"
    assert "mean_entropy=39" in strategy[0]["reason"] and "p100" in strategy[0]["reason"]
    assert random_arm[0]["reason"].startswith("random arm")
    schema = pq.read_schema(rnd.step("select").file("selected.parquet"))
    for col in ("prompt_id", "slice", "arm", "strategy", "score", "rank", "reason", *SIGNALS, "embedding"):
        assert col in schema.names
    emb_type = schema.field("embedding").type
    assert pa.types.is_list(emb_type) and emb_type.value_type == pa.float32()
    # finished with the same config: skipped; with another: refused unless forced; same seed → same picks
    assert run_select(cfg, rnd, progress=False)["finished_at"] == manifest["finished_at"]
    with pytest.raises(CurateError, match="different config"):
        run_select(config(tmp_path, strategy="kcenter", k=10), rnd, progress=False)
    run_select(cfg, rnd, force=True, progress=False)
    assert selected(rnd) == rows


def test_default_strategy_and_random_arm_is_exact(tmp_path):
    rnd = Project(tmp_path).round(1, create=True)
    build_round(rnd, n=60)
    for share, k, expected in ((0.15, 16, 2), (0.25, 16, 4), (0.1, 10, 1), (0.0, 5, 0)):
        assert SelectionConfig(k=k, random_share=share).arm_sizes(k) == (k - expected, expected)
    run_select(config(tmp_path, k=16, random_share=0.25), rnd, progress=False)
    rows = selected(rnd)
    assert sum(r["arm"] == "random" for r in rows) == 4 and len({r["prompt_id"] for r in rows}) == 16
    assert rows[0]["strategy"] == "reward_disagreement|kcenter"  # the benchmarked default (k-center: no rewards)


def test_excludes_earlier_rounds_and_respects_budget(tmp_path):
    project = Project(tmp_path)
    first = project.round(1, create=True)
    build_round(first)
    run_select(config(tmp_path, strategy="entropy", k=10), first, progress=False)
    taken = {r["prompt_id"] for r in selected(first)}
    second = project.round(2, create=True)
    build_round(second)  # the same 40 prompt ids scored again
    manifest = run_select(config(tmp_path, strategy="entropy", k=10, budget=15), second, progress=False)
    rows = selected(second)
    assert manifest["counts"]["excluded_labelled"] == 10
    assert len(rows) == 5 and not {r["prompt_id"] for r in rows} & taken
    third = project.round(3, create=True)
    build_round(third)
    with pytest.raises(CurateError, match="budget exhausted"):
        run_select(config(tmp_path, strategy="entropy", k=10, budget=15), third, progress=False)


def test_slice_quotas_in_the_step(tmp_path):
    rnd = Project(tmp_path).round(1, create=True)
    build_round(rnd)
    run_select(config(tmp_path, strategy="entropy", k=8, random_share=0.0, slice_quotas={"helpful": 6}), rnd,
               progress=False)
    rows = selected(rnd)
    assert sum(r["slice"] == "helpful" for r in rows) >= 6
    assert [r["slice"] for r in rows[:6]] == ["helpful"] * 6
    with pytest.raises(CurateError, match="quotas add up to 9"):
        run_select(config(tmp_path, strategy="entropy", k=8, random_share=0.0, slice_quotas={"helpful": 9}),
                   rnd, force=True, progress=False)


def test_error_based_uses_failures_and_feedback(tmp_path):
    rnd = Project(tmp_path).round(1, create=True)
    build_round(rnd, failures=("q005", "q006"))
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text(json.dumps({"prompt_id": "q010", "reason": "answer was rude"}) + "\n"
                        + json.dumps({"prompt_id": "nope", "reason": "x"}) + "\n")
    manifest = run_select(config(tmp_path, strategy="error", k=3, random_share=0.0, feedback_file=feedback), rnd,
                          progress=False)
    rows = selected(rnd)
    assert {r["prompt_id"] for r in rows} == {"q005", "q006", "q010"}
    assert manifest["counts"]["feedback_unmatched"] == 1 and manifest["counts"]["error_items"] == 3
    assert any("harm_flagged" in r["reason"] for r in rows) and any("rude" in r["reason"] for r in rows)


def test_reward_strategies_need_earlier_pairs_then_work(tmp_path):
    project = Project(tmp_path)
    first = project.round(1, create=True)
    ids = build_round(first)
    cfg = config(tmp_path, strategy="reward_margin", k=4)
    with pytest.raises(CurateError, match="need preference pairs from an earlier round"):
        run_select(cfg, first, progress=False)
    pairs = [
        PreferencePair(id=f"pp{i}", prompt_id=pid, prompt=[{"role": "user", "content": "q"}],
                       chosen=[{"role": "assistant", "content": "a"}], rejected=[{"role": "assistant", "content": "b"}],
                       chosen_id=f"{pid}-c0", rejected_id=f"{pid}-c1").to_row()
        for i, pid in enumerate(ids[:20])
    ]
    finish(first, "pairs", {"pairs.parquet": pairs})
    second = project.round(2, create=True)
    build_round(second)
    manifest = run_select(cfg, second, progress=False)
    assert manifest["reward_ensemble"]["pairs"] == 20
    rows = selected(second)
    strategy = [r for r in rows if r["arm"] == "strategy"]
    margins = [r["reward_margin"] for r in strategy]
    everything = read_rows(second.step("score").file("prompt_scores.parquet"))
    assert len(everything) == 40 and all(np.isfinite(margins))
    assert "reward_margin=" in strategy[0]["reason"]
    run_select(config(tmp_path, strategy="reward_disagreement", k=4), second, force=True, progress=False)


def test_auto_takes_the_fast_ensemble_over_a_single_model_champion(tmp_path):
    """A one-model champion has no disagreement (0 everywhere): `auto` fits the fast ensemble on earlier pairs
    for `reward_disagreement` instead and says so; with two heads it takes the champion."""
    from curation.steps.rewards import OUTPUT, schema

    project = Project(tmp_path)
    first = project.round(1, create=True)
    ids = build_round(first)
    finish(first, "pairs", {"pairs.parquet": [
        PreferencePair(id=f"pp{i}", prompt_id=pid, prompt=[{"role": "user", "content": "q"}],
                       chosen=[{"role": "assistant", "content": "a"}], rejected=[{"role": "assistant", "content": "b"}],
                       chosen_id=f"{pid}-c0", rejected_id=f"{pid}-c1").to_row() for i, pid in enumerate(ids[:20])]})
    second = project.round(2, create=True)
    build_round(second)
    comps = read_rows(second.step("score").file("completion_scores.parquet"))
    rng = np.random.default_rng(0)

    def champion(members: int) -> None:
        run = second.start_step("rewards", {"members": members}, force=True)
        with run:
            rewards = rng.normal(size=(members, len(comps)))
            write_rows(run.path / OUTPUT, [
                {"completion_id": c["completion_id"], "prompt_id": c["prompt_id"], "reward_mean": float(r.mean()),
                 "reward_std": float(r.std()), **{f"reward::{k}": float(r[k]) for k in range(members)}}
                for c, r in zip(comps, rewards.T, strict=True)], schema=schema(members))
            run.extra["reward_model"] = {"version": "v0001", "registry": str(tmp_path / "registry"),
                                         "members": members}

    cfg = config(tmp_path, strategy="reward_disagreement|kcenter", k=8)
    champion(1)
    manifest = run_select(cfg, second, progress=False)
    assert manifest["reward_signals"] == "ensemble" and manifest["reward_ensemble"]["pairs"] == 20
    assert "champion v0001: a single reward model" in manifest["reward_ensemble"]["instead_of"]
    disagreement = [r["reward_disagreement"] for r in selected(second) if r["arm"] == "strategy"]
    assert max(disagreement) > 0  # the ensemble's, not the single model's zeros
    champion(2)
    manifest = run_select(cfg, second, force=True, progress=False)
    assert manifest["reward_signals"] == "champion" and manifest["reward_model"]["members"] == 2
    champion(1)  # reward_source: champion keeps the single model
    manifest = run_select(config(tmp_path, strategy="reward_disagreement|kcenter", k=8, reward_source="champion"),
                          second, force=True, progress=False)
    assert manifest["reward_signals"] == "champion" and manifest["reward_model"]["members"] == 1


def test_nan_signal_and_config_errors(tmp_path):
    rnd = Project(tmp_path).round(1, create=True)
    build_round(rnd)
    path = rnd.step("score").path / "prompt_scores.parquet"
    rows = read_rows(path)
    rows[4]["mean_entropy"] = float("nan")
    write_rows(path, rows)
    with pytest.raises(CurateError, match=r"'mean_entropy' has 1 NaN/inf.*q004"):
        run_select(config(tmp_path, strategy="entropy", k=4), rnd, progress=False)
    with pytest.raises(ConfigError, match="random_share"):
        from_dict(SelectionConfig, {"random_share": 1.5})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SelectionConfig, {"strategy_name": "x"})
    with pytest.raises(CurateError, match="unknown strategy"):
        run_select(config(tmp_path, strategy="nope", k=4), rnd, progress=False)


def test_completion_choice_writes_completion_ids(tmp_path):
    """Pairwise records (2 of 6 completions): cold start = the farthest pair; with a reward model = the pair with
    the most information about the reward difference; a random control share; ids belong to the prompt."""
    from curation.acquisition.pairing import pair_information, similarity
    from curation.steps.select import attach_rewards, load_completions

    project = Project(tmp_path)
    first = project.round(1, create=True)
    ids = build_round(first, n_completions=6)
    cfg = config(tmp_path, strategy="entropy", k=10, random_share=0.2, completions_per_record=2,
                 completion_random_share=0.2)
    manifest = run_select(cfg, first, progress=False)
    assert manifest["completion_choice"] == {"method": "info_gain", "per_record": 2, "random_share": 0.2}
    comps = load_completions(first)
    rows = selected(first)
    assert sorted(r["completion_choice"] for r in rows) == ["diverse"] * 8 + ["random"] * 2
    for row in rows:
        own = [j for j, pid in enumerate(comps.prompt_ids) if pid == row["prompt_id"]]
        assert len(row["completion_ids"]) == 2 and set(row["completion_ids"]) <= {comps.ids[j] for j in own}
        if row["completion_choice"] == "diverse":  # no reward model yet: the least similar pair
            sim = similarity(comps.embeddings[own], None, len(own))
            a, b = (own.index(comps.ids.index(c)) for c in row["completion_ids"])
            assert sim[a, b] == pytest.approx(sim[np.triu_indices(len(own), 1)].min())
    pairs = [
        PreferencePair(id=f"pp{i}", prompt_id=pid, prompt=[{"role": "user", "content": "q"}],
                       chosen=[{"role": "assistant", "content": "a"}], rejected=[{"role": "assistant", "content": "b"}],
                       chosen_id=f"{pid}-c0", rejected_id=f"{pid}-c1").to_row()
        for i, pid in enumerate(ids[:20])
    ]
    finish(first, "pairs", {"pairs.parquet": pairs})
    second = project.round(2, create=True)
    build_round(second, n_completions=6)
    run_select(cfg, second, progress=False)
    comps = load_completions(second)
    assert attach_rewards(comps, cfg.selection, second, list(second.earlier()), cfg.seed)  # the same BT ensemble
    rows = selected(second)
    assert sum(r["completion_choice"] == "info_gain" for r in rows) == 8
    for row in rows:
        if row["completion_choice"] != "info_gain":
            continue
        own = [j for j, pid in enumerate(comps.prompt_ids) if pid == row["prompt_id"]]
        info = pair_information(comps.rewards[:, own])
        a, b = (own.index(comps.ids.index(c)) for c in row["completion_ids"])
        assert info[a, b] == pytest.approx(info.max())
