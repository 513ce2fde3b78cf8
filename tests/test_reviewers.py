"""`curate reviewers add|list|remove` on the session's real Argilla server, their one-line errors (nothing
half-created), and a pull that waits for reviewers: exit 11 and a "waiting" step in `curate status`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_argilla_e2e import KEY_ENV, make_round

from preference.argilla import ArgillaClient, ArgillaError
from preference.argilla_reviewers import add_reviewer, remove_reviewer, reviewer_progress
from preference.plumbing.errors import CurateError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.argilla, pytest.mark.xdist_group("argilla")]


def exists(client: ArgillaClient, name: str) -> bool:
    return name in set(client.users().values())


def test_add_list_remove_and_their_errors(argilla_server, monkeypatch):
    ws = argilla_server.workspace
    with ArgillaClient(argilla_server.url, argilla_server.api_key) as owner:
        change = add_reviewer(owner, "rev-a", ws, password="rev-a-password")
        assert change.created and change.role == "annotator"
        rows = {r["reviewer"]: r for r in reviewer_progress(owner, ws)}
        assert rows["rev-a"]["role"] == "annotator" and rows["rev-a"]["pending"] == 0  # no dataset given

        # a duplicate, a bad name, a missing or short password, a missing workspace: one line each, nothing made
        with pytest.raises(CurateError, match="'rev-a' is already in workspace"):
            add_reviewer(owner, "rev-a", ws, password="rev-a-password")
        with pytest.raises(CurateError, match="reviewer name 'Rev A' is not usable"):
            add_reviewer(owner, "Rev A", ws, password="whatever-password")
        with pytest.raises(CurateError, match="needs a password of 8-100 characters .got 3 characters"):
            add_reviewer(owner, "rev-b", ws, password="abc")
        with pytest.raises(CurateError, match="workspace 'no-such-workspace' does not exist"):
            add_reviewer(owner, "rev-c", "no-such-workspace", password="rev-c-password")
        assert not exists(owner, "rev-b") and not exists(owner, "rev-c")

        # a key without rights (an annotator's) is refused before anything is written
        key = owner.rest("GET", f"/api/v1/users/{owner.sdk.users(username='rev-a').id}")["api_key"]
        with ArgillaClient(argilla_server.url, key) as annotator, pytest.raises(
                ArgillaError, match=r"belongs to 'rev-a' \(role annotator\).*only owners"):
            add_reviewer(annotator, "rev-d", ws, password="rev-d-password")
        assert not exists(owner, "rev-d")

        # the membership fails after the account was created: the account is taken back
        import argilla as rg

        def refuse(self, workspace):
            raise ArgillaError("Argilla add to workspace → HTTP 500: boom")

        monkeypatch.setattr(rg.User, "add_to_workspace", refuse)
        with pytest.raises(ArgillaError, match="boom"):
            add_reviewer(owner, "rev-e", ws, password="rev-e-password")
        assert not exists(owner, "rev-e")
        monkeypatch.undo()

        # remove ends the membership only; adding the account again reuses it (no password asked)
        remove_reviewer(owner, "rev-a", ws)
        assert "rev-a" not in {r["reviewer"] for r in reviewer_progress(owner, ws)} and exists(owner, "rev-a")
        with pytest.raises(CurateError, match="'rev-a' is not a reviewer in workspace"):
            remove_reviewer(owner, "rev-a", ws)
        again = add_reviewer(owner, "rev-a", ws, password=lambda: pytest.fail("asked for a password"))
        assert not again.created and "password unchanged" in again.notes[0]


def test_waiting_pull_exits_11_and_status_says_who_is_pending(argilla_server, tmp_path):
    root = tmp_path / "waitproj"
    make_round(root)  # pool, generate, score and select of 6 prompts (5 pushable)
    config = tmp_path / "wait.yaml"
    config.write_text(yaml.safe_dump({"project": str(root), "annotation": {
        "backend": "argilla", "completions_per_record": 3,
        "argilla": {"url": argilla_server.url, "url_env": "CURATE_TEST_NO_URL", "api_key_env": KEY_ENV,
                    "min_submitted": 2, "retries": 1, "backoff_s": 0.05}}}))
    env = {**os.environ, KEY_ENV: argilla_server.api_key}

    def curate(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args), "-c", config], cwd=ROOT,
                              capture_output=True, text=True, env=env, input=stdin)

    push = curate("push", "-q")
    assert push.returncode == 0, push.stderr
    assert "annotation-mode?sort=metadata.queue.asc" in push.stdout
    added = curate("reviewers", "add", "wait-rev", "--password-stdin", stdin="wait-rev-password\n")
    assert added.returncode == 0, added.stderr
    pull = curate("pull", "-q")
    assert pull.returncode == 11, pull.stderr
    assert "waiting for reviewers" in pull.stderr and "0 submitted responses are in" in pull.stderr
    assert "wait-rev 0/5" in pull.stderr  # the new reviewer has every record pending
    status = curate("status")
    assert status.returncode == 0
    line = next(x for x in status.stdout.splitlines() if " pull " in x)
    assert "waiting" in line and "failed" not in status.stdout
    assert "round 1 waits for reviewers" in status.stdout and "wait-rev 0/5" in status.stdout
