"""Simulated reviewers who answer through a real Argilla server, as people do in the web UI.

For unattended demos and end-to-end tests of the Argilla path: each simulated annotator ("sim-0", ...) becomes an
Argilla user with the annotator role in the dataset's workspace, and its answers (from `SimulatedAnnotator`) are
submitted with that user's own API key over `POST /api/v1/records/{id}/responses` — the same requests the web
UI sends, so push → review → pull is exercised exactly as with humans. Records a user already answered are
skipped, so this can run repeatedly.
"""

from __future__ import annotations

import httpx

from preference.argilla import NONE_LABEL, ArgillaClient, ArgillaError, slot
from preference.schema import AnnotationRecord, Response
from preference.simulated import SimulatedAnnotator


def ensure_annotator(client: ArgillaClient, username: str, workspace_id: str) -> tuple[str, str]:
    """Find or create annotator `username`, add it to the workspace; return (user id, its API key)."""
    users = {u["username"]: u for u in client.get("/api/v1/users")["items"]}
    user = users.get(username)
    if user is None:
        user = client.request("POST", "/api/v1/users", json_body={
            "first_name": username, "username": username, "password": f"{username}-simulated", "role": "annotator",
        })
    members = client.get(f"/api/v1/workspaces/{workspace_id}/users")["items"]
    if user["id"] not in {m["id"] for m in members}:
        client.request("POST", f"/api/v1/workspaces/{workspace_id}/users", json_body={"user_id": user["id"]})
    return user["id"], client.get(f"/api/v1/users/{user['id']}")["api_key"]


def response_values(response: Response, completion_ids: list[str], k: int) -> dict:
    """A `Response` as Argilla response values for a record whose slots hold `completion_ids` (k slots)."""
    slot_of = {cid: slot(i) for i, cid in enumerate(completion_ids, 1)}
    ranked = sorted(response.ranks.items(), key=lambda kv: kv[1])
    ranking = [{"value": slot_of[cid], "rank": rank} for cid, rank in ranked if cid in slot_of]
    worst = max((r["rank"] for r in ranking), default=0)
    ranking += [{"value": slot(i), "rank": worst + 1} for i in range(len(completion_ids) + 1, k + 1)]  # empty slots
    values = {"ranking": {"value": ranking}}
    for i, cid in enumerate(completion_ids, 1):
        values[f"harm_{i}"] = {"value": response.harm.get(cid) or [NONE_LABEL]}
    if response.correction:
        values["correction"] = {"value": response.correction}
    return values


def submit_simulated(
    client: ArgillaClient,
    dataset_id: str,
    workspace_id: str,
    records: list[AnnotationRecord],
    annotator: SimulatedAnnotator,
    *,
    k: int,
    progress: bool = False,
) -> dict[str, int]:
    """Have every simulated annotator answer every record it has not answered yet. Returns counts."""
    raw = {r["external_id"]: r for r in client.list_records(dataset_id, include=("responses",))}
    responses = annotator.annotate([r for r in records if r.record_id in raw])
    keys: dict[str, tuple[str, str]] = {}
    submitted = skipped = 0
    from tqdm.auto import tqdm

    for resp in tqdm(responses, desc="simulated reviewers", unit="answer", disable=not progress):
        if resp.annotator not in keys:
            keys[resp.annotator] = ensure_annotator(client, resp.annotator, workspace_id)
        user_id, api_key = keys[resp.annotator]
        rec = raw[resp.record_id]
        if any(r.get("user_id") == user_id for r in rec.get("responses") or []):
            skipped += 1
            continue
        completion_ids = [c.id for c in next(r for r in records if r.record_id == resp.record_id).completions]
        body = {"status": resp.status}
        body["values"] = response_values(resp, completion_ids, k) if resp.status == "submitted" else {}
        with httpx.Client(base_url=client.url, headers={"X-Argilla-Api-Key": api_key}, timeout=30) as http:
            out = http.post(f"/api/v1/records/{rec['id']}/responses", json=body)
        if out.status_code >= 400:
            raise ArgillaError(f"simulated reviewer {resp.annotator}: POST /api/v1/records/{rec['id']}/responses "
                               f"→ {out.status_code}: {out.text[:300]}", status=out.status_code)
        submitted += 1
    return {"simulated_submitted": submitted, "simulated_skipped": skipped}
