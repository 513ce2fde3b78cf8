"""Reviewers on an Argilla server: the people a team brings (`curate reviewers add|list|remove`) and simulated
reviewers who answer through the real server, as people do in the web UI.

People (`add_reviewer`, `remove_reviewer`, `reviewer_progress`): an Argilla user (SDK `rg.User`) that is a member of
the project's workspace (SDK `Workspace.add_user` / `User.remove_from_workspace`). Adding checks everything it can
before writing (the name, the password's length, the workspace, the key's role), reuses an existing account (added
to the workspace, never recreated; its password and role are left alone), and deletes an account it created when
the membership that follows fails, so nothing is left half-created. Removing ends the membership only: the account
and every answer it gave stay (deleting an Argilla user deletes its answers). Passwords are passed in memory to
the SDK and never written or printed.

Simulated reviewers:

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

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from preference.argilla import ArgillaClient, ArgillaError
from preference.plumbing.errors import CurateError
from preference.questions import Harm, Layout, Question, Ranking, write_response
from preference.schema import AnnotationRecord, Response
from preference.simulated import SimulatedAnnotator

BULK = 100  # the server's maximum responses per bulk request
ROLES = ("annotator", "admin")  # what `curate reviewers add --role` may give (owners are made in Argilla itself)
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")  # conservative: what Argilla's UI, URLs and our files all accept
PASSWORD_LENGTH = (8, 100)  # the server's limits


# ---------------------------------------------------------------------------------------------------------------
# people


@dataclass
class ReviewerChange:
    """What `add_reviewer` / `remove_reviewer` did."""

    username: str
    workspace: str
    created: bool = False  # a new account (False: an existing one was added / removed)
    role: str = ""
    notes: list[str] = field(default_factory=list)


def check_name(username: str) -> str:
    if not NAME.match(username or ""):
        raise CurateError(
            f"reviewer name {username!r} is not usable: use 1-100 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. alice or j.doe)")
    return username


def _owner(client: ArgillaClient, what: str) -> None:
    """Refuse early (before anything is written) when the key's user is not an owner: only owners may create users
    and workspace memberships in Argilla 2.x."""
    me = client.call("GET /api/v1/me", lambda: client.sdk.me)
    role = str(getattr(me.role, "value", me.role))
    if role != "owner":
        raise ArgillaError(
            f"cannot {what}: the API key in ${client.key_env} belongs to {me.username!r} (role {role}) on "
            f"{client.url}, and Argilla lets only owners manage users and workspace members; use an owner's key "
            f"(Argilla UI → My settings, signed in as an owner)", status=403)


def _workspace(client: ArgillaClient, name: str):
    ws = client.call("GET /api/v1/me/workspaces", lambda: client.sdk.workspaces(name))
    if ws is None:
        raise ArgillaError(
            f"Argilla workspace {name!r} does not exist on {client.url}: `curate push` creates it with the round's "
            "dataset (or create it in Argilla), or set annotation.argilla.workspace to the workspace your datasets "
            "are in", status=404)
    return ws


def _members(client: ArgillaClient, ws) -> dict:
    return {u.username: u for u in client.call("GET workspace users", lambda: list(ws.users))}


def add_reviewer(client: ArgillaClient, username: str, workspace: str, *, role: str = "annotator",
                 password: str | Callable[[], str] | None = None) -> ReviewerChange:
    """Give `username` access to `workspace`: create the account (`password` required; a callable is asked only
    then, e.g. a hidden prompt) or reuse an existing one."""
    import argilla as rg

    check_name(username)
    if role not in ROLES:
        raise CurateError(f"--role {role!r}: a reviewer is one of {', '.join(ROLES)} (owners are made in Argilla)")
    _owner(client, f"add reviewer {username!r}")
    ws = _workspace(client, workspace)
    if username in _members(client, ws):
        raise CurateError(f"reviewer {username!r} is already in workspace {workspace!r} on {client.url}; nothing to "
                          "do (`curate reviewers list` shows everyone; `remove` ends a membership)")
    user = client.call(f"GET user {username!r}", lambda: client.sdk.users(username=username))
    change = ReviewerChange(username, workspace)
    if user is None:
        lo, hi = PASSWORD_LENGTH
        if callable(password):
            password = password()
        if password is None or not lo <= len(password) <= hi:
            raise CurateError(f"a new reviewer needs a password of {lo}-{hi} characters (got "
                              f"{'none' if password is None else f'{len(password)} characters'}); type it at the "
                              "prompt or pipe it with --password-stdin")
        user = client.call(f"create user {username!r}", lambda: rg.User(
            username=username, first_name=username, password=password, role=role, client=client.sdk).create())
        change.created = True
    else:
        change.notes.append(f"{username!r} already has an account on {client.url}: added to the workspace as it is "
                            f"(role {getattr(user.role, 'value', user.role)}, password unchanged)")
    change.role = str(getattr(user.role, "value", user.role))
    try:
        client.call(f"add {username!r} to workspace {workspace!r}", lambda: user.add_to_workspace(ws))
    except CurateError:
        if change.created:  # nothing half-created: an account without the workspace is taken back
            client.call(f"delete user {username!r}", user.delete)
        raise
    return change


def remove_reviewer(client: ArgillaClient, username: str, workspace: str) -> ReviewerChange:
    """End `username`'s membership of `workspace`; the account and its answers stay."""
    check_name(username)
    _owner(client, f"remove reviewer {username!r}")
    ws = _workspace(client, workspace)
    user = _members(client, ws).get(username)
    if user is None:
        raise CurateError(f"{username!r} is not a reviewer in workspace {workspace!r} on {client.url} "
                          "(`curate reviewers list` shows who is)")
    client.call(f"remove {username!r} from workspace {workspace!r}", lambda: user.remove_from_workspace(ws))
    return ReviewerChange(username, workspace, role=str(getattr(user.role, "value", user.role)),
                          notes=["the account and its answers are kept (delete the account in Argilla if needed)"])


def reviewer_progress(client: ArgillaClient, workspace: str, dataset_id: str | None = None) -> list[dict]:
    """Per member of `workspace`: role and, for dataset `dataset_id`, answers (submitted / draft / discarded) and
    pending records (records that still need answers and that this member has neither submitted nor discarded)."""
    ws = _workspace(client, workspace)
    members = _members(client, ws)
    records = client.list_records(dataset_id) if dataset_id else []
    rows = []
    for name, user in sorted(members.items()):
        uid = str(user.id)
        row = {"reviewer": name, "role": str(getattr(user.role, "value", user.role)),
               "submitted": 0, "draft": 0, "discarded": 0, "pending": 0}
        for rec in records:
            mine = [r for r in rec.get("responses") or [] if str(r.get("user_id")) == uid]
            for resp in mine:
                row[resp["status"]] = row.get(resp["status"], 0) + 1
            if rec.get("status") != "completed" and not any(r["status"] in ("submitted", "discarded") for r in mine):
                row["pending"] += 1
        rows.append(row)
    return rows


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


__all__ = ["ReviewerChange", "add_reviewer", "check_name", "ensure_annotator", "remove_reviewer", "reviewer_progress",
           "submit_responses", "submit_simulated"]
