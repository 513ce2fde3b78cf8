"""A local Argilla 2.8 server for development and tests: `up`, `down`, `status`.

    python scripts/argilla_server.py up        # installs its own venv once, starts noida + Argilla, waits
    python scripts/argilla_server.py status
    python scripts/argilla_server.py down      # stops both by their pid files; data is kept

What `up` does (idempotent: a healthy running server is left alone):

1. a venv of its own (`$CURATE_ARGILLA_VENV`, default `$CURATE_CACHE/argilla-server-venv`, `$CURATE_CACHE`
   defaulting to `~/.cache/curate`) with `argilla-server==2.8.0` and `noida-db==0.2.3` (installed once; the
   server's dependencies clash with the main environment's, so it never shares it);
2. noida-db's binary with only its Elasticsearch-8 and Redis services on two free loopback ports;
3. the database migration and an owner user with the API key from `$ARGILLA_API_KEY` (default: a fixed
   development key), done in Python, not through the server's typer CLI (typer 0.9 breaks with click >= 8.2);
   skipped when the data dir's database had it done for the same packages and owner (`bootstrap`);
4. `uvicorn argilla_server:app` on 127.0.0.1 (`--port`, default `$CURATE_ARGILLA_PORT` or 6900), SQLite under
   the data dir (`--data-dir`, default `$CURATE_ARGILLA_HOME` or `$CURATE_CACHE/argilla-server`);
5. waits until `GET /api/v1/me` answers for the owner's key.

Each process runs in its own session (process group); its pid goes to `<data-dir>/pids/`, and `down` stops that
group only. Logs: `<data-dir>/logs/`. Standard library only, so any Python >= 3.11 can run it; importable
(`up`, `down`, `status`, `ServerConfig`) for the `curate` CLI and the test fixture.

This server is for development and tests. For real annotation work point `annotation.argilla.url` (or
`$ARGILLA_API_URL`) and `$ARGILLA_API_KEY` at a production Argilla instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACKAGES = ("argilla-server==2.8.0", "noida-db==0.2.3")
DEFAULT_PORT = 6900
DEV_API_KEY = "curate.dev.owner.apikey"  # development only; set $ARGILLA_API_KEY for anything shared
DEV_PASSWORD = "curate-dev-password"
OWNER = "curate"


class ServerError(RuntimeError):
    """The local server could not be installed, started or stopped; the message says why and where to look."""


def _cache() -> Path:
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate")


@dataclasses.dataclass
class ServerConfig:
    data_dir: Path = dataclasses.field(
        default_factory=lambda: Path(os.environ.get("CURATE_ARGILLA_HOME") or _cache() / "argilla-server")
    )
    venv: Path = dataclasses.field(
        default_factory=lambda: Path(os.environ.get("CURATE_ARGILLA_VENV") or _cache() / "argilla-server-venv")
    )
    port: int = dataclasses.field(default_factory=lambda: int(os.environ.get("CURATE_ARGILLA_PORT") or DEFAULT_PORT))
    api_key: str = dataclasses.field(default_factory=lambda: os.environ.get("ARGILLA_API_KEY") or DEV_API_KEY)
    username: str = OWNER
    password: str = dataclasses.field(default_factory=lambda: os.environ.get("ARGILLA_PASSWORD") or DEV_PASSWORD)
    workspace: str = "curate"
    ready_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.venv = Path(self.venv).expanduser().resolve()
        if len(self.api_key) < 8 or len(self.password) < 8:
            raise ServerError("the owner's API key and password need at least 8 characters")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_dir(self) -> Path:
        return self.data_dir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


# venv ---------------------------------------------------------------------------------------------------------
def ensure_venv(cfg: ServerConfig, echo=print) -> Path:
    """Create the server's venv with the pinned packages once (a marker file records a finished install)."""
    marker = cfg.venv / ".curate-installed"
    wanted = "\n".join(PACKAGES) + "\n"
    if marker.is_file() and marker.read_text() == wanted and cfg.python.exists():
        return cfg.python
    cfg.venv.parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.venv.parent / f".{cfg.venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another `up` (or a test session) may be installing right now
        if marker.is_file() and marker.read_text() == wanted and cfg.python.exists():
            return cfg.python
        echo(f"installing {' '.join(PACKAGES)} into {cfg.venv} (once; seconds with uv, 1-2 min with pip)")
        installer = _pip_install_module()
        if not cfg.python.exists():
            _run(installer.make_venv(cfg.venv), "create the server venv")
        _run(installer.command(cfg.python, PACKAGES), f"install {' '.join(PACKAGES)}")
        marker.write_text(wanted)
    return cfg.python


