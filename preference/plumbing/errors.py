"""User-facing errors: one class, one line each, caught by the CLI (exit code 2, or the error's own `exit_code`)."""


class CurateError(Exception):
    """An error the user can fix. The message says what was given, what was expected and how to fix it."""

    exit_code: int = 2  # what the CLI exits with after printing the one line


class WaitingForReviewers(CurateError):
    """Pull found fewer finished reviews than the round needs; rerun later (nothing is lost). A state, not a
    failure: the CLI exits with 11 (`curate pull`, `curate round run` with or without --if-drift)."""

    exit_code = 11
