"""Throughput of scoring and generation: raw vLLM vs `curate score`'s vLLM path vs the transformers backend.

Same model (SmolLM2-135M-Instruct, bf16), same texts (HH-harmless prompts, chat template applied, with their
chosen and rejected answers), one thread, one run. Scoring tokens/s counts every token of every prompt+answer
request; generation tokens/s counts generated tokens. Two scoring workloads: one answer per prompt (no shared
context), and two answers per prompt, which is what `curate score` sees (n completions + references share each
prompt; our path reads shared contexts from vLLM's prefix cache, raw prompt_logprobs recomputes them).

Targets: our vLLM scoring path ≥ 90% of raw vLLM `prompt_logprobs`, and ≥ 1.4× the transformers backend.

    python scripts/bench_scoring.py [--pairs 64] [--gen-prompts 8] [--max-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preference.plumbing.env import apply_env_defaults  # noqa: E402

apply_env_defaults()  # before torch is imported

from curation.backends import BackendSettings, Sampling, TransformersBackend, VLLMBackend  # noqa: E402
from curation.score import score_requests  # noqa: E402
from preference.plumbing.io import read_jsonl  # noqa: E402
from preference.schema import parse_hh_pair  # noqa: E402
from training.models import SMOLLM2, resolve_model  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "hh-harmless-sample.jsonl.gz"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=40, help="HH prompts (each with its chosen and rejected answer)")
    ap.add_argument("--gen-prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt when generating")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per scorer (best is reported)")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)  # before vLLM starts (its CPU worker then forbids changing it)
    path = resolve_model(SMOLLM2)
    settings = BackendSettings(dtype="bfloat16", batch_size=8, max_model_len=2048)
    vl = VLLMBackend(path, settings)
    hf = TransformersBackend(path, settings)

    texts = []  # (messages, chosen answer, rejected answer)
    for row in read_jsonl(DATA):
        try:
            msgs, chosen, rejected = parse_hh_pair(row)
        except ValueError:
            continue
        if chosen and rejected and len(vl.encode(vl.render_chat(msgs))) <= 384:
            texts.append((msgs, chosen, rejected))
        if len(texts) == args.pairs:
            break

    from vllm import SamplingParams

    raw_params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    print(f"model {SMOLLM2} bf16, torch threads {torch.get_num_threads()}, {len(texts)} HH prompts")
    vl.loglikelihood([(vl.encode("Hello"), vl.encode(" world"))])  # warm-up (engine start, first-call kernels)
    hf.loglikelihood([(vl.encode("Hello"), vl.encode(" world"))])

    def bench(label: str, answers: tuple[int, ...]) -> None:
        def our_items():  # exactly what `curate score` does per member: tokenize, then score in shards
            return [(f"c/{i}/{k}", vl.encode(vl.render_chat(t[0])), vl.encode(t[k]) + [vl.eos_token_id])
                    for i, t in enumerate(texts) for k in answers]

        pairs = [(c, x) for _, c, x in our_items()]
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
        print(f"\nscoring: {label} ({len(pairs)} requests, {tokens} prompt+answer tokens)")
        print(f"  raw vLLM prompt_logprobs      {r_raw:8.1f} tok/s")
        print(f"  curate score vLLM path        {r_ours:8.1f} tok/s   {r_ours / r_raw:6.1%} of raw vLLM (target ≥ 90%)")
        print(f"  transformers backend          {r_hf:8.1f} tok/s   vLLM path = {r_ours / r_hf:.2f}× (target ≥ 1.4×)")
        lv, lh = vl.loglikelihood(pairs), hf.loglikelihood(pairs)
        rel = np.array([np.exp(np.mean(h) - np.mean(v)) - 1 for v, h in zip(lv, lh, strict=True)])
        print(f"  bf16 perplexity vLLM vs transformers: max rel diff {np.max(np.abs(rel)):.2%}, "
              f"mean {np.mean(np.abs(rel)):.2%}")

    bench("1 answer per prompt, no shared contexts", (1,))
    bench("2 answers per prompt (chosen, rejected), as in `curate score`", (1, 2))

    prompts = [vl.render_chat(t[0]) for t in texts[: args.gen_prompts]]
    sampling = Sampling(n=args.n, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    vl.generate(prompts[:1], Sampling(n=1, max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    gens = vl.generate(prompts, sampling)
    t_gen = time.perf_counter() - t0
    gen_tokens = sum(len(g.token_ids) for gs in gens for g in gs)

    model = hf.hf_model
    hf_tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([vl.encode(p)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8,
                                 top_p=0.95, num_return_sequences=args.n, max_new_tokens=args.max_tokens,
                                 pad_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id)
            new = out[:, ids.shape[1] :]
            hf_tokens += int(sum(int(row.tolist().index(hf.eos_token_id)) + 1 if hf.eos_token_id in row.tolist()
                                 else len(row) for row in new))
    t_hf_gen = time.perf_counter() - t0
    g_ours, g_hf = gen_tokens / t_gen, hf_tokens / t_hf_gen
    print(f"\ngeneration ({len(prompts)} prompts × n={args.n}, max_tokens={args.max_tokens})")
    print(f"  curate generate vLLM path     {g_ours:8.1f} tok/s   ({gen_tokens} tokens)")
    print(f"  transformers generate         {g_hf:8.1f} tok/s   ({hf_tokens} tokens)   vLLM = {g_ours / g_hf:.2f}×")
    vl.close()
    hf.close()


if __name__ == "__main__":
    main()
