"""One writer per project: real `curate` processes on one project — two started together, a reader beside the
writer, a SIGKILLed holder taken over; and the lock itself in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from round_fixture import ROOT, TINY

from preference.plumbing.errors import CurateError
from preference.plumbing.lock import EXIT_BUSY, LOCK_NAME, ProjectBusy, holder, project_lock


def start(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "curation.cli", *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)


def test_lock_in_process_names_its_holder_and_is_released(tmp_path):
    with project_lock(tmp_path, "curate round run -c x.yaml") as path:
        assert path == tmp_path / LOCK_NAME
        info = holder(path)
        assert info["command"] == "curate round run -c x.yaml" and info["pid"] == os.getpid() and info["since"]
    assert holder(tmp_path / LOCK_NAME) == {}  # released: nobody named
    with project_lock(tmp_path):  # and taken again
        pass
    assert issubclass(ProjectBusy, CurateError) and ProjectBusy.exit_code == EXIT_BUSY == 12


def test_two_writers_started_together_one_runs_one_exits_12_readers_never_wait_a_killed_holder_is_taken_over(
        tmp_path):
    project = tmp_path / "proj"
    args = ("round", "run", "-c", TINY, "--set", f"project={project}", "-q")
    a, b = start(*args), start(*args)  # as an hourly cron does when the last round is still running
    # the loser gives up at once; the winner runs its round (minutes of steps: vLLM generation, training)
    deadline = time.monotonic() + 120
    while a.poll() is None and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    out, err = loser.communicate(timeout=60)
    assert loser.returncode == EXIT_BUSY, (out, err)
    assert winner.poll() is None, "the winner should still be running its round"
    info = json.loads((project / LOCK_NAME).read_text())
    assert info["pid"] == winner.pid and info["command"].startswith("curate round run -c")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: project {project} is being written by `curate round run -c")
    assert f"(pid {winner.pid})" in lines[0] and f"since {info['since']}" in lines[0] and "one writer" in lines[0]
    # readers do not wait: status answers, report writes a snapshot, both exit 0 while the writer holds the lock
    status = run("status", "-c", TINY, "--set", f"project={project}")
    assert status.returncode == 0, status.stderr
    assert f"being written by `curate round run -c {TINY}" in status.stdout and f"(pid {winner.pid})" in status.stdout
    report = run("report", "-c", TINY, "--set", f"project={project}", "-q")
    assert report.returncode == 0, report.stderr
    assert "not waiting: a snapshot" in report.stdout
    assert (project / "snapshots" / "round-0001" / "report.html").is_file()
    assert not (project / "round-0001" / "report" / "manifest.json").exists()  # no step recorded meanwhile
    # other writers are refused too, with the same exit code
    gate = run("registry", "rollback", "-c", TINY, "--set", f"project={project}")
    assert gate.returncode == EXIT_BUSY and f"(pid {winner.pid})" in gate.stderr
    # SIGKILL the holder: no cleanup runs, its identity stays in the file, yet the next writer takes over at once
    os.kill(winner.pid, signal.SIGKILL)
    winner.communicate(timeout=60)
    assert json.loads((project / LOCK_NAME).read_text())["pid"] == winner.pid  # stale, as a killed process leaves it
    assert "being written by" not in run("status", "-c", TINY, "--set", f"project={project}").stdout  # it is gone
    again = run("pool", "-c", TINY, "--set", f"project={project}", "-q")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "round 1 pool: done" in again.stdout
    assert (project / LOCK_NAME).read_text() == ""  # released by its new holder


def test_registry_outside_the_project_is_locked_too(tmp_path):
    """`gate.registry` shared by two projects: a registry writer of one blocks the other's."""
    from curation.cli import writer
    from curation.config import load_config
    from preference.plumbing.config import replace_path

    shared = tmp_path / "shared-registry"
    one = replace_path(replace_path(load_config(TINY), "project", str(tmp_path / "one")), "gate.registry", str(shared))
    two = replace_path(one, "project", str(tmp_path / "two"))
    with writer(one, registry=True):
        with writer(two):  # the other project's steps that leave the registry alone are free
            pass
        with pytest.raises(ProjectBusy, match=rf"registry {shared} is being written by"), writer(two, registry=True):
            pass
    assert Path(shared / LOCK_NAME).read_text() == ""


def test_argilla_data_folder_has_one_writer(tmp_path, capsys):
    """`curate argilla up|down` hold the server's data folder: a second one meanwhile exits 12 naming the first."""
    from preference import argilla_server

    data = tmp_path / "argilla-data"
    with project_lock(data, "curate argilla up"):
        code = argilla_server.main(["up", "--data-dir", str(data), "--venv", str(tmp_path / "venv")])
        assert code == EXIT_BUSY
        err = capsys.readouterr().err
        assert f"error: Argilla data folder {data} is being written by `curate argilla up` (pid {os.getpid()})" in err
        assert argilla_server.main(["down", "--data-dir", str(data)]) == EXIT_BUSY
    assert argilla_server.main(["down", "--data-dir", str(data)]) == 0  # free again: nothing was running


def test_bootstrap_waits_for_no_one_while_another_writer_holds_the_project(tmp_path):
    """`curate bootstrap` writes round 0 and the registry: with the project held it exits 12 and writes nothing."""
    project = tmp_path / "p"
    with project_lock(project, "curate round run -c other.yaml"):
        out = run("bootstrap", "-c", TINY, "--set", f"project={project}")
    assert out.returncode == EXIT_BUSY and "curate round run -c other.yaml" in out.stderr + out.stdout, out.stderr
    assert not (project / "round-0000").exists()
