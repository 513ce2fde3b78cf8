"""`curate round run`: every step of a round in order, each skipped if its manifest exists."""

from __future__ import annotations

from preference.errors import NotBuiltYet


def run_round(cfg, rnd, *, force: bool = False, progress: bool = True, echo=print) -> None:
    raise NotBuiltYet("round run")
