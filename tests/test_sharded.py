import pytest

from curation.sharded import ShardingConfig, map_shards, split


def square_all(shard, offset=0):
    import os

    return [(x * x + offset, os.getpid()) for x in shard]


def test_split_balanced_and_ordered():
    shards = split(list(range(10)), 3)
    assert [len(s) for s in shards] == [3, 4, 3] and sum(shards, []) == list(range(10))
    assert split([1, 2], 5) == [[1], [2]]
    assert split([], 3) == []


def test_local_map_matches_serial():
    out = map_shards(square_all, list(range(7)), ShardingConfig(num_shards=3), offset=1)
    assert [v for shard in out for v, _ in shard] == [x * x + 1 for x in range(7)]


def test_bad_config():
    with pytest.raises(ValueError, match="num_shards must be ≥ 1"):
        ShardingConfig(num_shards=0)


@pytest.mark.slow
def test_single_node_ray_gives_identical_results():
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    from preference.schema import stable_id  # importable on Ray workers (test-module functions are not)

    items = [f"prompt {i}" for i in range(9)]
    local = map_shards(stable_id, items, ShardingConfig(num_shards=3))
    remote = map_shards(stable_id, items, ShardingConfig(backend="ray", address="local", num_shards=3))
    assert remote == local and len(set(local)) == 3


@pytest.mark.slow
def test_generate_sharded_on_ray_matches_local(tmp_path, hh_sample, monkeypatch):
    """`generation.sharding.backend: ray` on a single-node Ray (2 worker processes) gives the same completions as
    a local run; each worker reads its row range of the pool from the shared files and writes its rows there, so
    what travels back to the driver is file names and counts, whatever the shard's size."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    import json

    import curation.steps.generate as G
    from curation.config import RoundConfig
    from curation.steps.generate import GenerationConfig, run_generate
    from curation.steps.pool import PoolConfig, PoolSource, run_pool
    from preference.plumbing.io import read_rows
    from preference.plumbing.store import Project

    returned = []

    def recording(*args, **kwargs):
        results = map_shards(*args, **kwargs)
        returned.extend(results)
        return results

    monkeypatch.setattr(G, "map_shards", recording)
    out = {}
    for name, sharding in (("local", ShardingConfig()),
                           ("ray", ShardingConfig(backend="ray", address="local", num_shards=2))):
        returned.clear()
        cfg = RoundConfig(
            project=tmp_path / name,
            pool=PoolConfig(sources=[PoolSource(path=hh_sample, limit=10)]),
            generation=GenerationConfig(backend="dummy", models=["dummy"], n=2, batch_size=3, cache=False,
                                        include_references=True, sharding=sharding),
        )
        rnd = Project(cfg.project).round(create=True)
        run_pool(cfg, rnd, progress=False)
        manifest = run_generate(cfg, rnd, progress=False)
        out[name] = (sorted(read_rows(rnd.step("generate").file("completions.parquet")), key=lambda r: r["id"]),
                     manifest["counts"])
    assert [r["range"] for r in returned] == [[0, 5], [5, 10]]
    assert all(len(json.dumps(r)) < 1500 and "rows" not in r for r in returned)  # names and counts, no rows
    assert out["ray"][0] == out["local"][0] and len(out["ray"][0]) == 10 * 2 + 20
    assert out["ray"][1]["shards"] == 2 and out["ray"][1]["completions"] == out["local"][1]["completions"]


@pytest.mark.slow
def test_score_sharded_on_ray_matches_local(tmp_path, hh_sample):
    """`scoring.sharding.backend: ray` gives the same scores as a local run (dummy backend, single-node Ray)."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    from curation.config import RoundConfig
    from curation.steps.generate import GenerationConfig, run_generate
    from curation.steps.pool import PoolConfig, PoolSource, run_pool
    from curation.steps.score import ScoringConfig, run_score
    from preference.plumbing.io import read_rows
    from preference.plumbing.store import Project

    out = {}
    for name, sharding in (("local", ShardingConfig()),
                           ("ray", ShardingConfig(backend="ray", address="local", num_shards=3))):
        cfg = RoundConfig(
            project=tmp_path / name,
            pool=PoolConfig(sources=[PoolSource(path=hh_sample, limit=9)]),
            generation=GenerationConfig(backend="dummy", models=["dummy"], n=2, cache=False),
            scoring=ScoringConfig(backend="dummy", committee=["dummy-a", "dummy-b"], sharding=sharding),
        )
        rnd = Project(cfg.project).round(create=True)
        run_pool(cfg, rnd, progress=False)
        run_generate(cfg, rnd, progress=False)
        manifest = run_score(cfg, rnd, progress=False)
        out[name] = {f: sorted(read_rows(rnd.step("score").file(f)), key=lambda r: str(r.get("completion_id") or
                                                                                      r["prompt_id"]))
                     for f in ("completion_scores.parquet", "prompt_scores.parquet")}
        assert manifest["counts"]["prompts"] == 9
    assert out["ray"] == out["local"]

