"""`curate generate`: n sampled completions per prompt from one or more generator models."""

from __future__ import annotations

from dataclasses import dataclass, field

from preference.errors import NotBuiltYet


@dataclass
class GenerationConfig:
    backend: str = "vllm"  # "vllm" | "transformers" | "dummy"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])
    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 128


def run_generate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("generate")
