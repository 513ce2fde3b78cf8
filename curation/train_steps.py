"""`curate train reward|dpo`, `curate evaluate`: round-store steps around the trainers in `training/`."""

from __future__ import annotations

from preference.errors import NotBuiltYet


def run_train_reward(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("train reward")


def run_train_dpo(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("train dpo")


def run_evaluate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("evaluate")


def run_gate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    raise NotBuiltYet("gate")
