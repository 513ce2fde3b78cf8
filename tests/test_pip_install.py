"""The installer (preference/plumbing/installer.py, run by `make install` through scripts/pip_install.py): uv gets the
package sources pip is configured with; without uv, pip does the work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load():
    from preference.plumbing import installer

    return installer


def test_the_script_runs_the_installer_before_the_project_is_installed(tmp_path):
    """`make install` runs scripts/pip_install.py with a bare interpreter: it finds the installer by itself."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", str(ROOT / "scripts" / "pip_install.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--python" in out.stdout, out.stderr


def test_uv_gets_pips_sources_and_compiles_bytecode(tmp_path, monkeypatch):
    installer = load()
    monkeypatch.delenv("CURATE_NO_UV", raising=False)
    fake_uv = tmp_path / "bin" / "uv"
    fake_uv.parent.mkdir()
    fake_uv.write_text("#!/bin/sh\n")
    fake_uv.chmod(0o755)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setenv("PIP_CONSTRAINT", str(tmp_path / "constraints.txt"))
    cmd = installer.command(tmp_path / "bin" / "python", ["-e", ".[dev]"])
    assert cmd[:3] == [str(fake_uv), "pip", "install"] and "--compile-bytecode" in cmd
    values = lambda flag: [cmd[i + 1] for i, part in enumerate(cmd) if part == flag]  # noqa: E731
    assert str(tmp_path / "wheels") in values("--find-links")  # also those of any pip.conf
    assert str(tmp_path / "constraints.txt") in values("--constraint")
    assert cmd[-2:] == ["-e", ".[dev]"]


def test_without_uv_pip_installs(tmp_path, monkeypatch):
    installer = load()
    monkeypatch.setenv("CURATE_NO_UV", "1")
    assert installer.command(tmp_path / "python", ["x==1"]) == [
        str(tmp_path / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "x==1"]
    assert installer.make_venv(tmp_path / "v") == [sys.executable, "-m", "venv", str(tmp_path / "v")]
