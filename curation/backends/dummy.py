"""The `dummy` backend: deterministic hash-based numbers with no model at all, for fast tests of the steps."""

from __future__ import annotations

import json
import logging
import re
import zlib

import numpy as np

from curation.backends.base import Backend, BackendSettings, Generation, prompt_seed
from preference.schema import prompt_text

logger = logging.getLogger(__name__)

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
