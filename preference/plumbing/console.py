"""A quiet console while a round step runs: library chatter goes to the step's `log.txt`, our output stays.

    with step_console(rnd.step("generate")):
        manifest = run_generate(cfg, rnd)
    # console: the step's tqdm bar and what our code prints; <round>/generate/log.txt: vLLM, torch,
    # transformers and TRL warnings and logs, C-level writes, child processes' output

While a step runs (unless `verbose`):
- file descriptors 1 and 2 point at the log, so C/C++ writes (torch's and vLLM's native warnings) and child
  processes (`accelerate launch`, Ray workers) land there;
- `sys.stdout` / `sys.stderr` are routing streams: a write whose nearest caller, past tqdm, logging and
  warnings internals, is our code (`curation`, `preference`, `training`) reaches the console; any other
  (a library's bars, prints and logging handlers) goes to the log. Step code keeps calling `tqdm(...)` and
  `print(...)` unchanged. The trainer's step bar (transformers' ProgressCallback, which TRL trainers use)
  counts as the step's bar; its logged metrics go to the log;
- Python warnings go to the log.

On exit, also after an exception or Ctrl-C, everything is put back: fds 1 and 2, `sys.stdout` / `sys.stderr`,
the root logger's handlers and level, warnings filters and `showwarning`; logging handlers created during the
step (libraries imported by it) that captured a routing stream are pointed back at the real stream. The run's
output is then appended to `<step>/log.txt` (one header line per run; nothing is added when the run wrote
nothing, e.g. a skipped step). While the step runs it is written to `<round>/.<step>.log` (`tail -f` it).
A failing step's exception gets a note with the log's path (and, for unexpected errors, the log's last lines),
which the traceback or the CLI's one-line error shows.

`verbose=True` leaves the console untouched: everything shows, no log is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from preference.plumbing.errors import CurateError

OURS = ("curation", "preference", "training")  # top-level packages whose writes reach the console
# Frames skipped when looking for who wrote: stream, logging and warnings machinery, and this module.
_PLUMBING = ("tqdm", "logging", "warnings", "io", "_io", "codecs", "contextlib", "threading", __name__)
# A progress bar drawn from these modules is the step's bar too (the HF/TRL trainer's training bar).
BAR_MODULES = ("transformers.trainer_callback",)
LOG_NAME = "log.txt"
TAIL_LINES = 12


def _module(frame) -> str:
    return frame.f_globals.get("__name__", "") or ""


def _is(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def written_by_us(frame) -> bool:
    """True when the nearest non-plumbing caller of a write is our code (or a trainer drawing its bar)."""
    bar = False
    while frame is not None:
        name = _module(frame)
        if _is(name, _PLUMBING):
            if name.startswith("tqdm") and frame.f_code.co_name != "write":
                bar = True  # a bar being drawn (tqdm.write would be a message)
            frame = frame.f_back
            continue
        return _is(name, OURS) or (bar and _is(name, BAR_MODULES))
    return False


class _Route:
    """Stands in for sys.stdout / sys.stderr during a step: our writes → console, others → log.

    After the step it forwards everything to the stream it replaced (a library may keep a reference)."""

    def __init__(self, real: TextIO, console: TextIO, log: TextIO):
        self._real, self._console, self._log = real, console, log
        self.active = True

    def write(self, text: str) -> int:
        if not self.active:
            return self._real.write(text)
        target = self._console if written_by_us(sys._getframe(1)) else self._log
        return target.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.active:
            self._console.flush()
            self._log.flush()
        else:
            self._real.flush()

    def fileno(self) -> int:  # terminal size and colour checks (tqdm, click) look at the console
        return (self._console if self.active else self._real).fileno()

    def isatty(self) -> bool:
        return (self._console if self.active else self._real).isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return getattr(self._real, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:
        return getattr(self._real, "errors", None) or "replace"

    def __getattr__(self, name: str):  # anything else (e.g. .buffer) behaves like the real stream
        return getattr(self._real, name)


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _console_stream(stream: TextIO, fd: int, saved: dict[int, int]) -> TextIO:
    """Where `stream`'s console output goes while fd `fd` points at the log: a copy of the original fd."""
    if _fd_of(stream) != fd:
        return stream  # not fd-backed (e.g. captured by a test runner): its writes never reach the log
    return open(os.dup(saved[fd]), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="replace")


def _flush_c_stdio() -> None:
    """Flush C stdio buffers (printf from native libraries) before fds change hands."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]


def _tail(path: Path, header_size: int, n: int = TAIL_LINES) -> list[str]:
    """The log's last `n` meaningful lines (progress-bar redraws dropped)."""
    with open(path, "rb") as f:
        f.seek(header_size)
        data = f.read()[-64_000:].decode("utf-8", errors="replace")
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in data.splitlines()]
    return [line for line in lines if line.strip()][-n:]


