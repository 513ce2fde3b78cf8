"""Both precisions on any machine: every dtype-sensitive path runs here at float32 AND bfloat16 explicitly, on tiny
models, whatever `dtype: auto` resolves to on the machine running the suite (fp32 on AVX2-only CPUs, bf16 on
AVX512-BF16/AMX CPUs and GPUs). A change made on one machine class cannot break the other unseen.

Covered: the backends' log-likelihoods, generation logprobs and embeddings (transformers, vLLM, sentence-
transformers), the reward model's scores and its evaluation, policy log-probs and evaluation, and training with and
without bf16 autocast. The benchmark's features are covered in tests/test_bench_acquisition.py at both precisions.

Tolerances are per precision, each with its reason. bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4 %
per operation), and an AVX2-only CPU emulates it (rounding fp32 results), which need not round exactly as the
native AVX512-BF16 kernels do: bf16 tolerances hold for both. bf16 is slow where emulated, so the inputs are tiny.
"""

from __future__ import annotations

import numpy as np
import pytest

from curation import backends as B
from preference.plumbing.io import read_jsonl
from preference.schema import split_hh_transcript

DTYPES = ["float32", "bfloat16"]
# the same computation in two batch shapes (padding, kernel blocking): fp32 agrees to rounding; bf16 rounds each
# product to 8 bits of mantissa, so a token's log-probability moves by a few hundredths
BATCH_ATOL = {"float32": 1e-4, "bfloat16": 0.15}
# a sequence's perplexity at this precision vs at fp32: bf16 moves it by a few percent on tiny random models
# (the verified recipe measured ≤ 1.6 % on SmolLM2)
PPL_RTOL_VS_FP32 = {"float32": 1e-5, "bfloat16": 0.05}
# unit-normalized embeddings at this precision vs fp32: bf16 components agree to ~1e-2
EMB_ATOL_VS_FP32 = {"float32": 1e-5, "bfloat16": 3e-2}


def hh_requests(backend, hh_sample, k=4):
    reqs = []
    for row in read_jsonl(hh_sample)[:k]:
        msgs, answer = split_hh_transcript(row["chosen"])
        reqs.append((backend.render_chat(msgs), backend.encode(answer)[:24] + [backend.eos_token_id]))
    return reqs


def ppl(lls) -> np.ndarray:
    return np.array([np.exp(-np.mean(x)) for x in lls])


@pytest.fixture(scope="module")
def fp32_reference(tiny_model, hh_sample):
    """Per-token log-likelihoods and embeddings of the tiny model in fp32 (transformers): what each precision is
    compared with."""
    settings = B.BackendSettings(name="transformers", dtype="float32", threads=1)
    with B.TransformersBackend(tiny_model, settings) as hf:
        reqs = hh_requests(hf, hh_sample)
        lls, vecs = hf.loglikelihood_and_embed(reqs)
    return reqs, lls, vecs