def _pip_install_module():
    """scripts/pip_install.py (uv when at hand, else pip), loaded by path: this file runs as a script too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("curate_pip_install", Path(__file__).with_name("pip_install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ServerError(f"could not {what} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


# processes ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int | None, needle: str) -> bool:
    """True if `pid` runs and its command line contains `needle` (guards against a recycled pid).

    For processes started by another invocation (`down`, `status`); `up` watches its own children directly."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return needle in cmdline and stat[0] != "Z"


def _spawn(cmd: list[str], name: str, cfg: ServerConfig, env: dict) -> subprocess.Popen:
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    cfg.pid_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    (cfg.pid_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def _stop(cfg: ServerConfig, name: str, needle: str, timeout_s: float = 20.0) -> bool:
    """Stop the process group started as `name` (SIGTERM, then SIGKILL). True if something was stopped."""
    pid_file = cfg.pid_dir / f"{name}.pid"
    pid = _read_pid(pid_file)
    stopped = False
    if _alive(pid, needle):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid, needle) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if _alive(pid, needle):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # reap it if this process started it
            os.waitpid(pid, os.WNOHANG)
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


def _log_tail(cfg: ServerConfig, name: str, n: int = 25) -> str:
    path = cfg.log_dir / f"{name}.log"
    lines = path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else []
    return f"last lines of {path}:\n" + "\n".join(lines)


