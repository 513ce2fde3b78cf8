"""`curate select`: acquisition strategies pick the next items for humans, beside a random arm."""

from __future__ import annotations

from dataclasses import dataclass

from preference.errors import NotBuiltYet


@dataclass
class SelectionConfig:
    strategy: str = "hybrid"
    k: int = 16
    random_share: float = 0.15


def run_select(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("select")
