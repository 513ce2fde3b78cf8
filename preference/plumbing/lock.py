"""One writer per project: a command that writes a project holds `<project>/writer.lock` while it runs.

    with project_lock(cfg.project, "curate round run -c configs/demo.yaml"):
        ...                                    # nobody else writes this project meanwhile

The lock is the kernel's `flock` on the lock file, taken without waiting: a second writer fails at once with
`ProjectBusy` (the CLI prints one line naming the holder — its command, PID and since when — and exits with
`EXIT_BUSY` = 12, so a cron job can skip quietly). The kernel releases the lock when its holder exits in any way,
SIGKILL and power loss included, so a lock left by a killed process is taken over by the next writer with no
manual step and no PID guess; the holder's identity, written into the lock file after the lock is taken, only
makes the message readable. Readers (`status`, `report`, `serve`, `drift`) never take it.

Why not the `filelock` package (installed beside the stack): it truncates the lock file on every attempt, so the
holder's identity could not live in the file that is locked; the part we need is `fcntl.flock` and a dozen lines.
Linux and macOS (and NFS v4 / Lustre, which emulate `flock`); one lock per process and project: a command takes
it once, at its entry point.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from preference.plumbing.errors import CurateError

LOCK_NAME = "writer.lock"
EXIT_BUSY = 12


class ProjectBusy(CurateError):
    """Another process holds the project's write lock (the CLI exits with `EXIT_BUSY`)."""

    exit_code = EXIT_BUSY


def holder(path: Path) -> dict:
    """What the lock file says about its holder: {"command", "pid", "since", "host"} (empty when unknown)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def current_writer(root: str | Path) -> dict | None:
    """The holder of `<root>/writer.lock` as far as a reader can tell without touching the lock (taking it, even
    shared, could make a writer fail): its recorded identity when that process is alive on this host; None when
    the project is free or its last holder is gone. For display only (`curate status`); the lock decides."""
    info = holder(Path(root) / LOCK_NAME)
    if not info.get("pid"):
        return None
    if info.get("host") != socket.gethostname():
        return info  # a machine sharing the filesystem: its liveness cannot be checked from here
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return info


def describe_writer(info: dict) -> str:
    """`curate round run -c x.yaml` (pid 123) since 2026-12-04T10:00:00+00:00 (3 min 05 s ago); the parts the
    lock file lacks (a holder caught between taking the lock and writing its name) are left out."""
    who = f"`{info['command']}`" if info.get("command") else "another curate command"
    if info.get("pid"):
        elsewhere = info.get("host") and info["host"] != socket.gethostname()
        who += f" (pid {info['pid']}{' on ' + info['host'] if elsewhere else ''})"
    if info.get("since"):
        who += f" since {info['since']}{_ago(info['since'])}"
    return who


def _ago(since: str | None) -> str:
    if not since:
        return ""
    try:
        seconds = (datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds()
    except ValueError:
        return ""
    from preference.plumbing.console import wall_time

    return f" ({wall_time(max(0.0, seconds))} ago)"


@contextlib.contextmanager
def project_lock(root: str | Path, command: str | None = None, *, what: str = "project") -> Iterator[Path]:
    """Hold `<root>/writer.lock` for the block, or raise `ProjectBusy` at once naming the holder.

    `command`: how this writer is named to a second one (default: this process's command line). `what`: the word
    used in the message ("project", "Argilla data folder", ...)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProjectBusy(
                f"{what} {root} is being written by {describe_writer(holder(path))}; one writer at a time: wait "
                "for it to finish (or stop it) and rerun; `curate status` shows where it stands"
            ) from None
        info = {"command": command or " ".join(["curate", *sys.argv[1:]]), "pid": os.getpid(),
                "since": datetime.now(UTC).isoformat(timespec="seconds"), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: nobody is named any more (the kernel drops the lock on close)
    finally:
        os.close(fd)


__all__ = ["project_lock", "ProjectBusy", "holder", "current_writer", "describe_writer", "EXIT_BUSY", "LOCK_NAME"]