def wall_time(seconds: float | None) -> str:
    """A duration as people read it: `0.4 s`, `42.2 s`, `3 min 07 s`, `1 h 05 min`; `-` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _argv() -> str:
    return " ".join(["curate", *sys.argv[1:]])


class _Capture:
    """The redirection of one step (or command) run (see `step_console`); `stop` undoes exactly what `start`
    did. `final`: the log the run's output is appended to; `live`: where it is written meanwhile; `what`: the
    run's name in a failure's note."""

    def __init__(self, final: Path, live: Path, what: str):
        self.final, self.live, self.what = final, live, what

    def start(self) -> None:
        self.live.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        _flush_c_stdio()
        self.log_fd = os.open(self.live, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.earlier = os.lseek(self.log_fd, 0, os.SEEK_END)  # > 0: a crashed run's log is still here
        os.write(self.log_fd, f"=== {datetime.now(UTC).isoformat(timespec='seconds')} {_argv()} ===\n".encode())
        self.header_end = os.lseek(self.log_fd, 0, os.SEEK_END)
        self.log = open(self.log_fd, "a", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.old_out, self.old_err = sys.stdout, sys.stderr
        root = logging.getLogger()
        self.old_handlers, self.old_level = list(root.handlers), root.level
        consoles = (_console_stream(self.old_out, 1, self.saved), _console_stream(self.old_err, 2, self.saved))
        self.opened = [c for c, old in zip(consoles, (self.old_out, self.old_err), strict=True) if c is not old]
        for fd in (1, 2):
            os.dup2(self.log_fd, fd)
        self.routes = [_Route(self.old_out, consoles[0], self.log), _Route(self.old_err, consoles[1], self.log)]
        sys.stdout, sys.stderr = self.routes
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.showwarning = self._warning_to_log

    def _warning_to_log(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.log.write(warnings.formatwarning(message, category, filename, lineno, line))

    def stop(self, failure: BaseException | None) -> None:
        for stream in (*self.routes, self.log):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        _flush_c_stdio()
        self.warnings.__exit__(None, None, None)
        sys.stdout, sys.stderr = self.old_out, self.old_err
        for fd, copy in self.saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for route in self.routes:
            route.active = False
        for handler in _stream_handlers():  # created during the step by a library: back to the real stream
            if isinstance(handler.stream, _Route):
                handler.setStream(handler.stream._real)
        root = logging.getLogger()
        root.handlers[:] = self.old_handlers
        root.setLevel(self.old_level)
        for stream in self.opened:
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        try:
            self._save(failure)
        except OSError as exc:  # the console is back: say so, and never let this replace the step's own error
            message = f"{self.what}'s log could not be saved to {self.final}: {exc}"
            if failure is None:
                print(f"warning: {message}", file=sys.stderr)
            else:
                failure.add_note(message)

    def _save(self, failure: BaseException | None) -> None:
        """Append the run's output to the final log (and note its path on a failure); remove the live log."""
        try:
            output = self.live.stat().st_size > self.header_end  # did the step write anything?
            unexpected = failure is not None and not isinstance(failure, CurateError | KeyboardInterrupt)
            tail = _tail(self.live, self.header_end) if unexpected else []
            if failure is not None:
                self.log.write("".join(traceback.format_exception(failure)))
        finally:
            self.log.close()
            os.close(self.log_fd)
        # kept when the step wrote something, failed unexpectedly, or a crashed run left its log here; a user
        # error before any output (e.g. an upstream step missing) leaves no folder behind
        if output or unexpected or self.earlier:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            with open(self.final, "ab") as out, open(self.live, "rb") as src:
                out.write(src.read())
            if failure is not None:
                lines = "".join(f"\n  | {x}" for x in tail)
                failure.add_note(f"full log of {self.what}: {self.final}"
                                 + (f"\nits last lines before the error:{lines}" if tail else ""))
        self.live.unlink(missing_ok=True)


@contextlib.contextmanager
def step_console(step, *, verbose: bool = False) -> Iterator[Path | None]:
    """Run a round step (`store.Step`) with library output sent to its `log.txt` (see the module doc).

    Yields the log's path (None when `verbose`: then nothing is redirected)."""
    if verbose:
        yield None
        return
    with _captured(_Capture(step.path / LOG_NAME, step.round.path / f".{step.name}.log", f"step {step.name!r}")):
        yield step.path / LOG_NAME


@contextlib.contextmanager
def command_console(folder: Path, name: str, *, verbose: bool = False) -> Iterator[Path | None]:
    """The same quiet console for a command that is not a round step (`curate drift`): library output goes to
    `<folder>/log.txt` (appended per run, `<folder>/.<name>.log` while it runs). Yields the log's path (None
    when `verbose`)."""
    if verbose:
        yield None
        return
    with _captured(_Capture(Path(folder) / LOG_NAME, Path(folder) / f".{name}.log", f"`curate {name}`")):
        yield Path(folder) / LOG_NAME


@contextlib.contextmanager
def _captured(capture: _Capture) -> Iterator[None]:
    capture.start()
    try:
        yield
    except BaseException as exc:
        try:
            capture.stop(exc)
        except Exception as teardown:  # the step's own error is what the user must see, not this one
            exc.add_note(f"(and restoring the console failed: {teardown!r})")
        raise
    capture.stop(None)


__all__ = ["step_console", "command_console", "written_by_us", "wall_time", "LOG_NAME"]
