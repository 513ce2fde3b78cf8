"""pytest plugin: a real local Argilla server for the session, plus annotator helpers.

`argilla_server` starts noida + Argilla (preference/argilla_server.py) on free loopback ports with a temporary data
dir, and stops both by pid at the end of the session. The server's venv is the shared one
(`$CURATE_ARGILLA_VENV` or `$CURATE_CACHE/argilla-server-venv`), installed on first use (1-2 min).

If the server cannot start, the tests are skipped locally, but FAIL in CI (`CI` set to true/1), so a broken
install never passes silently.

The root conftest registers this module (`pytest_plugins`), so every test module shares ONE server: a test
names `argilla_server` and imports nothing (importing the fixture into a module would start a server per module).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_server_module():
    """The local server manager (`curate argilla up|down|status`)."""
    from preference import argilla_server

    return argilla_server


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@dataclass
class ArgillaTestServer:
    url: str
    api_key: str
    workspace: str
    data_dir: Path | None = None  # the server's data folder (pid files, logs, SQLite)

    def _owner(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-Argilla-Api-Key": self.api_key}, timeout=30)

    def annotator(self, username: str) -> str:
        """Create (or find) annotator `username` in the workspace; return its API key (owner reads it)."""
        with self._owner() as owner:
            users = {u["username"]: u for u in owner.get("/api/v1/users").raise_for_status().json()["items"]}
            user = users.get(username)
            if user is None:
                user = owner.post("/api/v1/users", json={"first_name": username, "username": username,
                                                         "password": f"{username}-password", "role": "annotator"})
                user = user.raise_for_status().json()
            workspaces = owner.get("/api/v1/me/workspaces").raise_for_status().json()["items"]
            ws_id = next(w["id"] for w in workspaces if w["name"] == self.workspace)
            members = owner.get(f"/api/v1/workspaces/{ws_id}/users").raise_for_status().json()["items"]
            if user["id"] not in {m["id"] for m in members}:
                owner.post(f"/api/v1/workspaces/{ws_id}/users", json={"user_id": user["id"]}).raise_for_status()
            return owner.get(f"/api/v1/users/{user['id']}").raise_for_status().json()["api_key"]

    def records(self, dataset_id: str) -> list[dict]:
        with self._owner() as owner:
            resp = owner.get(f"/api/v1/datasets/{dataset_id}/records",
                             params=[("include", "responses"), ("include", "suggestions"), ("include", "vectors"),
                                     ("limit", 1000)])
            return resp.raise_for_status().json()["items"]

    def submit(self, annotator_key: str, record_server_id: str, values: dict, status: str = "submitted") -> dict:
        """Answer a record as the web UI does: POST /api/v1/records/{id}/responses with the annotator's key."""
        body = {"status": status, "values": {k: {"value": v} for k, v in values.items()}}
        with httpx.Client(base_url=self.url, headers={"X-Argilla-Api-Key": annotator_key}, timeout=30) as client:
            return client.post(f"/api/v1/records/{record_server_id}/responses", json=body).raise_for_status().json()


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory) -> ArgillaTestServer:
    mod = load_server_module()
    cfg = mod.ServerConfig(data_dir=tmp_path_factory.mktemp("argilla-server"), port=mod.free_port(),
                           api_key="curate.test.owner.apikey", password="curate-test-password")
    try:
        mod.up(cfg, echo=lambda msg: print(f"[argilla-server] {msg}", file=sys.stderr))
    except (mod.ServerError, OSError) as exc:
        mod.down(cfg, echo=lambda *_: None)
        message = f"local Argilla server did not start: {exc}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield ArgillaTestServer(url=cfg.url, api_key=cfg.api_key, workspace=cfg.workspace, data_dir=cfg.data_dir)
    finally:
        mod.down(cfg, echo=lambda *_: None)
