"""A local Argilla 2.8 server for development and tests: `curate argilla up|down|status`.

    curate argilla up        # installs its own venv once, starts noida + Argilla, waits (also: scripts/argilla-server)
    curate argilla status
    curate argilla down      # stops both by their pid files; data is kept

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

The processes are started and stopped by `preference.plumbing.processes` (pid files in `<data-dir>/pids/`, logs
in `<data-dir>/logs/`, each in its own process group). `up` and `down` hold the data folder's write lock
(`<data-dir>/writer.lock`): a second `up` on the same folder meanwhile gets one line and exit code 12. Part of
the installed package (`curate argilla` works from a wheel) and standard library only, so any Python >= 3.11
runs it: `python -m preference.argilla_server up`.

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
import subprocess
import sys
import time
from pathlib import Path

from preference.plumbing.errors import CurateError
from preference.plumbing.lock import project_lock
from preference.plumbing.processes import Processes, free_port, http_ok, port_open

PACKAGES = ("argilla-server==2.8.0", "noida-db==0.2.3")
DEFAULT_PORT = 6900
DEV_API_KEY = "curate.dev.owner.apikey"  # development only; set $ARGILLA_API_KEY for anything shared
DEV_PASSWORD = "curate-dev-password"
OWNER = "curate"


class ServerError(CurateError):
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
        from preference.plumbing import installer

        if not cfg.python.exists():
            _run(installer.make_venv(cfg.venv), "create the server venv")
        _run(installer.command(cfg.python, PACKAGES), f"install {' '.join(PACKAGES)}")
        marker.write_text(wanted)
    return cfg.python


def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ServerError(f"could not {what} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


# processes ----------------------------------------------------------------------------------------------------
NEEDLES = {"noida": "noida-db", "server": "uvicorn"}


def processes(cfg: ServerConfig) -> Processes:
    return Processes(cfg.data_dir, NEEDLES)


def ready(cfg: ServerConfig) -> bool:
    """The server answers `/api/v1/me` for the owner's API key."""
    return http_ok(f"{cfg.url}/api/v1/me", {"X-Argilla-Api-Key": cfg.api_key})


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
    procs = processes(cfg)
    state = json.loads(_state_path(cfg).read_text()) if _state_path(cfg).is_file() else {}
    probe = dataclasses.replace(cfg, port=state.get("port", cfg.port))
    server_running = procs.alive("server")
    return {
        "url": probe.url,
        "data_dir": str(cfg.data_dir),
        "noida": {"pid": procs.pid("noida"), "running": procs.alive("noida"), **state.get("noida", {})},
        "server": {"pid": procs.pid("server"), "running": server_running},
        "ready": server_running and ready(probe),
    }


def up(cfg: ServerConfig | None = None, echo=print) -> dict:
    """Start noida (Elasticsearch + Redis) and the Argilla server; return `status()`. Idempotent. Holds the data
    folder's write lock: a second `up` or `down` on it meanwhile fails at once (`ProjectBusy`, exit 12)."""
    cfg = cfg or ServerConfig()
    with project_lock(cfg.data_dir, what="Argilla data folder"):
        return _up(cfg, echo)


def _up(cfg: ServerConfig, echo) -> dict:
    current = status(cfg)
    if current["ready"] and current["noida"]["running"]:
        if current["url"] != cfg.url:
            raise ServerError(f"a server from {cfg.data_dir} already runs at {current['url']}; run `down` first")
        echo(f"argilla server already running at {cfg.url} (data: {cfg.data_dir})")
        return current
    _down(cfg, echo=lambda *_: None)  # leftovers of a half-started server
    if port_open(cfg.port):
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
    procs = processes(cfg)
    t0 = time.monotonic()
    echo(f"starting noida-db (elasticsearch :{es_port}, redis :{redis_port})")
    try:
        procs.start_and_wait(
            "noida", [str(noida_bin), "start", "--data-dir", str(cfg.data_dir / "noida"), "--host", "127.0.0.1",
                      "--only", "elasticsearch,redis", "--elasticsearch-port", str(es_port),
                      "--redis-port", str(redis_port)],
            env, lambda: http_ok(f"http://127.0.0.1:{es_port}/") and port_open(redis_port), 60)
        bootstrap(cfg, python, env)
        echo(f"starting argilla-server on {cfg.url}")
        procs.start_and_wait(
            "server", [str(python), "-m", "uvicorn", "argilla_server:app", "--host", "127.0.0.1",
                       "--port", str(cfg.port)],
            env, lambda: ready(cfg), cfg.ready_timeout_s)
    except BaseException:  # noida up but the server not: stop both
        _down(cfg, echo=lambda *_: None)
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
    with project_lock(cfg.data_dir, what="Argilla data folder"):
        return _down(cfg, echo)


def _down(cfg: ServerConfig, echo) -> bool:
    procs = processes(cfg)
    stopped = procs.stop("server", timeout_s=20)
    stopped = procs.stop("noida", timeout_s=20) or stopped
    _state_path(cfg).unlink(missing_ok=True)
    echo(f"argilla server {'stopped' if stopped else 'was not running'} (data kept in {cfg.data_dir})")
    return stopped


def main(argv: list[str] | None = None) -> int:
    """`up | down | status [--port N] [--data-dir D] [--venv V]`; exit 0, 1 (status: not ready), 2 (an error) or
    12 (another `up`/`down` holds the data folder)."""
    parser = argparse.ArgumentParser(prog="curate argilla", description=__doc__.split("\n\n")[0])
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
    except CurateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
