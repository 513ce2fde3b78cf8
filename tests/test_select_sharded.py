"""Select with `selection.sharding: {backend: ray}`: each shard of the scored pool is reduced on its worker
(candidates, a uniform sample for the random arm, score sketches); the driver never receives the whole pool."""

from __future__ import annotations

import numpy as np
import pytest

from curation.acquisition.strategies import Entropy, Items, KCenterGreedy, SliceQuotas, TopThenDiverse
from curation.steps import select as SS


def test_sample_counts_follow_the_shard_sizes_and_the_seed():
    sizes = [100, 300, 600]
    draws = np.stack([SS.sample_counts(sizes, 20, np.random.default_rng([5, i])) for i in range(2000)])
    assert (draws.sum(axis=1) == 20).all() and (draws <= np.asarray(sizes)).all()
    assert np.allclose(draws.mean(axis=0), [2.0, 6.0, 12.0], atol=0.15)  # E = 20 · size / 1000; SE ≈ 0.03-0.05
    again = SS.sample_counts(sizes, 20, np.random.default_rng([5, 0]))
    assert (again == draws[0]).all()


def test_random_arm_is_uniform_over_the_pool_without_the_strategy_picks():
    """Whole procedure, shards simulated: hypergeometric counts per shard, uniform draws within each shard, the
    driver's shuffle without the picks. Every eligible row that is not picked is equally likely."""
    sizes = [5, 12, 3]
    offsets = np.cumsum([0] + sizes)
    picked = {"1", "7", "8", "18"}
    n_random, k = 3, 7
    hits = np.zeros(sum(sizes))
    trials = 6000
    for t in range(trials):
        rng = np.random.default_rng([9, t])
        counts = SS.sample_counts(sizes, k, rng)
        sample = []
        for s, c in enumerate(counts):
            rows = np.sort(rng.choice(sizes[s], size=c, replace=False)) + offsets[s]
            sample += [str(r) for r in rows]
        chosen = SS.random_arm(sample, picked, n_random, rng)
        assert len(chosen) == n_random and not {sample[j] for j in chosen} & picked
        for j in chosen:
            hits[int(sample[j])] += 1
    free = [i for i in range(sum(sizes)) if str(i) not in picked]
    expected = trials * n_random / len(free)  # 1125
    assert hits[[int(p) for p in picked]].sum() == 0
    assert np.abs(hits[free] - expected).max() < 5 * np.sqrt(expected)  # binomial SE ≈ 31


