"""`curate score`: perplexities, committee disagreement and embeddings for generated completions."""

from __future__ import annotations

from dataclasses import dataclass, field

from preference.errors import NotBuiltYet


@dataclass
class ScoringConfig:
    committee: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])


def run_score(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("score")
