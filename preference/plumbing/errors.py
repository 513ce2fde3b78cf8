"""User-facing errors: one class, one line each, caught by the CLI (exit code 2)."""


class CurateError(Exception):
    """An error the user can fix. The message says what was given, what was expected and how to fix it."""


class WaitingForReviewers(CurateError):
    """Pull found fewer finished reviews than the round needs; rerun later (nothing is lost)."""
