"""Evaluation of reward models and DPO policies on held-out preference pairs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    bootstrap: int = 1000
