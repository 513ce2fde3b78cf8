"""Drift: the MMD permutation test (exact statistic, calibrated: no alarm on same-distribution traffic in ≥ 95 % of
seeded trials, injected drift found), per-slice tests, perplexity and thumbs-down shifts, and `check` writing
drift.json + drift.png for a project with a champion. One test on the real scoring model's embeddings."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from curation.backends import DummyBackend
from curation.drift import (
    DriftConfig,
    check,
    embed_and_score,
    embedding_tests,
    mmd_test,
    perplexity_shift,
    scoring_backends,
    thumbs_down_shift,
)
from curation.steps.pool import PoolSource, read_source
from preference.plumbing.io import read_json

ROOT = Path(__file__).resolve().parent.parent
MODERATION = ROOT / "data" / "moderation-dev.jsonl.gz"


@pytest.fixture(scope="module")
def prompts():
    hh, _, _ = read_source(PoolSource(path=ROOT / "data" / "hh-harmless-dev.jsonl.gz", format="hh"), strict=False,
                           max_chars=8000)
    mod, _, _ = read_source(PoolSource(path=MODERATION), strict=False, max_chars=8000)
    return hh, mod


@pytest.fixture(scope="module")
def dummy_embeddings(prompts):
    hh, mod = prompts
    backend = DummyBackend("embedder")
    return backend.embed([p.text for p in hh]), backend.embed([p.text for p in mod])


def test_mmd_statistic_is_the_unbiased_estimate():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(9, 3)) + 0.5
    res = mmd_test(x, y, np.random.default_rng(1), permutations=50)
    z = np.concatenate([x, y])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    sigma2 = np.median(d[np.triu_indices(16, 1)])
    k = np.exp(-d / (2 * sigma2))
    kxx, kyy, kxy = k[:7, :7], k[7:, 7:], k[:7, 7:]
    expected = ((kxx.sum() - 7) / 42) + ((kyy.sum() - 9) / 72) - 2 * kxy.mean()
    assert res.mmd2 == pytest.approx(expected, rel=1e-10)
    assert res.bandwidth == pytest.approx(np.sqrt(sigma2))
    assert len(res.null) == 50 and 1 / 51 <= res.p_value <= 1
    again = mmd_test(x, y, np.random.default_rng(1), permutations=50)
    assert again.p_value == res.p_value  # seeded by the Generator it is given
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd_test(x[:1], y, np.random.default_rng(0))


def test_no_alarm_on_same_distribution_in_95_percent_of_seeded_trials(dummy_embeddings):
    hh, _ = dummy_embeddings
    cfg = DriftConfig(permutations=200, min_slice_samples=20)
    alarms = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(hh))
        traffic, reference = hh[idx[:40]], hh[idx[40:160]]
        slices = ["billing" if i % 2 else "support" for i in range(40)]  # two traffic slices: three tests
        out = embedding_tests(traffic, slices, reference, ["harmless"] * 120, cfg, rng)
        assert out["tests"] == 3 and out["alpha_per_test"] == pytest.approx(0.01 / 3) and out["permutations"] == 600
        alarms += out["overall"]["drift"] or any(s["drift"] for s in out["slices"].values())
    assert alarms <= 2, f"{alarms} false alarms in 40 same-distribution trials"


def test_injected_drift_is_found_overall_and_in_its_slice(dummy_embeddings):
    hh, mod = dummy_embeddings
    cfg = DriftConfig(permutations=200)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        i, j = rng.permutation(len(hh)), rng.permutation(len(mod))
        switched = embedding_tests(mod[j[:60]], ["untagged"] * 60, hh[i[:200]], ["harmless"] * 200, cfg, rng)
        assert switched["overall"]["drift"] and switched["slices"] == {}  # one slice: the overall test only
        traffic = np.concatenate([hh[i[200:260]], mod[j[:40]]])
        slices = ["harmless"] * 60 + ["moderation"] * 40
        mixed = embedding_tests(traffic, slices, hh[i[:200]], ["harmless"] * 200, cfg, rng)
        assert mixed["slices"]["moderation"]["drift"] and not mixed["slices"]["harmless"]["drift"]
        assert mixed["slices"]["harmless"]["reference"] == "slice" and mixed["slices"]["moderation"]["reference"] == "all"


def test_perplexity_and_thumbs_down_shifts():
    cfg = DriftConfig(min_feedback=10)
    rng = np.random.default_rng(0)
    ref = rng.normal(2.0, 0.3, 200)
    same = perplexity_shift(rng.normal(2.0, 0.3, 80), ref, cfg)
    assert not same["drift"] and same["ratio"] == pytest.approx(1.0, abs=0.15)
    higher = perplexity_shift(rng.normal(2.8, 0.3, 80), ref, cfg)
    assert higher["drift"] and higher["ratio"] > 2 and higher["p_value"] < 1e-6
    few = thumbs_down_shift(["down"] * 9, [], cfg)
    assert not few["alarm"] and "fewer than min_feedback" in few["reason"]
    high = thumbs_down_shift(["down"] * 6 + ["up"] * 4, [], cfg)
    assert high["alarm"] and high["rate"] == 0.6
    rose = thumbs_down_shift(["down"] * 16 + ["up"] * 24, ["down"] * 5 + ["up"] * 45, cfg)
    assert rose["alarm"] and rose["earlier_rate"] == 0.1 and rose["p_value"] < 0.01 and "rose" in rose["reason"]
    steady = thumbs_down_shift(["down"] * 4 + ["up"] * 36, ["down"] * 5 + ["up"] * 45, cfg)
    assert not steady["alarm"]


def _project_with_champion(tmp_path, hh_sample):
    """A project whose round-1 pool (the real pool step) is the champion's training distribution."""
    from curation.config import RoundConfig
    from curation.steps.pool import PoolConfig, run_pool
    from curation.steps.score import ScoringConfig
    from preference.plumbing.store import Project
    from training.registry import Registry, registry_root

    cfg = RoundConfig(project=tmp_path / "proj", seed=3,
                      pool=PoolConfig(sources=[PoolSource(path=hh_sample, format="hh", slice="harmless", limit=120)]),
                      scoring=ScoringConfig(backend="dummy", committee=["scorer"]),
                      drift=DriftConfig(reference="pool", min_samples=30, permutations=300, feedback_trigger=5))
    cfg.serve.dir = tmp_path / "serve"
    rnd = Project(cfg.project).round(create=True)
    run_pool(cfg, rnd)
    registry = Registry(registry_root(cfg))
    registry.promote(registry.register({}, metrics={}, lineage={}, config={}, round=1))
    return cfg


