"""Preference data: records, completions, pairs, the Argilla adapter, agreement and aggregation."""

from preference._env import apply_env_defaults

apply_env_defaults()
