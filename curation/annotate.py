"""`curate push` / `curate pull`: send selected items to reviewers (Argilla or simulated), collect answers."""

from __future__ import annotations

from dataclasses import dataclass

from preference.errors import NotBuiltYet


@dataclass
class AnnotationConfig:
    backend: str = "simulated"  # "simulated" | "argilla"


def run_push(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("push")


def run_pull(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("pull")