def _serve_prompts(cfg, prompts, slice_name, ratings=()):
    from curation.serving.serve import traffic_dir
    from curation.serving.traffic import TrafficLog, feedback_record, response_record

    log = TrafficLog(traffic_dir(cfg))
    for i, p in enumerate(prompts):
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        log.append(response_record(response_id=rid, messages=p.messages, completion="ok",
                                   model_version="v0001", served_model="v0001", slice=slice_name))
        if i < len(ratings):
            log.append(feedback_record(feedback_id=f"fb-{i}-{rid}", response_id=rid, rating=ratings[i]))
    log.close()


def test_check_writes_report_and_plot_and_decides(tmp_path, hh_sample, prompts):
    hh, mod = prompts
    cfg = _project_with_champion(tmp_path, hh_sample)
    report, folder = check(cfg, progress=False, echo=lambda *_: None)  # no traffic yet
    assert report["start_round"] is False and "not enough prompts" in report["note"]
    _serve_prompts(cfg, hh[400:450], "harmless", ratings=["up"] * 4)  # same distribution as the champion's
    report, folder = check(cfg, progress=False, echo=lambda *_: None)
    assert report["champion"] == "v0001" and report["reference"]["prompts"] == 120
    assert report["traffic"]["new_responses"] == 50 and report["embedding"]["overall"]["n_traffic"] == 50
    assert not report["embedding"]["overall"]["drift"] and report["start_round"] is False
    assert read_json(folder / "drift.json") == report and (folder / "drift.png").stat().st_size > 10_000
    _serve_prompts(cfg, mod[:60], "moderation", ratings=["down"] * 6)
    report, folder = check(cfg, progress=False, echo=lambda *_: None)
    assert report["start_round"] and report["alarm"]
    assert report["embedding"]["slices"]["moderation"]["drift"]
    assert not report["embedding"]["slices"]["harmless"]["drift"]
    assert any("6 new thumbs-down answers" in r for r in report["reasons"])


def test_no_champion_is_one_clear_error(tmp_path):
    from curation.config import RoundConfig
    from preference.plumbing.errors import CurateError

    with pytest.raises(CurateError, match="no champion in the registry"):
        check(RoundConfig(project=tmp_path / "p"), echo=lambda *_: None)


