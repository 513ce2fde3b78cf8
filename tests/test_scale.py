"""Bounded memory at scale: the streamed pool / generate / score steps give what the in-memory ones gave, whatever
the chunking; diversity strategies above their exact budget; `scripts/bench_scale.py` at a small size."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation.acquisition import strategies as T
from curation.acquisition.strategies import Items, KCenterGreedy, KMeansPlusPlus, UnderDenseClusters
from curation.config import RoundConfig
from curation.steps import pool as P
from curation.steps import score as S
from curation.steps.generate import GenerationConfig, run_generate
from curation.steps.pool import PoolConfig, PoolSource, ingest, run_pool
from curation.steps.score import ScoringConfig, run_score
from preference.plumbing.io import iter_row_range, read_jsonl, read_rows
from preference.plumbing.store import Project

ROOT = Path(__file__).resolve().parent.parent


def planted_pool(path: Path) -> None:
    """40 distinct prompts, 3 exact and 3 near duplicates of earlier ones, 2 malformed lines."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(8, 20)))) for _ in range(40)]
    lines = [json.dumps({"prompt": t}) for t in texts]
    lines[10:10] = [json.dumps({"prompt": texts[2].upper()}), json.dumps({"prompt": texts[3] + " extra"}), "{bad"]
    lines += [json.dumps({"prompt": "  " + texts[20] + " "}), json.dumps({"prompt": texts[21] + " more"}),
              json.dumps({"prompt": texts[5]}), json.dumps({"prompt": texts[30] + " again"}), json.dumps({"x": 1})]
    path.write_text("\n".join(lines) + "\n")


def test_streamed_pool_matches_the_in_memory_ingest_with_tiny_chunks(tmp_path, monkeypatch):
    planted_pool(tmp_path / "pool.jsonl")
    cfg = RoundConfig(project=tmp_path / "proj", pool=PoolConfig(sources=[PoolSource(path=tmp_path / "pool.jsonl")]))
    whole = ingest(cfg.pool)
    monkeypatch.setattr(P, "CHUNK", 3)  # staged writes, MinHash batches and reads in chunks of 3
    monkeypatch.setattr("preference.plumbing.io.ROW_GROUP", 4)
    rnd = Project(cfg.project).round(create=True)
    manifest = run_pool(cfg, rnd, progress=False)
    rows = read_rows(rnd.step("pool").file("prompts.parquet"))
    assert [r["id"] for r in rows] == [p.id for p in whole.prompts] and len(rows) == 40
    assert manifest["counts"] == {"read": 48, "prompts": 40, "rejected": 2, "exact_duplicates": 3,
                                  "near_duplicates": 3}
    assert len(read_jsonl(rnd.step("pool").file("rejected.jsonl"))) == 2
    assert not (rnd.step("pool").path / "parts").exists()  # the staging files are gone


def test_generate_writes_completions_grouped_by_prompt_for_several_models(tmp_path, hh_sample):
    cfg = RoundConfig(
        project=tmp_path / "proj", pool=PoolConfig(sources=[PoolSource(path=hh_sample, format="hh", limit=9)]),
        generation=GenerationConfig(backend="dummy", models=["dummy-a", "dummy-b"], n=2, max_tokens=8, batch_size=4,
                                    cache=False, include_references=True),
    )
    rnd = Project(cfg.project).round(create=True)
    run_pool(cfg, rnd, progress=False)
    manifest = run_generate(cfg, rnd, progress=False)
    rows = read_rows(rnd.step("generate").file("completions.parquet"))
    pool_order = [r["id"] for r in read_rows(rnd.step("pool").file("prompts.parquet"))]
    runs = [pid for i, pid in enumerate(r["prompt_id"] for r in rows) if i == 0 or rows[i - 1]["prompt_id"] != pid]
    assert runs == pool_order  # one run of rows per prompt, in pool order
    first = [r["model"] for r in rows if r["prompt_id"] == pool_order[0]]
    assert first == ["dummy-a", "dummy-a", "reference:chosen", "reference:rejected", "dummy-b", "dummy-b"]
    assert manifest["counts"]["completions"] == len(rows) == 9 * (2 + 2 + 2)
    assert manifest["counts"]["completions::dummy-b"] == 18 and manifest["counts"]["references"] == 18
    assert not list(rnd.step("generate").parts_dir.glob("stream-*"))  # the per-model streams were merged away


def test_score_in_chunks_equals_score_in_one_piece(tmp_path, hh_sample, monkeypatch):
    def scored(folder: Path) -> dict:
        cfg = RoundConfig(
            project=folder, pool=PoolConfig(sources=[PoolSource(path=hh_sample, format="hh", limit=11)]),
            generation=GenerationConfig(backend="dummy", models=["dummy-gen"], n=3, max_tokens=8, cache=False,
                                        include_references=True),
            scoring=ScoringConfig(backend="dummy", committee=["m1", "m1:system=cautious", "m2"], batch_size=7,
                                  embedding_model="e-d12"),
        )
        rnd = Project(cfg.project).round(create=True)
        run_pool(cfg, rnd, progress=False)
        run_generate(cfg, rnd, progress=False)
        manifest = run_score(cfg, rnd, progress=False)
        return {f: read_rows(rnd.step("score").file(f)) for f in ("completion_scores.parquet",
                                                                  "prompt_scores.parquet")} | {"m": manifest}

    whole = scored(tmp_path / "a")
    monkeypatch.setattr(S, "CHUNK_PROMPTS", 2)  # 6 chunks, each backend's requests computed chunk by chunk
    chunked = scored(tmp_path / "b")
    assert chunked["completion_scores.parquet"] == whole["completion_scores.parquet"]
    assert chunked["prompt_scores.parquet"] == whole["prompt_scores.parquet"]
    assert len(whole["prompt_scores.parquet"]) == 11 and len(whole["prompt_scores.parquet"][0]["embedding"]) == 12
    assert chunked["m"]["reused"] == whole["m"]["reused"] and chunked["m"]["counts"] == whole["m"]["counts"]


