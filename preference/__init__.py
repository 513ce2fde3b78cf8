"""Preference data: records, completions, pairs, the Argilla adapter, agreement and aggregation.

General plumbing (errors, typed configs, io, the round store, environment defaults) is in `preference.plumbing`.
Importing this package changes nothing in the process: entry points apply `plumbing.env.apply_env_defaults()`.
"""
