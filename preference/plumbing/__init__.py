"""Project-wide plumbing that every package uses: nothing here knows about preference data.

- `errors`: `CurateError`, the one user-facing error type (one line: what was given, what was expected, the fix);
- `config`: YAML → typed dataclasses (unknown keys and wrong types fail with the key path);
- `io`: atomic file writes, parquet / jsonl rows (no pickle);
- `store`: the round store (project → rounds → steps, each finished by a manifest written last);
- `env`: the process environment defaults the entry points apply before torch is imported.
"""