def _wait(check, what: str, timeout_s: float, cfg: ServerConfig, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise ServerError(
                f"{name} exited (code {proc.returncode}) while waiting for {what}; {_log_tail(cfg, name)}"
            )
        time.sleep(0.5)
    raise ServerError(f"{what} not ready after {timeout_s:.0f} s; {_log_tail(cfg, name)}")


def _http_ok(url: str, headers: dict | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def ready(cfg: ServerConfig) -> bool:
    """The server answers `/api/v1/me` for the owner's API key."""
    return _http_ok(f"{cfg.url}/api/v1/me", {"X-Argilla-Api-Key": cfg.api_key})


# the server ---------------------------------------------------------------------------------------------------
_BOOTSTRAP = """
import asyncio, sys
import alembic.config
from argilla_server.database import ALEMBIC_CONFIG_FILE
alembic.config.main(argv=["-c", ALEMBIC_CONFIG_FILE, "upgrade", "head"])
from argilla_server.cli.database.users.create import _create
from argilla_server.models import UserRole
username, password, api_key, workspace = sys.argv[1:5]
asyncio.run(_create(first_name=username, username=username, role=UserRole.owner, password=password,
                    api_key=api_key, workspace=[workspace]))
"""


def bootstrap(cfg: ServerConfig, python: Path, env: dict) -> bool:
    """Migrate the database and create the owner, unless this data dir's database already had it done for the
    same server packages and owner (`home/bootstrap.json`; a Python start importing the server, 7 s here).
    True if it ran."""
    marker, db = cfg.data_dir / "home" / "bootstrap.json", cfg.data_dir / "home" / "argilla.db"
    owner = hashlib.sha256("\0".join([cfg.username, cfg.password, cfg.api_key, cfg.workspace]).encode()).hexdigest()
    done = {"packages": list(PACKAGES), "owner_sha256": owner}
    with contextlib.suppress(OSError, ValueError):
        if db.is_file() and json.loads(marker.read_text()) == done:
            return False
    marker.unlink(missing_ok=True)
    _run([str(python), "-c", _BOOTSTRAP, cfg.username, cfg.password, cfg.api_key, cfg.workspace],
         "migrate the database and create the owner", env=env)
    marker.write_text(json.dumps(done, indent=2) + "\n")
    return True


def _env(cfg: ServerConfig, es_port: int, redis_port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGILLA_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(
        ARGILLA_HOME_PATH=str(cfg.data_dir / "home"),
        ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{cfg.data_dir / 'home' / 'argilla.db'}?check_same_thread=False",
        ARGILLA_SEARCH_ENGINE="elasticsearch",
        ARGILLA_ELASTICSEARCH=f"http://127.0.0.1:{es_port}",
        ARGILLA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        ARGILLA_ENABLE_TELEMETRY="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="1",
        PATH=f"{cfg.venv / 'bin'}:{os.environ.get('PATH', '')}",
    )
    return env


def _state_path(cfg: ServerConfig) -> Path:
    return cfg.data_dir / "server.json"


def status(cfg: ServerConfig | None = None) -> dict:
    """Where the server stands: pids, ports, whether each process runs and whether the API answers."""
    cfg = cfg or ServerConfig()
    state = json.loads(_state_path(cfg).read_text()) if _state_path(cfg).is_file() else {}
    noida, server = _read_pid(cfg.pid_dir / "noida.pid"), _read_pid(cfg.pid_dir / "server.pid")
    port = state.get("port", cfg.port)
    probe = dataclasses.replace(cfg, port=port)
    return {
        "url": probe.url,
        "data_dir": str(cfg.data_dir),
        "noida": {"pid": noida, "running": _alive(noida, "noida-db"), **state.get("noida", {})},
        "server": {"pid": server, "running": _alive(server, "uvicorn")},
        "ready": _alive(server, "uvicorn") and ready(probe),
    }


def up(cfg: ServerConfig | None = None, echo=print) -> dict:
    """Start noida (Elasticsearch + Redis) and the Argilla server; return `status()`. Idempotent."""
    cfg = cfg or ServerConfig()
    current = status(cfg)
    if current["ready"] and current["noida"]["running"]:
        if current["url"] != cfg.url:
            raise ServerError(f"a server from {cfg.data_dir} already runs at {current['url']}; run `down` first")
        echo(f"argilla server already running at {cfg.url} (data: {cfg.data_dir})")
        return current
    down(cfg, echo=lambda *_: None)  # leftovers of a half-started server
    if _port_open(cfg.port):
        raise ServerError(f"port {cfg.port} on 127.0.0.1 is taken by another program; pass --port or free it")
    python = ensure_venv(cfg, echo)
    import_check = "import importlib.resources as r; print(r.files('noida_db') / 'noida-db')"
    noida_bin = Path(_run([str(python), "-c", import_check], "locate the noida-db binary").strip())
    noida_bin.chmod(0o755)
    es_port, redis_port = free_port(), free_port()
    while redis_port == es_port:
        redis_port = free_port()
    (cfg.data_dir / "home").mkdir(parents=True, exist_ok=True)
    env = _env(cfg, es_port, redis_port)
    t0 = time.monotonic()
    echo(f"starting noida-db (elasticsearch :{es_port}, redis :{redis_port})")
    noida = _spawn(
        [str(noida_bin), "start", "--data-dir", str(cfg.data_dir / "noida"), "--host", "127.0.0.1",
         "--only", "elasticsearch,redis", "--elasticsearch-port", str(es_port), "--redis-port", str(redis_port)],
        "noida", cfg, env,
    )
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{es_port}/") and _port_open(redis_port),
              "noida-db (elasticsearch, redis)", 60, cfg, "noida", noida)
        bootstrap(cfg, python, env)
        echo(f"starting argilla-server on {cfg.url}")
        server = _spawn(
            [str(python), "-m", "uvicorn", "argilla_server:app", "--host", "127.0.0.1", "--port", str(cfg.port)],
            "server", cfg, env,
        )
        _wait(lambda: ready(cfg), f"argilla server at {cfg.url}/api/v1/me", cfg.ready_timeout_s,
              cfg, "server", server)
    except BaseException:
        down(cfg, echo=lambda *_: None)
        raise
    state = {"port": cfg.port, "noida": {"elasticsearch_port": es_port, "redis_port": redis_port},
             "started_seconds": round(time.monotonic() - t0, 1)}
    _state_path(cfg).write_text(json.dumps(state, indent=2) + "\n")
    echo(f"argilla server ready at {cfg.url} in {state['started_seconds']} s "
         f"(owner {cfg.username!r}, workspace {cfg.workspace!r}, data: {cfg.data_dir})")
    return status(cfg)


def down(cfg: ServerConfig | None = None, echo=print) -> bool:
    """Stop the server, then noida, by their pid files. True if anything was running. Data is kept."""
    cfg = cfg or ServerConfig()
    stopped = _stop(cfg, "server", "uvicorn")
    stopped = _stop(cfg, "noida", "noida-db") or stopped
    _state_path(cfg).unlink(missing_ok=True)
    echo(f"argilla server {'stopped' if stopped else 'was not running'} (data kept in {cfg.data_dir})")
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--port", type=int, help=f"server port (default $CURATE_ARGILLA_PORT or {DEFAULT_PORT})")
    parser.add_argument("--data-dir", type=Path, help="data dir (default $CURATE_ARGILLA_HOME)")
    parser.add_argument("--venv", type=Path, help="the server's venv (default $CURATE_ARGILLA_VENV)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"port": args.port, "data_dir": args.data_dir, "venv": args.venv}.items() if v}
    try:
        cfg = ServerConfig(**overrides)
        if args.command == "up":
            up(cfg)
        elif args.command == "down":
            down(cfg)
        else:
            info = status(cfg)
            print(json.dumps(info, indent=2))
            return 0 if info["ready"] else 1
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
