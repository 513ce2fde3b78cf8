"""Pools, generation backends, scorers, acquisition strategies, rounds and the `curate` CLI."""

import preference  # noqa: F401  (applies the offline/OMP environment before torch is imported)
