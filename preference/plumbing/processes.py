"""The servers the tool starts (the local Argilla server and its search engine, vLLM's OpenAI server and the
serving gateway): one way to start, find, wait for and stop them.

    procs = Processes(root, needles={"server": "uvicorn"})
    procs.start_and_wait("server", cmd, env, ready=lambda: http_ok(url), timeout_s=120)
    procs.alive("server"); procs.pid("server"); procs.stop("server")

Each process runs in a session (process group) of its own, so stopping it stops what it started; its pid goes to
`<root>/pids/<name>.pid` and its output to `<root>/logs/<name>.log`. A process counts as running only when its pid
is alive, not a zombie, and its command line contains the name's needle, so a recycled pid is never taken for ours.
A start that fails or times out stops the process and says why, with the last lines of its log. Standard library
only (the Argilla server manager runs before anything else is installed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from preference.plumbing.errors import CurateError


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts connections on `host:port` (0.0.0.0 is probed on loopback)."""
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def http_ok(url: str, headers: dict | None = None, timeout_s: float = 3.0) -> bool:
    """`GET url` answers 200."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def read_pid(path: Path) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int | None, needle: str) -> bool:
    """`pid` runs (not a zombie) and its command line contains `needle`."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return needle in cmdline and state != "Z"


class Processes:
    """The server processes of one folder, by name; `needles[name]` is a string of that process's command line."""

    def __init__(self, root: str | Path, needles: dict[str, str]):
        self.root = Path(root)
        self.needles = dict(needles)
        self.pids = self.root / "pids"
        self.logs = self.root / "logs"

    def pid(self, name: str) -> int | None:
        return read_pid(self.pids / f"{name}.pid")

    def alive(self, name: str) -> bool:
        return alive(self.pid(name), self.needles[name])

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start `cmd` as `name` in a new session, output appended to its log, its pid recorded."""
        self.pids.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def stop(self, name: str, timeout_s: float = 30.0) -> bool:
        """SIGTERM the process group started as `name`, SIGKILL it after `timeout_s`. True if one was running."""
        pid, needle = self.pid(name), self.needles[name]
        running = alive(pid, needle)
        if running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while alive(pid, needle) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):  # reap it if this process started it
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.2)
            if alive(pid, needle):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        (self.pids / f"{name}.pid").unlink(missing_ok=True)
        return running

    def log_tail(self, name: str, n: int = 20) -> str:
        path = self.logs / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else []
        return f"last lines of {path}:\n" + "\n".join(lines)

    def start_and_wait(self, name: str, cmd: list[str], env: dict[str, str], ready: Callable[[], bool],
                       timeout_s: float, *, setting: str = "", poll_s: float = 0.5) -> subprocess.Popen:
        """Spawn `name` and wait until `ready()`. A crash, a timeout or Ctrl-C stops it; the error names the
        process, what happened and its log's last lines (`setting`: the config key of the timeout, if any)."""
        proc = self.spawn(name, cmd, env)
        deadline = time.monotonic() + timeout_s
        try:
            while not ready():
                if proc.poll() is not None:
                    raise CurateError(f"the {name} process exited (code {proc.returncode}) before it was ready; "
                                      + self.log_tail(name))
                if time.monotonic() > deadline:
                    raise CurateError(f"the {name} process was not ready after {timeout_s:.0f} s"
                                      + (f" ({setting})" if setting else "") + "; " + self.log_tail(name))
                time.sleep(poll_s)
        except BaseException:  # a timeout, a crash or Ctrl-C: leave nothing running
            self.stop(name)
            raise
        return proc


__all__ = ["Processes", "alive", "free_port", "http_ok", "port_open", "read_pid"]
