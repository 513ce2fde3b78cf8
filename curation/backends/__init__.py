"""Model backends: one narrow batched interface (`base.Backend`: generate, loglikelihood, embed), a registry
(`BACKENDS`: config name → class) and one module per backend: `vllm`, `transformers`, `sentence_transformers`,
`dummy` (no model; for tests). Their modules import their libraries only when a model loads."""

from curation.backends.base import (
    BACKENDS,
    Backend,
    BackendError,
    BackendSettings,
    Generation,
    HFTokenizerMixin,
    Sampling,
    SamplingError,
    announce_hardware,
    backend_class,
    check_runs_models,
    check_sampling,
    fit_request,
    format_timings,
    load_backend,
    model_fingerprint,
    model_folder,
    prompt_seed,
    use_threads,
)
from curation.backends.dummy import DummyBackend
from curation.backends.sentence_transformers import (
    SentenceTransformersBackend,
    embedding_settings,
    is_sentence_transformer,
)
from curation.backends.transformers import TransformersBackend
from curation.backends.vllm import VLLMBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendSettings",
    "Generation",
    "HFTokenizerMixin",
    "Sampling",
    "SamplingError",
    "announce_hardware",
    "backend_class",
    "check_runs_models",
    "check_sampling",
    "fit_request",
    "format_timings",
    "load_backend",
    "model_fingerprint",
    "model_folder",
    "prompt_seed",
    "use_threads",
    "DummyBackend",
    "SentenceTransformersBackend",
    "TransformersBackend",
    "VLLMBackend",
    "embedding_settings",
    "is_sentence_transformer",
]