# ------------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformers_backend_at_each_precision(dtype, tiny_model, fp32_reference):
    reqs, ref_lls, ref_vecs = fp32_reference
    with B.TransformersBackend(tiny_model, B.BackendSettings(name="transformers", dtype=dtype, threads=1,
                                                             micro_batch_size=4)) as hf:
        assert hf.dtype == dtype and hf.hardware()["dtype"] == dtype and hf.fingerprint().endswith(dtype)
        lls, vecs = hf.loglikelihood_and_embed(reqs)
        assert all(np.isfinite(x).all() and (np.asarray(x) <= 0).all() for x in lls)
        # batch invariance at this precision: one request at a time gives the same numbers, within its rounding
        for (ctx, cont), ll in zip(reqs[:2], lls[:2], strict=True):
            np.testing.assert_allclose(hf.loglikelihood([(ctx, cont)])[0], ll, atol=BATCH_ATOL[dtype])
        # close to fp32
        np.testing.assert_allclose(ppl(lls), ppl(ref_lls), rtol=PPL_RTOL_VS_FP32[dtype])
        assert vecs.dtype == np.float32 and vecs.shape == ref_vecs.shape
        norm = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
        np.testing.assert_allclose(norm(vecs), norm(ref_vecs), atol=EMB_ATOL_VS_FP32[dtype])
        # the logprobs generation reports are the model's own log-likelihood of what it sampled
        gens = hf.generate([reqs[0][0]], B.Sampling(n=1, max_tokens=6, temperature=1.0, seed=3))
        g = gens[0][0]
        np.testing.assert_allclose(g.logprobs, hf.loglikelihood([(reqs[0][0], g.token_ids)])[0],
                                   atol=BATCH_ATOL[dtype])


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", DTYPES)
def test_vllm_backend_at_each_precision(dtype, tiny_model, fp32_reference):
    pytest.importorskip("vllm")
    reqs, ref_lls, _ = fp32_reference
    with B.VLLMBackend(tiny_model, B.BackendSettings(dtype=dtype, kv_cache_space_gib=0.25)) as vl:
        assert vl.dtype == dtype and vl.fingerprint().endswith(dtype)
        import torch

        assert vl.llm.llm_engine.vllm_config.model_config.dtype == getattr(torch, dtype)
        lls = vl.loglikelihood(reqs)
        assert all(np.isfinite(x).all() and (np.asarray(x) <= 0).all() for x in lls)
        np.testing.assert_allclose(ppl(lls), ppl(ref_lls), rtol=PPL_RTOL_VS_FP32[dtype] + 1e-2)  # + vLLM's kernels
        gens = vl.generate([reqs[0][0]], B.Sampling(n=2, max_tokens=6, temperature=1.0, seed=5))
        for g in gens[0]:
            assert len(g.token_ids) == len(g.logprobs) > 0
            np.testing.assert_allclose(g.logprobs, vl.loglikelihood([(reqs[0][0], g.token_ids)])[0],
                                       atol=BATCH_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sentence_embedder_at_each_precision(dtype, tiny_sentence_model):
    texts = ["how do i bake bread at home", "the quick brown fox jumps over the lazy dog", "what capital of france"]
    with B.SentenceTransformersBackend(tiny_sentence_model, B.BackendSettings(name="sentence-transformers",
                                                                             dtype="float32")) as ref:
        want = ref.embed(texts, 64)
    with B.SentenceTransformersBackend(tiny_sentence_model, B.BackendSettings(name="sentence-transformers",
                                                                             dtype=dtype)) as st:
        assert st.dtype == dtype and st.fingerprint().endswith(dtype)
        got = st.embed(texts, 64)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-2)
    np.testing.assert_allclose(got, want, atol=EMB_ATOL_VS_FP32[dtype])


# ------------------------------------------------------------------------------------- reward model, policies
@pytest.fixture(scope="module")
def hh_pairs(hh_sample):
    from training.data import load_hh_pairs

    return load_hh_pairs(hh_sample)


def _small(**kw) -> dict:
    return {**dict(base_model="tiny-llama", batch_size=4, grad_accum=1, learning_rate=5e-3, warmup_ratio=0.0,
                   threads=1, save_steps=100, logging_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.0), **kw}


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, hh_pairs, tiny_model):
    from training.reward import RewardTrainConfig, train_reward_model

    work = tmp_path_factory.mktemp("rm-precision")
    train_reward_model(hh_pairs[:16], RewardTrainConfig(**_small(max_steps=4, max_length=64, bf16=False)), work,
                       seed=0, progress=False)
    return work / "model"


@pytest.mark.parametrize("dtype", DTYPES)
def test_reward_scores_and_evaluation_at_each_precision(dtype, reward_dir, hh_pairs):
    """The reward model loads and scores at each precision; scores do not depend on batching beyond the flip
    check's per-precision tolerance, and stay close to fp32's; the evaluation records the precision it ran at."""
    from training.evaluate import FLIP_TOLERANCE, EvalConfig, EvalContext, evaluate_reward_dir
    from training.reward import RewardModel

    pairs = hh_pairs[300:312]
    ref_c, ref_r = RewardModel.load(reward_dir, dtype="float32").score_pairs(pairs)
    rm = RewardModel.load(reward_dir, dtype=dtype)
    assert rm.dtype == dtype
    chosen, rejected = rm.score_pairs(pairs)
    one = [rm.score_pairs([p]) for p in pairs[:3]]
    np.testing.assert_allclose([c[0] for c, _ in one], chosen[:3], atol=FLIP_TOLERANCE[dtype])
    # bf16 vs fp32: scores of the tiny model (|score| ≲ 1) move by its rounding, not more
    np.testing.assert_allclose(chosen, ref_c, atol={"float32": 1e-5, "bfloat16": 0.1}[dtype])
    np.testing.assert_allclose(rejected, ref_r, atol={"float32": 1e-5, "bfloat16": 0.1}[dtype])
    cfg = EvalConfig(heldout_size=12, bootstrap=20, flip_check_pairs=4, threads=1, dtype=dtype)
    result = evaluate_reward_dir(reward_dir, None, EvalContext(pairs, cfg, dtype=dtype))
    report = result.metrics
    assert report["dtype"] == dtype and report["flip_check"]["tolerance"] == FLIP_TOLERANCE[dtype]
    assert report["flip_check"]["ok"], report["flip_check"]
    assert 0.0 <= report["accuracy"] <= 1.0