@pytest.mark.slow
def test_real_scoring_model_embeddings_separate_moderation_from_hh(prompts):
    """SmolLM2's embeddings and perplexities (the scoring model) through `scoring_backends`."""
    from curation.backends import BackendSettings
    from curation.config import RoundConfig
    from curation.steps.score import ScoringConfig

    hh, mod = prompts
    cfg = RoundConfig(scoring=ScoringConfig(backend=BackendSettings(name="transformers", dtype="float32"),
                                            committee=["smollm2-135m-instruct"], embed_max_tokens=64))
    rng = np.random.default_rng(0)
    hh_pick = [hh[i].text for i in rng.permutation(len(hh))[:60]]
    mod_pick = [mod[i].text for i in rng.permutation(len(mod))[:20]]
    with scoring_backends(cfg) as (backend, scorer):
        assert scorer is None  # a language model embeds and scores in one pass
        emb_hh, emb_mod = backend.embed(hh_pick, 64), backend.embed(mod_pick, 64)
        # drift's one pass per text (log-perplexity and embedding together) embeds as `curate score` does
        emb_4, ppl, _, _ = embed_and_score(backend, hh_pick[:4], [], False, max_tokens=64)
    np.testing.assert_allclose(emb_4, emb_hh[:4], atol=1e-4)
    assert emb_hh.shape == (60, 576) and np.isfinite(ppl).all() and (ppl > 0).all()
    d = DriftConfig(permutations=500)
    same = embedding_tests(emb_hh[:20], ["t"] * 20, emb_hh[20:], ["r"] * 40, d, np.random.default_rng(1))
    drifted = embedding_tests(emb_mod, ["t"] * 20, emb_hh[20:], ["r"] * 40, d, np.random.default_rng(1))
    assert not same["overall"]["drift"] and drifted["overall"]["drift"]
    assert drifted["overall"]["p_value"] < 0.005


@pytest.mark.slow
def test_sentence_embedder_drift_is_calibrated_and_finds_moderation_prompts(prompts, tiny_model):
    """The shipped configs' embedder (all-MiniLM-L6-v2) through `scoring_backends`, the perplexity under the first
    committee member (here the tiny model): no alarm on same-distribution HH traffic in ≥ 95 % of 40 seeded trials, moderation prompts
    found among HH prompts overall and in their slice."""
    from curation.backends import BackendSettings
    from curation.config import RoundConfig
    from curation.steps.score import ScoringConfig

    hh, mod = prompts
    cfg = RoundConfig(scoring=ScoringConfig(backend=BackendSettings(name="transformers", dtype="float32"),
                                            committee=[str(tiny_model)], embedding_model="all-minilm-l6-v2",
                                            embed_max_tokens=64))
    rng = np.random.default_rng(0)
    hh_pick = [hh[i].text for i in rng.permutation(len(hh))[:260]]
    mod_pick = [mod[i].text for i in rng.permutation(len(mod))[:40]]
    with scoring_backends(cfg) as (embedder, scorer):
        assert embedder.kind == "sentence-transformers" and scorer.kind == "transformers"
        emb_hh, emb_mod = embedder.embed(hh_pick, 64), embedder.embed(mod_pick, 64)
        emb_4, ppl, _, _ = embed_and_score(embedder, hh_pick[:4], [], False, max_tokens=64, scorer=scorer)
    np.testing.assert_allclose(emb_4, emb_hh[:4], atol=1e-5)
    assert emb_hh.shape == (260, 384) and np.isfinite(ppl).all() and (ppl > 0).all()
    d = DriftConfig(permutations=200, min_slice_samples=20)
    alarms = 0
    for seed in range(40):
        trial = np.random.default_rng(seed)
        idx = trial.permutation(len(emb_hh))
        slices = ["billing" if i % 2 else "support" for i in range(40)]
        out = embedding_tests(emb_hh[idx[:40]], slices, emb_hh[idx[40:160]], ["harmless"] * 120, d, trial)
        alarms += out["overall"]["drift"] or any(s["drift"] for s in out["slices"].values())
    assert alarms <= 2, f"{alarms} false alarms in 40 same-distribution trials"
    trial = np.random.default_rng(1)
    mixed = embedding_tests(np.concatenate([emb_hh[200:260], emb_mod[:40]]), ["harmless"] * 60 + ["moderation"] * 40,
                            emb_hh[:200], ["harmless"] * 200, d, trial)
    assert mixed["overall"]["drift"] and mixed["slices"]["moderation"]["drift"]
    assert not mixed["slices"]["harmless"]["drift"]
