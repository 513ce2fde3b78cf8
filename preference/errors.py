"""User-facing errors: one class, one line each, caught by the CLI (exit code 2)."""


class CurateError(Exception):
    """An error the user can fix. The message says what was given, what was expected and how to fix it."""


class NotBuiltYet(CurateError):
    """A step of the loop whose implementation has not landed yet."""

    def __init__(self, step: str):
        super().__init__(f"step {step!r} is not built yet")
        self.step = step


class WaitingForReviewers(CurateError):
    """Pull found fewer finished reviews than the round needs; rerun later (nothing is lost)."""