def _pool(n: int, seed: int = 0) -> Items:
    rng = np.random.default_rng(seed)
    return Items(ids=np.array([f"p{i}" for i in range(n)], dtype=object),
                 signals={"mean_entropy": rng.random(n)}, embeddings=rng.normal(size=(n, 8)).astype(np.float32),
                 slices=np.array(["a", "b"] * (n // 2), dtype=object))


def test_candidates_of_shards_hold_the_pool_top_k_and_quota_slices():
    pool = _pool(400)
    shards = [np.arange(0, 150), np.arange(150, 400)]
    rng = np.random.default_rng(0)
    for strategy, k in ((Entropy(), 10), (TopThenDiverse(Entropy(), factor=3.0), 10)):
        union = np.concatenate([rows[strategy.candidates(pool.subset(rows), k, rng)] for rows in shards])
        whole_top = strategy.candidates(pool, k, rng)
        assert set(whole_top) <= set(union.tolist())
        if isinstance(strategy, TopThenDiverse):
            assert len(union) == 2 * 30  # each shard's top 3·k by entropy: the driver's shortlist is in the union
    quotas = SliceQuotas(Entropy(), {"b": 4})
    rows = quotas.candidates(pool, 5, rng)
    assert (pool.slices[rows] == "b").sum() >= 5 and len(set(rows.tolist())) == len(rows)
    # k-center's candidates are its own picks (the composable core-set), measured from the pool's center
    part = pool.subset(shards[0])
    part.center = pool.embeddings.mean(axis=0)
    assert len(KCenterGreedy().candidates(part, 7, rng)) == 7


def test_sketch_percentiles_match_exact_percentiles():
    rng = np.random.default_rng(1)
    values = rng.normal(size=3000)
    pct = SS.SketchPercentiles([{"x": SS.sketch(values[:1000])}, {"x": SS.sketch(values[1000:])}])
    probe = values[:50].copy()
    pct.register(probe, "x")
    for v in probe[:20]:
        assert abs(pct.at_most(probe, v) - 100.0 * np.mean(values <= v)) < 0.5
        assert abs(pct.at_least(probe, v) - 100.0 * np.mean(values >= v)) < 0.5


def _scored_round(root, hh_sample, limit=24):
    from curation.config import RoundConfig
    from curation.steps.generate import GenerationConfig, run_generate
    from curation.steps.pool import PoolConfig, PoolSource, run_pool
    from curation.steps.score import ScoringConfig, run_score
    from preference.plumbing.store import Project

    cfg = RoundConfig(
        project=root, pool=PoolConfig(sources=[PoolSource(path=hh_sample, limit=limit)]),
        generation=GenerationConfig(backend="dummy", models=["dummy"], n=2, cache=False),
        scoring=ScoringConfig(backend="dummy", committee=["dummy-a", "dummy-b"]),
    )
    rnd = Project(cfg.project).round(create=True)
    run_pool(cfg, rnd, progress=False)
    run_generate(cfg, rnd, progress=False)
    run_score(cfg, rnd, progress=False)
    return cfg, rnd


@pytest.mark.slow
def test_select_reduced_on_two_ray_workers(tmp_path, hh_sample, monkeypatch):
    """On a single-node Ray (2 worker processes): a pure score strategy picks the same prompts as the unsharded
    step; the default strategy picks a valid set with its random arm; what the workers send back is the
    candidates and the sample, not the pool."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    import curation.steps.select as S
    from curation.sharded import ShardingConfig, map_shards, session

    returned = []

    def recording(fn, *args, **kwargs):
        results = map_shards(fn, *args, **kwargs)
        returned.append((fn.__name__, results))
        return results

    monkeypatch.setattr(S, "map_shards", recording)
    cfg, rnd = _scored_round(tmp_path / "proj", hh_sample)
    ray_cfg = ShardingConfig(backend="ray", address="local", num_shards=2)
    whole_pool_reads = []
    real_load_items = S.load_items
    monkeypatch.setattr(S, "load_items", lambda *a, **kw: whole_pool_reads.append(a) or real_load_items(*a, **kw))
    with session(ray_cfg):  # one Ray start for the three sharded steps below (each step reuses a running Ray)
        _check_sharded_selects(cfg, rnd, ray_cfg, returned, tmp_path)
    assert len(whole_pool_reads) == 1  # only the unsharded reference run read the whole pool into the driver


def _check_sharded_selects(cfg, rnd, ray_cfg, returned, tmp_path):
    import dataclasses
    import shutil

    from curation.sharded import ShardingConfig
    from curation.steps.select import SelectionConfig, run_select
    from preference.plumbing.io import read_rows
    from preference.plumbing.store import Project

    picked = {}
    for name, sharding in (("local", ShardingConfig()), ("ray", ray_cfg)):
        cfg.selection = SelectionConfig(strategy="committee", k=5, random_share=0.0, near_duplicate_threshold=1.0,
                                        sharding=sharding)
        manifest = run_select(cfg, rnd, force=True, progress=False)
        rows = read_rows(rnd.step("select").file("selected.parquet"))
        picked[name] = rows
    assert [r["prompt_id"] for r in picked["ray"]] == [r["prompt_id"] for r in picked["local"]]
    assert [r["score"] for r in picked["ray"]] == [r["score"] for r in picked["local"]]
    assert manifest["counts"]["shards"] == 2 and manifest["sharding"]["candidates_per_shard"] == 8
    reduced = dict(returned)["reduce_shard"]
    assert [len(r["candidates"]["ids"]) for r in reduced] == [8, 8]  # ceil(1.5 · 5) of each shard's 12 rows
    assert all(len(r["sample"]["ids"]) == 0 for r in reduced)

    # the default strategy (cold start: k-center) with its 25 % random arm and near-duplicate filter
    returned.clear()
    cfg.selection = SelectionConfig(k=8, sharding=ray_cfg)
    manifest = run_select(cfg, rnd, force=True, progress=False)
    rows = read_rows(rnd.step("select").file("selected.parquet"))
    arms = [r["arm"] for r in rows]
    assert arms == ["strategy"] * 6 + ["random"] * 2 and len({r["prompt_id"] for r in rows}) == 8
    assert all(len(r["completion_ids"]) == 2 and len(r["embedding"]) > 0 for r in rows)
    assert "cold start" in manifest["note"] and manifest["counts"]["scored"] == 24
    stats, reduced = dict(returned)["shard_stats"], dict(returned)["reduce_shard"]
    assert [s["rows"] for s in stats] == [12, 12]
    assert sum(len(r["sample"]["ids"]) for r in reduced) == 8  # a uniform sample of k rows for the random arm
    assert all(len(r["candidates"]["ids"]) <= 9 for r in reduced)  # ceil(1.5 · 6), never the shard's 12 rows
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "proj", again)
    rnd2 = Project(again).round(number=rnd.number)
    run_select(dataclasses.replace(cfg, project=again), rnd2, force=True, progress=False)
    assert read_rows(rnd2.step("select").file("selected.parquet")) == rows  # same seed, same picks
