"""Reward models, DPO/LoRA, evaluation, the model registry and promotion gate."""

import preference  # noqa: F401  (applies the offline/OMP environment before torch is imported)
