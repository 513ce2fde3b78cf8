"""The `rewards` step: the champion reward model scores a round's completions, cached by model version, and
select reads its signals (a real two-round tiny project), plus the no-champion and cache behaviour."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from round_fixture import tiny_config

from curation.acquisition.ensemble import prompt_reward_signals
from curation.steps.rewards import OUTPUT, RewardCache, cache_identity, run_rewards, score_completions
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_rows
from preference.plumbing.store import Project

# under `pytest -n` (make test) these tests share one worker: the session's tiny rounds are made once
pytestmark = pytest.mark.xdist_group("tiny_rounds")

COLUMNS = ["completion_id", "prompt_id", "reward_mean", "reward_std"]


@pytest.mark.vllm
def test_round_two_scores_with_the_champion_and_select_reads_it(tiny_project, tiny_rounds, tmp_path):
    project = Project(tiny_project)
    first, second = project.round(1), project.round(2)
    # round 1: no champion yet → the step finishes with the columns and no rows; hybrid starts with k-center
    m1 = first.step("rewards").manifest()
    assert m1["reward_model"] is None and m1["counts"]["completions"] == 0
    empty = pq.read_table(first.step("rewards").file(OUTPUT))
    assert empty.num_rows == 0 and empty.column_names == COLUMNS
    assert "cold start" in first.step("select").manifest()["note"]
    # round 2: the champion promoted by round 1's gate (a 2-member ensemble) scored every completion
    m2 = second.step("rewards").manifest()
    assert m2["reward_model"] == {"version": "v0001", "registry": str(tiny_project / "registry"), "members": 2}
    rows = read_rows(second.step("rewards").file(OUTPUT))
    completions = read_rows(second.step("generate").file("completions.parquet"))
    assert sorted(r["completion_id"] for r in rows) == sorted(c["id"] for c in completions)
    members = np.array([[r["reward::0"], r["reward::1"]] for r in rows]).T
    assert np.allclose([r["reward_mean"] for r in rows], members.mean(axis=0))
    assert np.allclose([r["reward_std"] for r in rows], members.std(axis=0))
    assert np.isfinite(members).all() and (members.std(axis=0) > 0).any()  # two heads that really differ
    # the scores are the champion's own: rescoring a few conversations directly gives the same numbers
    from curation.steps.pool import load_prompts
    from training.reward import RewardModel

    prompts = {p.id: p for p in load_prompts(second)}
    texts = {c["id"]: c for c in completions}
    sample = rows[:3]
    convs = [[*prompts[r["prompt_id"]].messages, {"role": "assistant", "content": texts[r["completion_id"]]["text"]}]
             for r in sample]
    # at the precision the step ran in (its manifest says; `auto` differs between machine classes). Rescored in
    # another batch: fp32 agrees to rounding; bf16 (8-bit mantissa) rounds a differently padded batch differently
    dtype = m2["hardware"]["dtype"]
    direct = RewardModel.load(tiny_project / "registry" / "v0001" / "reward", dtype=dtype).member_rewards(convs)
    assert np.allclose(direct, [[r["reward::0"] for r in sample], [r["reward::1"] for r in sample]],
                       atol={"float32": 1e-4, "bfloat16": 3e-2}[dtype])
    # the push step suggests the champion's ranking on every record, the gold ones included (no tell)
    push = second.step("push").manifest()
    assert push["counts"]["gold"] > 0 and push["counts"]["with_suggestions"] == push["counts"]["records"]
    # select used the champion's rewards: its reward signals are the step's numbers, per prompt
    sel = second.step("select").manifest()
    assert sel["reward_signals"] == "champion" and sel["reward_model"]["version"] == "v0001"
    pids = sorted({r["prompt_id"] for r in rows})
    index = np.array([pids.index(r["prompt_id"]) for r in rows])
    expected = prompt_reward_signals(members, index, len(pids))
    for row in read_rows(second.step("select").file("selected.parquet")):
        i = pids.index(row["prompt_id"])
        assert row["reward_margin"] == pytest.approx(expected["reward_margin"][i])
        assert row["reward_disagreement"] == pytest.approx(expected["reward_disagreement"][i])
        assert row["strategy"] in ("random", "weighted(reward_margin=1,reward_disagreement=1)>kcenter")
        assert set(row["completion_ids"]) <= {r["completion_id"] for r in rows if r["prompt_id"] == row["prompt_id"]}
        assert 2 <= len(row["completion_ids"]) <= 5
    # the cache is keyed by model version: under v0001 every conversation of the round is served from it (a
    # model that must not be called), and the numbers are the step's
    class MustNotLoad:
        members = ["member-0", "member-1"]

        def member_rewards(self, conversations):
            raise AssertionError(f"{len(conversations)} conversations recomputed despite the cache")

    all_convs = [[*prompts[r["prompt_id"]].messages,
                  {"role": "assistant", "content": texts[r["completion_id"]]["text"]}] for r in rows]
    cache = RewardCache(tiny_project / "cache" / "rewards.sqlite",
                        cache_identity(tiny_project / "registry" / "v0001" / "reward", dtype))
    cached, computed = score_completions(MustNotLoad(), all_convs, cache, progress=False)
    assert computed == 0 and np.allclose(cached, members)
    # another champion (round 2's registered candidate v0002, promoted here in a copy of the project if its gate
    # did not): another model, so a rerun scores everything anew, under v0002
    from training.registry import Registry

    copy = tiny_rounds.copy_project(tmp_path / "proj")
    if Registry(copy / "registry").champion() != "v0002":
        Registry(copy / "registry").promote("v0002", reason="test")
    again = run_rewards(tiny_config(copy), Project(copy).round(2), force=True, progress=False)
    assert again["reward_model"]["version"] == "v0002" and again["counts"]["computed"] == len(rows)
    assert again["reward_cache"]["model_sha256"] != cache.identity


def _round_with_completions(tmp_path):
    from curation.config import RoundConfig
    from preference.plumbing.io import write_rows
    from preference.schema import Completion, Prompt

    rnd = Project(tmp_path / "proj").round(1, create=True)
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    comps = [Completion(id=f"c{i}{j}", prompt_id=f"p{i}", model="m", text=f"a{i}{j}") for i in range(3) for j in range(2)]
    for name, fname, rows in (("pool", "prompts.parquet", [p.to_row() for p in prompts]),
                              ("generate", "completions.parquet", [c.to_row() for c in comps])):
        with rnd.start_step(name, {"constructed": name}) as run:
            write_rows(run.path / fname, rows)
    return RoundConfig(project=tmp_path / "proj"), rnd


def test_no_champion_writes_columns_and_no_rows(tmp_path):
    cfg, rnd = _round_with_completions(tmp_path)
    manifest = run_rewards(cfg, rnd, progress=False)
    assert manifest["reward_model"] is None and "no champion" in manifest["note"]
    assert pq.read_table(rnd.step("rewards").file(OUTPUT)).column_names == COLUMNS
    cfg.selection.reward_source = "champion"
    with pytest.raises(CurateError, match="no champion with a reward model"):
        run_rewards(cfg, rnd, force=True, progress=False)


def test_cache_scores_each_conversation_once_per_model(tmp_path):
    class Counting:
        members = ["member-0", "member-1"]

        def __init__(self):
            self.seen = 0

        def member_rewards(self, conversations):
            self.seen += len(conversations)
            lengths = np.array([len(c[-1]["content"]) for c in conversations], dtype=float)
            return np.stack([lengths, -lengths])

    convs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * n}] for n in (1, 2, 3, 2)]
    model = Counting()
    cache = RewardCache(tmp_path / "rewards.sqlite", "model-a")
    rewards, computed = score_completions(model, convs, cache, progress=False)
    assert computed == 3 and model.seen == 3  # the repeated conversation is scored once
    assert rewards.tolist() == [[1, 2, 3, 2], [-1, -2, -3, -2]]
    again, computed = score_completions(model, convs, cache, progress=False)
    assert computed == 0 and model.seen == 3 and np.array_equal(again, rewards)
    other = RewardCache(tmp_path / "rewards.sqlite", "model-b")  # another model version: nothing reused
    assert score_completions(model, convs[:1], other, progress=False)[1] == 1