def test_row_ranges_read_only_their_rows(tmp_path, monkeypatch):
    monkeypatch.setattr("preference.plumbing.io.ROW_GROUP", 5)
    from preference.plumbing.io import RowWriter

    with RowWriter(tmp_path / "t.parquet", row_group=5) as out:
        out.write([{"i": i} for i in range(23)])
    got = [t.column("i").to_pylist() for t in iter_row_range(tmp_path / "t.parquet", 7, 19, 4)]
    assert got == [[7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]]


# --------------------------------------------------------------------------------------------- strategies
def clustered(n: int, dim: int = 16, clusters: int = 12, seed: int = 0, duplicates: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)) * 4
    x = centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))
    if duplicates:
        x[-duplicates:] = x[:duplicates]
    return x.astype(np.float32)


def naive_kcenter(x: np.ndarray, min_d: np.ndarray, k: int) -> list[int]:
    min_d = min_d.copy()
    picks = []
    for _ in range(k):
        i = int(np.argmax(min_d))
        picks.append(i)
        min_d = np.minimum(min_d, ((x - x[i]) ** 2).sum(axis=1))
        min_d[i] = -np.inf
    return picks


def test_batched_kcenter_greedy_makes_the_same_picks_as_one_at_a_time():
    x = clustered(700, duplicates=40)
    min_d = T.min_sq_dist(x, x.mean(axis=0, keepdims=True))
    batched = T.kcenter_greedy(x, min_d.copy(), 120, candidates=64)
    reference = naive_kcenter(x.astype(np.float64), min_d.astype(np.float64), 120)
    assert batched.tolist()[:60] == reference[:60]  # float32 vs float64 distances: the same farthest-first order
    radius = lambda picks: np.sqrt(T.min_sq_dist(x, x[picks]).max())  # noqa: E731
    assert radius(batched) == pytest.approx(radius(np.asarray(reference)), rel=1e-3)


@pytest.mark.parametrize("labelled", [0, 300])
def test_diversity_strategies_above_the_exact_budget(monkeypatch, labelled):
    x = clustered(4000)
    items = Items(ids=np.arange(4000), embeddings=x, labelled=clustered(labelled, seed=1) if labelled else None)
    exact = {s.name: s.select(items, 60, np.random.default_rng(0)) for s in (KCenterGreedy(), KMeansPlusPlus())}
    exact_cover = T.coverage_sq_dist(items)
    monkeypatch.setattr(T, "EXACT_BUDGET", 2e5)  # far below 4000 × 60 × 16: the partitioned paths
    approx_cover = T.coverage_sq_dist(Items(ids=items.ids, embeddings=x, labelled=items.labelled))
    assert (approx_cover >= exact_cover - 1e-3).all()  # the inverted-file search never finds a closer item
    assert np.mean(np.isclose(approx_cover, exact_cover, rtol=1e-4)) > 0.9
    for strategy in (KCenterGreedy(), KMeansPlusPlus(), UnderDenseClusters()):
        picks = strategy.select(items, 60, np.random.default_rng(0))
        assert len(picks) == len(set(picks.tolist())) == 60 and picks.min() >= 0 and picks.max() < 4000
        assert np.array_equal(picks, strategy.select(items, 60, np.random.default_rng(0)))  # seeded
    scale = KCenterGreedy().select(items, 60, np.random.default_rng(0))
    covered = np.concatenate([items.labelled, x[scale]]) if labelled else x[scale]
    exact_picks = np.concatenate([items.labelled, x[exact["kcenter"]]]) if labelled else x[exact["kcenter"]]
    # the composable core-set covers the pool about as well as exact greedy (a 2-approximation itself)
    assert np.sqrt(T.min_sq_dist(x, covered).max()) <= 1.5 * np.sqrt(T.min_sq_dist(x, exact_picks).max())


# ------------------------------------------------------------------------------------------------ the bench
def test_bench_scale_prints_figures_of_its_own_run(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--sizes", "300", "--work",
                          str(tmp_path), "--keep"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert re.search(r"AVX", lines[0])  # the CPU's features
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] == "300":
            rows[cells[1]] = cells
    assert list(rows) == ["pool", "generate", "score", "rewards", "select"]
    n_lines = len((tmp_path / "n300" / "pool.jsonl").read_text().splitlines())
    assert f"read={n_lines}" in rows["pool"][7] and "prompts=300," in rows["pool"][7]
    assert "exact_duplicates=3" in rows["pool"][7] and "near_duplicates=3" in rows["pool"][7]
    assert "completions=900" in rows["generate"][7] and "selected=6" in rows["select"][7]
    round_dir = tmp_path / "n300" / "project" / "round-0001"
    for step, cells in rows.items():
        manifest = json.loads((round_dir / step / "manifest.json").read_text())
        assert float(cells[3]) == pytest.approx(manifest["seconds"], abs=0.051)  # the step's own time, printed
        assert float(cells[2]) >= manifest["seconds"] and float(cells[5]) > 0.05  # process wall, peak RSS (GB)
    assert "checks: ok" in out.stdout
    assert len(read_rows(round_dir / "select" / "selected.parquet")) == 6
