"""Pools, generation backends, scorers, acquisition strategies, rounds and the `curate` CLI."""
