"""Throughput of scoring and generation at bf16 and fp32: raw vLLM vs `curate score`'s vLLM path vs transformers.

Same model (SmolLM2-135M-Instruct), same texts (HH-harmless prompts, chat template applied, with their chosen
and rejected answers), the threads `threads: null` gives (every core in the affinity mask; `--threads` to
change), each precision in turn in the same run (`--dtypes`; `auto` is what `dtype: auto` picks here). Every
figure is printed with the hardware it ran on: CPU, its features (AVX2 / AVX-512 / AVX512-BF16 / AMX), dtype
and threads.

Scoring tokens/s counts every token of every prompt+answer request; generation tokens/s counts generated tokens.
Two scoring workloads: one answer per prompt (no shared context), and two answers per prompt, which is what
`curate score` sees (n completions + references share each prompt; our path reads shared contexts from vLLM's
prefix cache, raw prompt_logprobs recomputes them). Each engine start (vLLM) and model load (transformers) is
timed too. On CPU, generation's top-p through `curation.backends.nucleus` is compared with vLLM's own (a vocabulary sort
per step) on the same engine and prompts: time and how many samples are identical.

Targets: our vLLM scoring path ≥ 90% of raw vLLM `prompt_logprobs`, and ≥ 1.4× the transformers backend, at the
dtype `auto` chooses.

    python scripts/bench_scoring.py [--pairs 32] [--gen-prompts 8] [--n 4] [--max-tokens 64] [--repeats 2]
                                    [--dtypes bfloat16,float32] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preference.plumbing.env import apply_env_defaults  # noqa: E402

apply_env_defaults()  # before torch is imported

from curation.backends import BackendSettings, Sampling, TransformersBackend, VLLMBackend, prompt_seed  # noqa: E402
from curation.steps.score import score_requests  # noqa: E402
from preference.plumbing.hardware import describe, hardware_summary, resolve_dtype  # noqa: E402
from preference.plumbing.io import read_jsonl  # noqa: E402
from preference.schema import parse_hh_pair  # noqa: E402
from training.models import SMOLLM2, resolve_model  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "hh-harmless-sample.jsonl.gz"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load_texts(backend, limit: int) -> list[tuple[list[dict], str, str]]:
    """(messages, chosen answer, rejected answer) of HH prompts of at most 384 tokens."""
    texts = []
    for row in read_jsonl(DATA):
        try:
            msgs, chosen, rejected = parse_hh_pair(row)
        except ValueError:
            continue
        if chosen and rejected and len(backend.encode(backend.render_chat(msgs))) <= 384:
            texts.append((msgs, chosen, rejected))
        if len(texts) == limit:
            break
    return texts


def bench_dtype(dtype: str, threads: int | None, args, results: dict) -> None:
    import numpy as np
    import torch
    from vllm import SamplingParams

    path = resolve_model(SMOLLM2)
    settings = BackendSettings(dtype=dtype, threads=threads, micro_batch_size=8, max_model_len=2048)
    vl = VLLMBackend(path, settings)
    hf = TransformersBackend(path, settings)
    hw = describe(hardware_summary(vl.dtype, vl.threads))
    tag = f"[{vl.dtype}, {vl.threads} threads]"
    print(f"\n=== {SMOLLM2} · {hw}")
    texts = load_texts(vl, args.pairs)
    warm = [(vl.encode("Hello"), vl.encode(" world"))]
    t_start = timed(lambda: vl.loglikelihood(warm))  # engine start + first-call kernels
    t_load = timed(lambda: hf.loglikelihood(warm))
    print(f"  vLLM engine start (incl. first call) {t_start:6.1f} s   transformers load {t_load:5.1f} s   {tag}")
    raw_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

    def bench(label: str, answers: tuple[int, ...]) -> None:
        def our_items():  # exactly what `curate score` does per member: tokenize, then score in shards
            return [(f"c/{i}/{k}", vl.encode(vl.render_chat(t[0])), vl.encode(t[k]) + [vl.eos_token_id], False)
                    for i, t in enumerate(texts) for k in answers]

        pairs = [(c, x) for _, c, x, _ in our_items()]
        tokens = sum(len(c) + len(x) for c, x in pairs)

        def raw_vllm():
            vl.llm.reset_prefix_cache()
            vl.llm.generate([{"prompt_token_ids": c + x} for c, x in pairs], raw_params, use_tqdm=False)

        def ours():
            vl.llm.reset_prefix_cache()
            with tempfile.TemporaryDirectory() as parts:
                score_requests(vl, our_items(), Path(parts), batch_size=256)

        t_raw, t_ours, t_hf = [], [], []
        for _ in range(args.repeats):  # interleaved so background load hits all alike; best of each is kept
            t_raw.append(timed(raw_vllm))
            t_ours.append(timed(ours))
            t_hf.append(timed(lambda: hf.loglikelihood(pairs)))
        r_raw, r_ours, r_hf = tokens / min(t_raw), tokens / min(t_ours), tokens / min(t_hf)
        results[(dtype, label)] = (r_raw, r_ours, r_hf)
        print(f"\n  scoring: {label} ({len(pairs)} requests, {tokens} prompt+answer tokens)")
        print(f"    raw vLLM prompt_logprobs      {r_raw:8.1f} tok/s   {tag}")
        print(f"    curate score vLLM path        {r_ours:8.1f} tok/s   {r_ours / r_raw:6.1%} of raw vLLM "
              f"(target ≥ 90%)   {tag}")
        print(f"    transformers backend          {r_hf:8.1f} tok/s   vLLM path = {r_ours / r_hf:.2f}× "
              f"(target ≥ 1.4×)   {tag}")
        lv, lh = vl.loglikelihood(pairs), hf.loglikelihood(pairs)
        rel = np.array([np.exp(np.mean(h) - np.mean(v)) - 1 for v, h in zip(lv, lh, strict=True)])
        print(f"    perplexity vLLM vs transformers: max rel diff {np.max(np.abs(rel)):.2%}, "
              f"mean {np.mean(np.abs(rel)):.2%}   {tag}")

    bench("1 answer per prompt, no shared contexts", (1,))
    bench("2 answers per prompt (chosen, rejected), as in `curate score`", (1, 2))

    prompts = [vl.render_chat(t[0]) for t in texts[: args.gen_prompts]]
    sampling = Sampling(n=args.n, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    vl.generate(prompts[:1], Sampling(n=1, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    gens = vl.generate(prompts, sampling)
    t_gen = time.perf_counter() - t0
    gen_tokens = sum(len(g.token_ids) for gs in gens for g in gs)
    hf_prompts = prompts[: args.hf_gen_prompts]
    t0 = time.perf_counter()
    hf_gens = hf.generate(hf_prompts, sampling)  # `curate generate` on the transformers backend
    t_hf_gen = time.perf_counter() - t0
    hf_tokens = sum(len(g.token_ids) for gs in hf_gens for g in gs)
    g_ours, g_hf = gen_tokens / t_gen, hf_tokens / t_hf_gen
    results[(dtype, "generate")] = (g_ours, g_hf)
    print(f"\n  generation (n={args.n}, max_tokens={args.max_tokens}, temperature 0.8)")
    print(f"    curate generate vLLM path     {g_ours:8.1f} tok/s   ({len(prompts)} prompts, {gen_tokens} tokens)   "
          f"{tag}")
    print(f"    transformers backend          {g_hf:8.1f} tok/s   ({len(hf_prompts)} prompts, {hf_tokens} tokens)   "
          f"vLLM = {g_ours / g_hf:.2f}×   {tag}")
    if vl.nucleus_processor:  # CPU: top-p through curation.backends.nucleus vs vLLM's own (a vocabulary sort per step)
        ids = [vl.encode(p) for p in prompts]

        def sample(own_top_p: bool) -> list:
            params = [SamplingParams(n=args.n, temperature=0.8, max_tokens=args.max_tokens, seed=prompt_seed(0, i),
                                     stop_token_ids=[vl.eos_token_id], top_p=0.95 if own_top_p else 1.0,
                                     extra_args=None if own_top_p else {"top_p": 0.95}) for i in ids]
            outs = vl.llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
            return [list(c.token_ids) for out in outs for c in out.outputs]

        seconds: dict[bool, list[float]] = {False: [], True: []}
        samples: dict[bool, list] = {}
        for _ in range(args.repeats):  # interleaved so background load hits both alike; best of each
            for own in (False, True):
                t0 = time.perf_counter()
                samples[own] = sample(own)
                seconds[own].append(time.perf_counter() - t0)
        same = sum(a == b for a, b in zip(samples[False], samples[True], strict=True))
        t_nucleus, t_sort = min(seconds[False]), min(seconds[True])
        print(f"    top-p via curation.backends.nucleus vs vLLM's sort: {t_sort / t_nucleus:.2f}× faster ({t_nucleus:.1f} s "
              f"vs {t_sort:.1f} s), {same} of {len(samples[False])} samples identical   {tag}")
    print(f"  torch threads during the run: {torch.get_num_threads()}")
    vl.close()
    hf.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32, help="HH prompts (each with its chosen and rejected answer)")
    ap.add_argument("--gen-prompts", type=int, default=8, help="prompts generated with vLLM")
    ap.add_argument("--hf-gen-prompts", type=int, default=2, help="prompts generated with transformers (slow)")
    ap.add_argument("--n", type=int, default=4, help="completions per prompt when generating")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per scorer (best is reported)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16, float32, auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: every usable core)")
    args = ap.parse_args()

    dtypes = [resolve_dtype(d.strip()) for d in args.dtypes.split(",") if d.strip()]
    results: dict = {}
    print(f"bench_scoring on {describe(hardware_summary())}; `dtype: auto` picks {resolve_dtype('auto')} here")
    for dtype in dict.fromkeys(dtypes):
        bench_dtype(dtype, args.threads, args, results)
    if len(results) > 3:
        print("\nsummary (tok/s; scoring = 2 answers per prompt)")
        label = "2 answers per prompt (chosen, rejected), as in `curate score`"
        for dtype in dict.fromkeys(dtypes):
            raw, ours, hf = results[(dtype, label)]
            gen, hf_gen = results[(dtype, "generate")]
            print(f"  {dtype:>9}: scoring raw vLLM {raw:7.1f} · ours {ours:7.1f} · transformers {hf:7.1f}   "
                  f"generation vLLM {gen:7.1f} · transformers {hf_gen:7.1f}")
        first, last = list(dict.fromkeys(dtypes))[:2]
        ours_a, ours_b = results[(first, label)][1], results[(last, label)][1]
        gen_a, gen_b = results[(first, "generate")][0], results[(last, "generate")][0]
        print(f"  {last} vs {first}: scoring {ours_b / ours_a:.2f}×, generation {gen_b / gen_a:.2f}× (our vLLM path)")


if __name__ == "__main__":
    main()
