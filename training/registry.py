"""Local model registry and the promotion gate."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GateConfig:
    metric: str = "pairwise_accuracy"
    min_improvement: float = 0.0
