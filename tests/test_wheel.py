"""The project as users install it: a wheel built from this checkout, installed in a fresh venv, run from a folder
that is not the checkout. `curate argilla` must work there (its server manager is part of the package, not a
script of the source tree), and the wheel holds every package and subpackage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("argilla")  # reads the session's Argilla server


def sh(*cmd, cwd=None, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: {out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with only the wheel installed (no dependencies: those are found in the test's own environment,
    appended to the venv's path without its .pth files, so the checkout's editable install stays invisible)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # what a source distribution holds (setuptools builds in place: keep the checkout clean)
    for name in ("curation", "preference", "training"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src,
       cwd=tmp)
    wheel = next((tmp / "dist").glob("curate_prefs-*.whl"))
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    sh(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
       wheel)
    site = Path(sh(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def env_without_checkout() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_the_wheel_holds_every_package_and_no_script(installed):
    wheel = next(installed.parent.joinpath("dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("curation/cli.py", "preference/argilla_server.py", "preference/plumbing/processes.py",
                   "preference/plumbing/lock.py", "preference/plumbing/installer.py", "training/trainers.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith(("scripts/", "tests/"))]


def test_curate_argilla_works_from_the_installed_package(installed, tmp_path, argilla_server):
    env = env_without_checkout()
    where = sh(installed / "bin" / "python", "-c", "import preference, curation; print(preference.__file__); "
               "print(curation.__file__)", cwd=tmp_path, env=env).stdout.split()
    assert all(path.startswith(str(installed)) for path in where), where  # the wheel's code, not the checkout's
    curate = installed / "bin" / "curate"
    # the session's server, seen through the installed command: running and answering for the owner's key
    out = subprocess.run([curate, "argilla", "status", "--port", argilla_server.url.rsplit(":", 1)[-1],
                          "--data-dir", str(argilla_server.data_dir)], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "ARGILLA_API_KEY": argilla_server.api_key}, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["ready"] and info["server"]["running"] and info["noida"]["running"]
    # a folder with no server: not running, exit 1, no traceback
    empty = subprocess.run([curate, "argilla", "status", "--data-dir", str(tmp_path / "none"), "--port", "9"],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert empty.returncode == 1 and not json.loads(empty.stdout)["ready"] and "Traceback" not in empty.stderr
    help_ = sh(curate, "argilla", "--help", cwd=tmp_path, env=env).stdout
    assert "up" in help_ and "down" in help_ and "status" in help_
