"""The `sentence-transformers` backend: embeddings only, from a sentence-transformers model folder (e.g. the built-in
`all-minilm-l6-v2`), with its pooling and normalization as the folder's `modules.json` says. `scoring.embedding_model`
picks it by itself when it names such a folder (`embedding_settings`); it cannot generate or score."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from curation.backends.base import (
    Backend,
    BackendError,
    BackendSettings,
    backend_class,
    model_fingerprint,
    model_folder,
)
from preference.plumbing.hardware import (
    cuda_available,
)

logger = logging.getLogger(__name__)

def is_sentence_transformer(folder: str | Path) -> bool:
    """Whether `folder` is a sentence-transformers model folder (its `modules.json` lists the pipeline)."""
    return (Path(folder) / "modules.json").is_file()


def embedding_settings(model: str | Path, settings: BackendSettings) -> BackendSettings:
    """The settings to embed with `model`: a sentence-transformers folder runs on that backend (same dtype and
    threads), any other model on `settings` as given (its hidden states, see `Backend.embed`)."""
    from dataclasses import replace

    if backend_class(settings.name).loads_weights and is_sentence_transformer(model_folder(model)):
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
        self.path = model_folder(model)
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