@pytest.fixture(scope="module")
def dpo_dir(tmp_path_factory, hh_pairs, tiny_model):
    from training.dpo import DPOTrainConfig, train_dpo

    work = tmp_path_factory.mktemp("dpo-precision")
    train_dpo(hh_pairs[:6], DPOTrainConfig(**_small(max_steps=2, batch_size=2, max_prompt_length=32,
                                                     max_completion_length=16, bf16=False)),
              work, seed=0, progress=False)
    return work


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_logps_and_evaluation_at_each_precision(dtype, dpo_dir, reward_dir, hh_pairs, tiny_model):
    from training.data import answer_text
    from training.evaluate import EvalConfig, evaluate_policy
    from training.policy import Policy
    from training.reward import RewardModel

    pairs = hh_pairs[320:324]
    prompts = [p.prompt for p in pairs]
    answers = [answer_text(p.chosen) for p in pairs]
    ref = Policy.load(dpo_dir / "model", dtype="float32").logps(prompts, answers)[0]
    policy = Policy.load(dpo_dir / "model", dtype=dtype)
    assert policy.dtype == dtype
    got = policy.logps(prompts, answers)[0]
    assert np.isfinite(got).all()
    # summed log-probs of ≤ 64 tokens: fp32 to rounding; bf16 a few percent of the sum
    np.testing.assert_allclose(got, ref, rtol={"float32": 1e-5, "bfloat16": 0.05}[dtype])
    cfg = EvalConfig(heldout_size=4, bootstrap=20, policy_pairs=4, win_rate_prompts=2, max_new_tokens=4, threads=1,
                     batch_size=4, dtype=dtype)
    out = evaluate_policy(dpo_dir / "model", tiny_model, RewardModel.load(reward_dir, dtype=dtype), pairs, cfg,
                          dtype=dtype, max_prompt=32, max_answer=16)
    assert out["dtype"] == dtype and 0.0 <= out["implicit_accuracy"] <= 1.0 and np.isfinite(out["perplexity"])


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_reward_training_with_and_without_bf16_autocast(bf16, tmp_path, hh_pairs, tiny_model):
    """`bf16: true` (what `bf16: null` picks on AVX512-BF16/AMX CPUs and GPUs) and `false` (AVX2-only CPUs) both
    train: the loss is finite and moves, the stats record the precision, the saved model scores finitely."""
    from training.reward import RewardModel, RewardTrainConfig, train_reward_model

    stats = train_reward_model(hh_pairs[:8], RewardTrainConfig(**_small(max_steps=2, max_length=48, bf16=bf16)),
                               tmp_path, seed=0, progress=False)
    assert stats["bf16"] is bf16
    losses = stats["members"][0]["losses"]
    assert len(losses) == 2 and np.isfinite(losses).all() and losses[0] != losses[-1]
    c, r = RewardModel.load(tmp_path / "model", dtype="float32").score_pairs(hh_pairs[8:10])
    assert np.isfinite(c).all() and np.isfinite(r).all()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_dpo_training_with_and_without_bf16_autocast(bf16, tmp_path, hh_pairs, tiny_model):
    from training.dpo import DPOTrainConfig, train_dpo

    stats = train_dpo(hh_pairs[:4], DPOTrainConfig(**_small(max_steps=2, batch_size=2, max_prompt_length=32,
                                                            max_completion_length=16, bf16=bf16)),
                      tmp_path, seed=0, progress=False)
    assert stats["bf16"] is bf16 and len(stats["losses"]) == 2 and np.isfinite(stats["losses"]).all()
