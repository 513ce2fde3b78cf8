"""Simulated reviewers who answer through a real Argilla server, as people do in the web UI.

For unattended demos, end-to-end tests and load tests of the Argilla path: each simulated annotator ("sim-0", ...)
becomes an Argilla user with the annotator role in the dataset's workspace (created with the SDK), and its answers
(from `SimulatedAnnotator`, through the question table) are submitted with that user's own API key — the same
requests the web UI's bulk mode sends, so push → review → pull is exercised exactly as with humans. Records a user
already answered are skipped, so this can run repeatedly; several annotators can answer concurrently.

Raw REST here, because the SDK cannot: its user model carries no API key (the owner reads it with
`GET /api/v1/users/{id}`), and it has no call to answer *as* another user (annotators may not use the owner's
bulk record upsert, `dataset.records.log`); annotators answer with `POST /api/v1/me/responses/bulk`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from preference.argilla import ArgillaClient, ArgillaError
from preference.questions import Harm, Layout, Question, Ranking, write_response
from preference.schema import AnnotationRecord, Response
from preference.simulated import SimulatedAnnotator

BULK = 100  # the server's maximum responses per bulk request


def ensure_annotator(client: ArgillaClient, username: str, workspace: str) -> tuple[str, str]:
    """Find or create annotator `username` (SDK), add it to the workspace; return (user id, its API key)."""
    import argilla as rg

    sdk = client.sdk
    ws = client.workspace(workspace)
    user = client.call(f"GET user {username!r}", lambda: sdk.users(username=username))
    if user is None:
        user = client.call(f"create user {username!r}", lambda: rg.User(
            username=username, first_name=username, password=f"{username}-simulated", role="annotator",
            client=sdk).create())
    members = {u.username for u in client.call("GET workspace users", lambda: list(ws.users))}
    if username not in members:
        client.call(f"add {username!r} to workspace", lambda: user.add_to_workspace(ws))
    # raw: the SDK's user model has no api_key; an owner reads it here
    return str(user.id), client.rest("GET", f"/api/v1/users/{user.id}")["api_key"]


def submit_responses(client: ArgillaClient, dataset_id: str, workspace: str, records: Sequence[AnnotationRecord],
                     responses: Sequence[Response], *, questions: Sequence[Question], layout: Layout,
                     concurrency: int = 1, progress: bool = False) -> dict[str, int]:
    """Submit `responses` (our `Response`s, one per record and annotator) as their annotators; skip answered ones."""
    from tqdm.auto import tqdm

    raw = {r["external_id"]: r for r in client.list_records(dataset_id)}
    slots = {r.record_id: [c.id for c in r.completions] for r in records}
    by_annotator: dict[str, list[Response]] = {}
    for resp in responses:
        if resp.record_id in raw and resp.record_id in slots:
            by_annotator.setdefault(resp.annotator, []).append(resp)
    keys = {name: ensure_annotator(client, name, workspace) for name in sorted(by_annotator)}
    bar = tqdm(total=sum(map(len, by_annotator.values())), desc="simulated reviewers", unit="answer",
               disable=not progress)

    def answer(name: str) -> tuple[int, int]:
        user_id, api_key = keys[name]
        todo, skipped = [], 0
        for resp in by_annotator[name]:
            rec = raw[resp.record_id]
            if any(r.get("user_id") == user_id for r in rec.get("responses") or []):
                skipped += 1
                continue
            values = write_response(questions, resp, slots[resp.record_id], layout) if resp.status != "discarded" \
                else None
            todo.append({"record_id": rec["id"], "status": resp.status, "values": values})
        for start in range(0, len(todo), BULK):
            chunk = todo[start : start + BULK]
            # raw: answering as the annotator (its own key), as the web UI's bulk mode does
            out = client.rest("POST", "/api/v1/me/responses/bulk", json_body={"items": chunk}, api_key=api_key)
            errors = [i["error"]["detail"] for i in out["items"] if i.get("error")]
            if errors:
                raise ArgillaError(f"simulated reviewer {name}: the server refused {len(errors)} of {len(chunk)} "
                                   f"answers (first: {errors[0][:300]}); the dataset's questions may not match the "
                                   "config: push again or rerun with the config the dataset was made with")
            bar.update(len(chunk))
        bar.update(skipped)
        return len(todo), skipped

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(answer, sorted(by_annotator)))
    bar.close()
    return {"simulated_submitted": sum(r[0] for r in results), "simulated_skipped": sum(r[1] for r in results)}


def submit_simulated(client: ArgillaClient, dataset_id: str, workspace: str, records: list[AnnotationRecord],
                     annotator: SimulatedAnnotator, *, k: int, questions: Sequence[Question] | None = None,
                     layout: Layout | None = None, concurrency: int = 1, progress: bool = False) -> dict[str, int]:
    """Have every simulated annotator answer every record it has not answered yet. Returns counts."""
    qs = list(questions) if questions is not None else [Ranking(), Harm()]
    layout = layout or Layout(slots=k)
    responses = annotator.annotate(records, questions=qs)
    return submit_responses(client, dataset_id, workspace, records, responses, questions=qs, layout=layout,
                            concurrency=concurrency, progress=progress)


__all__ = ["ensure_annotator", "submit_responses", "submit_simulated"]
