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
backend class's import path, imported when chosen. One module per backend in this package (`vllm`, `transformers`,
`sentence_transformers`, `dummy`). Adding a backend = a module with its class (subclass `Backend`, set `kind` to its
name and `requires` to the package it needs, implement the underscored calls) + one line in `BACKENDS` + tests
(the conformance suite in tests/test_backends.py runs every registered backend).

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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import (
    Dtype,
    describe,
    hardware_summary,
    resolve_dtype,
    resolve_threads,
)

logger = logging.getLogger(__name__)

TokensOrText = str | list[int]

# ------------------------------------------------------------------------------------------------ registry
# name → the Backend class's import path (imported when chosen: a backend's heavy imports are paid only then).
BACKENDS: dict[str, str] = {
    "vllm": "curation.backends.vllm.VLLMBackend",
    "transformers": "curation.backends.transformers.TransformersBackend",
    "sentence-transformers": "curation.backends.sentence_transformers.SentenceTransformersBackend",
    "dummy": "curation.backends.dummy.DummyBackend",
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


class HFTokenizerMixin:
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


def model_folder(model: str | Path) -> Path:
    from training.models import resolve_model

    return resolve_model(model)


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
    "HFTokenizerMixin",
    "Generation",
    "Sampling",
    "SamplingError",
    "announce_hardware",
    "backend_class",
    "check_runs_models",
    "check_sampling",
    "fit_request",
    "format_timings",
    "load_backend",
    "model_folder",
    "model_fingerprint",
    "prompt_seed",
    "use_threads",
]
