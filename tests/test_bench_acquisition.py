"""The acquisition benchmark's input handling and protocol on small real slices of the shipped data (the
figures themselves come from running the script, not from tests)."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import bench_acquisition as bench  # noqa: E402
from scripts.bench_tasks import load_moderation, load_qa_feedback  # noqa: E402

DATA = ROOT / "data"


def first_rows(src: Path, dest: Path, n: int) -> Path:
    with gzip.open(src, "rt") as fh:
        rows = [next(fh) for _ in range(n)]
    dest.write_text("".join(rows))
    return dest


def error_line(*args) -> str:
    """The one line the script prints for bad input (its `__main__` prints `error: <message>`, exits 2), found
    in-process: the command line's own path is `cli_error_line`."""
    from preference.plumbing.errors import CurateError

    with pytest.raises(CurateError) as info:
        bench.main([str(a) for a in args])
    assert "\n" not in str(info.value)
    return f"error: {info.value}"


def cli_error_line(*args) -> str:
    out = subprocess.run([sys.executable, "scripts/bench_acquisition.py", *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    return lines[0]


def test_bad_input_is_one_clear_line(tmp_path, monkeypatch):
    hh = first_rows(DATA / "hh-harmless-dev.jsonl.gz", tmp_path / "hh.jsonl", 3)
    line = cli_error_line("--data", hh, "--format", "qa-feedback")
    assert line.startswith(f"error: {hh}:1: --format qa-feedback expects 'question'")
    line = error_line("--data", first_rows(DATA / "qa-feedback-dev.jsonl.gz", tmp_path / "qa.jsonl", 20),
                      "--format", "qa-feedback", "--test", "5")
    assert "the pool holds 90 comparisons but --init 25 + --rounds 8 × --budget 25 = 225" in line
    line = error_line("--dataset", "hh-harmless", "--strategies", "random,entropy")
    assert "--strategies entropy: needs the signal(s) mean_entropy, which --features tfidf does not give" in line
    # too small for the protocol: refused before any feature is computed
    tiny = first_rows(DATA / "hh-harmless-dev.jsonl.gz", tmp_path / "tiny.jsonl", 5)
    with monkeypatch.context() as m:
        m.setitem(bench.FEATURES, "tfidf", lambda *a, **k: pytest.fail("features computed before the size check"))
        assert "the pool holds" in error_line("--data", tiny, "--format", "hh")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "S": 1}\n{"prompt": "yo", "S": "yes"}\n')
    assert error_line("--data", bad, "--format", "moderation").endswith(
        f"{bad}:2: harm flag 'S' must be 0, 1 or null, got 'yes'")


def test_custom_data_holds_out_a_share_by_default(tmp_path):
    """`--data` without `--test`: a quarter of the file's items is the test set (not int(0.25) = 0 items)."""
    data = first_rows(DATA / "hh-harmless-dev.jsonl.gz", tmp_path / "hh.jsonl", 400)
    args = bench.configure(bench.parse_args(["--data", str(data), "--format", "hh"]), "custom")
    task = bench.LOADERS["hh"](data)
    split = bench.make_split(task, args, 0)
    assert len(split.test) == round(0.25 * len(task)) and len(split.test) + len(split.pool) == len(task)
    assert len(bench.make_split(task, bench.configure(bench.parse_args(
        ["--data", str(data), "--format", "hh", "--test", "50"]), "custom"), 0).test) == 50


def test_loaders_read_the_real_shapes():
    qa = load_qa_feedback(DATA / "qa-feedback-dev.jsonl.gz")
    assert len(qa) == 250 and all(len(a) == 4 and len(c) == 6 for a, c in zip(qa.answers, qa.comparisons, strict=True))
    outcomes = np.array([o for c in qa.comparisons for _, _, o in c])
    assert 0.05 < np.mean(outcomes == 0) < 0.2  # "no preference" is ~10 % of the judgements
    mod = load_moderation(DATA / "moderation-dev.jsonl.gz")
    assert len(mod) == 840 and 0.2 < mod.labels.mean() < 0.5
    assert set(mod.slices[~mod.labels]) == {"benign"} and "benign" not in set(mod.slices[mod.labels])


def test_qa_protocol_asks_each_comparison_once_and_counts_ties(tmp_path):
    """A short qa-feedback run: labels spent = init + rounds × budget, ties counted, the chooser never asks a
    comparison twice, and the skewed moderation pool keeps every harm slice rare."""
    args = bench.configure(bench.parse_args(["--dataset", "qa-feedback", "--rounds", "2", "--budget", "10",
                                             "--init", "10"]), "qa-feedback")
    task = load_qa_feedback(args.data)
    feats = bench.tfidf_features(task)
    split = bench.make_split(task, args, 0)
    for text in ("random", "reward_disagreement/info_gain"):
        out = bench.run(task, feats, bench.Spec.parse(text, 4.0), split, args, 0)
        assert out["spent"] == 30 and [n for n, _ in out["curve"]] == [10, 20, 30]
        assert 0 <= out["ties"] <= out["spent"]
    mod_args = bench.configure(bench.parse_args(["--dataset", "skewed-moderation"]), "skewed-moderation")
    mod = load_moderation(mod_args.data)
    pool = bench.make_split(mod, mod_args, 0).pool
    slices, counts = np.unique(mod.slices[pool], return_counts=True)
    benign = counts[slices == "benign"][0]
    assert all(c <= round(0.05 * benign) for s, c in zip(slices, counts, strict=True) if s != "benign")


def test_spec_parsing():
    from curation.acquisition.strategies import RandomArm

    parsed = bench.Spec.parse("hybrid@0.15/info_gain", 4.0)
    assert parsed.chooser == "info_gain" and isinstance(parsed.strategy, RandomArm)
    assert parsed.strategy.share == 0.15 and parsed.strategy.base.name.endswith(">kcenter")
    assert bench.Spec.parse("kcenter", 4.0).chooser == "random"
    with pytest.raises(bench.CurateError, match="unknown completion chooser 'best'"):
        bench.Spec.parse("kcenter/best", 4.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_features_resume_after_a_kill(tmp_path, monkeypatch, tiny_model, dtype):
    """The LM features are written batch by batch: a run killed half-way recomputes only the missing batches, and
    the merged result equals an uninterrupted run (real model forward, tiny-llama in place of SmolLM2). Run at
    both precisions explicitly, whatever this machine's `auto` is; the dtype is part of the cache key."""
    import torch.nn as nn

    from scripts import bench_tasks

    task = load_qa_feedback(first_rows(DATA / "qa-feedback-dev.jsonl.gz", tmp_path / "qa.jsonl", 3))
    kwargs = dict(batch_size=4, progress=False, model_name="tiny-llama", dtype=dtype)
    monkeypatch.setattr(bench_tasks, "feature_cache", lambda: tmp_path / "clean")
    clean = bench_tasks.smollm2_features(task, **kwargs)
    assert clean["emb"].shape[0] == 12 and np.isfinite(clean["emb"]).all() and clean["emb"].dtype == np.float32
    assert (clean["logprob"] < 0).all() and (clean["entropy"] > 0).all()
    cached = [p.name for p in (tmp_path / "clean").glob("smollm2-*.npz")]
    assert cached == [bench_tasks.smollm2_cache_path(task, 128, "tiny-llama", dtype).name]
    assert bench_tasks.smollm2_cache_path(task, 128, "tiny-llama", "float32") != \
        bench_tasks.smollm2_cache_path(task, 128, "tiny-llama", "bfloat16")

    calls = []
    forward = nn.Module.__call__

    def dies_on_third_batch(module, *args, **kw):
        if type(module).__name__ == "LlamaModel":
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return forward(module, *args, **kw)

    monkeypatch.setattr(bench_tasks, "feature_cache", lambda: tmp_path / "killed")
    monkeypatch.setattr(nn.Module, "__call__", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        bench_tasks.smollm2_features(task, **kwargs)
    assert len(list((tmp_path / "killed").glob("*.parts/*.npz"))) == 2
    calls.clear()
    resumed = bench_tasks.smollm2_features(task, **kwargs)
    assert len(calls) == 1  # only the third batch is computed again
    assert not list((tmp_path / "killed").glob("*.parts"))  # merged, parts removed
    for key, value in clean.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_benchmarked_default_is_what_the_configs_ship(config):
    """The goal "the configs' default is never significantly worse than random" is checked on `CONFIG_DEFAULT`:
    it must be the selection the shipped configs really run."""
    from curation.config import load_config

    sel = load_config(config).selection
    assert f"{sel.strategy}@{sel.random_share:g}" == bench.CONFIG_DEFAULT
    assert sel.completion_choice == bench.CONFIG_CHOOSER


def test_the_benchmarked_default_is_the_selection_section_default():
    """A config that omits `selection.strategy` / `random_share` runs the benchmarked default too."""
    from curation.steps.select import SelectionConfig

    sel = SelectionConfig()
    assert f"{sel.strategy}@{sel.random_share:g}" == bench.CONFIG_DEFAULT
    assert sel.completion_choice == bench.CONFIG_CHOOSER


@pytest.mark.slow
def test_minilm_features_are_the_rounds_embeddings(tmp_path, monkeypatch):
    """`--features minilm`: each target text embedded alone by all-MiniLM-L6-v2, as `curate score` embeds a
    completion with the shipped configs; cached (a second call reads the file), and the script runs on them."""
    from curation.backends import BackendSettings, load_backend
    from scripts import bench_tasks
    from training.models import MINILM

    monkeypatch.setattr(bench_tasks, "feature_cache", lambda: tmp_path / "features")
    task = load_qa_feedback(first_rows(DATA / "qa-feedback-dev.jsonl.gz", tmp_path / "qa.jsonl", 40))
    feats = bench_tasks.minilm_features(task, progress=False, dtype="float32")
    _, target = bench_tasks.texts_for_features(task)
    assert set(feats) == {"emb"} and feats["emb"].shape == (len(target), 384)
    # the backend embeds the same texts in the same call at the same precision: the same numbers (fp32 on both
    # sides, whatever `auto` is here; the bf16 path is checked in test_minilm_features_in_bf16)
    with load_backend(MINILM, BackendSettings(name="sentence-transformers", dtype="float32")) as backend:
        np.testing.assert_allclose(feats["emb"], backend.embed(target, 256), atol=1e-6)
    cached = list((tmp_path / "features").glob("minilm-*.npz"))
    assert len(cached) == 1
    import curation.backends

    def embed_again(*args, **kwargs):
        raise AssertionError("the cached features were computed again")

    monkeypatch.setattr(curation.backends, "load_backend", embed_again)
    np.testing.assert_array_equal(bench_tasks.minilm_features(task, progress=False, dtype="float32")["emb"],
                                  feats["emb"])
    line = error_line("--dataset", "qa-feedback", "--features", "minilm", "--strategies", "random,low_logprob")
    assert "--strategies low_logprob: needs the signal(s) mean_logprob, which --features minilm does not give" in line


@pytest.mark.slow
def test_minilm_features_in_bf16(tmp_path, monkeypatch):
    """`--dtype bfloat16` (what `auto` gives on AVX512-BF16/AMX CPUs) on any machine: the features are the
    backend's bf16 embeddings, cached apart from the fp32 ones, and close to them (bf16 keeps 8 bits of mantissa:
    unit vectors' components agree to ~1e-2). Kept small: bf16 is emulated and slow on AVX2-only CPUs."""
    from curation.backends import BackendSettings, load_backend
    from scripts import bench_tasks
    from training.models import MINILM

    monkeypatch.setattr(bench_tasks, "feature_cache", lambda: tmp_path / "features")
    task = load_qa_feedback(first_rows(DATA / "qa-feedback-dev.jsonl.gz", tmp_path / "qa.jsonl", 4))
    _, target = bench_tasks.texts_for_features(task)
    bf16 = bench_tasks.minilm_features(task, progress=False, dtype="bfloat16")["emb"]
    fp32 = bench_tasks.minilm_features(task, progress=False, dtype="float32")["emb"]
    assert len(list((tmp_path / "features").glob("minilm-*.npz"))) == 2  # one file per precision
    with load_backend(MINILM, BackendSettings(name="sentence-transformers", dtype="bfloat16")) as backend:
        np.testing.assert_allclose(bf16, backend.embed(target, 256), atol=1e-6)  # same call, same precision
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)
    assert np.allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-2)
