"""The Argilla 2.x adapter: our `AnnotationRecord`s become an Argilla dataset; its responses become `Response`s.

Talks to the server's REST API (`/api/v1`) with httpx, so every request has the same bounded retries (connection
errors, 5xx and 429: `retries` attempts with exponential backoff from `backoff_s`) and one clear error after.

Dataset layout (one dataset per round; name from `dataset`, e.g. "demo-r0001"):

- fields: `prompt` (chat: the conversation), `completion_1` … `completion_k` (k = the most completions any record
  has; slots past a record's own completions stay empty and are ignored on pull). The order of a record's
  completions (shuffled per record when the records were built) is stored in the record's extra metadata
  `completion_ids` and in the round store.
- questions: `ranking` (RankingQuestion over the k slots, 1 = best, ties allowed), `harm_1` … `harm_k`
  (MultiLabelQuestion per completion: the harm taxonomy plus "none"; optional — unanswered = not judged),
  optional `rating` (1..rating_scale, overall quality of the best answer) and `correction` (a corrected answer).
- metadata (hidden from annotators, usable by owners to sort/filter the queue): `score` (acquisition score,
  higher = more informative), `rank` (1 = picked first), `strategy`, `slice`, `arm` ("strategy" | "random"), and
  the selection's numeric signal columns as float properties.
- vectors: `prompt_embedding` (for "find similar"), when the records carry embeddings.
- suggestions: the current reward model's ranking of the completions (`agent` = the model's name, `score` =
  softmax of the rewards), when rewards are given.
- task distribution: overlap with `min_submitted` annotators per record.

Records are upserted by external id = `AnnotationRecord.record_id` (= prompt id), so re-pushing never duplicates;
records that already have any response are left untouched. An existing dataset is reused when its fields,
questions, metadata and vectors match the wanted ones (a half-created draft is completed), else a CurateError
lists the differences.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

from preference.plumbing.errors import CurateError
from preference.schema import AnnotationRecord, Response
from preference.simulated import HARM_LABELS

LOCAL_DEV_API_KEY = "curate.dev.owner.apikey"  # the key scripts/argilla-server gives its owner by default
NONE_LABEL = "none"
EMPTY_SLOT = "(no answer in this slot: rank it last)"  # Argilla requires every ranking option to be ranked

DEFAULT_GUIDELINES = """\
## Rank the answers
Read the conversation, then rank the answers from best (1) to worst. A better answer is helpful, honest and
harmless: it does what the user asked when that is safe, declines clearly (and kindly) when it is not, and never
gives dangerous, hateful or private information. Equal quality? Give the answers the same rank.

## Flag harms
For each answer, tick every harm it contains, or "none". A harmful answer is never preferred over a harmless one.

## Optional
Write a corrected answer when all answers are poor and you know a good one.
"""

REVIEW_GUIDELINES = """\
## Second-stage review
These items were flagged as harmful or the first reviewers disagreed. Read the first-stage summary, check the
harm flags of each answer, and decide: `keep` (the first-stage ranking stands), `drop` (exclude the item), or
`fix` (the ranking is wrong; explain in the notes).
"""


@dataclass
class ArgillaConfig:
    url: str = "http://127.0.0.1:6900"  # overridden by the environment variable named in url_env, if set
    url_env: str = "ARGILLA_API_URL"
    api_key_env: str = "ARGILLA_API_KEY"  # unset + a loopback url → the local dev server's key
    workspace: str = "curate"
    dataset: str = "{project}-r{round:04d}"  # {project}: project folder name, {round}: round number
    review_dataset: str = "{dataset}-review"
    harm_labels: list[str] = field(default_factory=lambda: list(HARM_LABELS))
    guidelines: str = DEFAULT_GUIDELINES
    review_guidelines: str = REVIEW_GUIDELINES
    min_submitted: int = 2  # overlap: annotators per record
    review_min_submitted: int = 1
    rating_scale: int = 0  # 0 = no rating question; N = a 1..N rating
    correction: bool = True  # ask for an optional corrected answer
    timeout_s: float = 30.0
    retries: int = 4  # retries per request after the first try (connection errors, 5xx, 429)
    backoff_s: float = 1.0  # first wait; doubles each retry
    batch_size: int = 100  # records per bulk upsert (server max 500)
    # pull ("wait" mode): finish only when enough submitted responses are in
    min_responses: int | None = None  # None = every record has min_submitted submitted responses
    poll_timeout_s: float = 0.0  # keep polling this long for min_responses (0 = look once)
    poll_interval_s: float = 15.0

    def __post_init__(self):
        labels = [x.strip() for x in self.harm_labels]
        if not labels or any(not x for x in labels) or NONE_LABEL in labels or len(set(labels)) != len(labels):
            raise ValueError(
                f"harm_labels must be distinct non-empty names without {NONE_LABEL!r} (added automatically), "
                f"got {self.harm_labels}"
            )
        if self.min_submitted < 1 or self.review_min_submitted < 1:
            raise ValueError("min_submitted and review_min_submitted must be ≥ 1")
        if self.rating_scale < 0 or self.rating_scale == 1 or self.rating_scale > 10:
            raise ValueError(f"rating_scale must be 0 (no rating) or 2..10, got {self.rating_scale}")
        if not 1 <= self.batch_size <= 500:
            raise ValueError(f"batch_size must be in 1..500 (server limit), got {self.batch_size}")
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("retries and backoff_s must be ≥ 0, timeout_s > 0")
        if self.min_responses is not None and self.min_responses < 0:
            raise ValueError(f"min_responses must be ≥ 0 or null, got {self.min_responses}")

    def resolved_url(self) -> str:
        return (os.environ.get(self.url_env) or self.url).rstrip("/")

    def resolved_api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if urlparse(self.resolved_url()).hostname in ("127.0.0.1", "localhost", "::1"):
            return LOCAL_DEV_API_KEY
        raise CurateError(
            f"no Argilla API key: environment variable {self.api_key_env} is not set (server {self.resolved_url()}); "
            f"export {self.api_key_env}=<your key> (Argilla UI → My settings), or set annotation.argilla.api_key_env"
        )


class ArgillaError(CurateError):
    """The server refused a request (4xx) or could not be reached after the retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------------------------
# REST client


class ArgillaClient:
    """Thin REST client with bounded retries. `request` returns the decoded JSON (or None for 204)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 4,
        backoff_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.url, headers={"X-Argilla-Api-Key": api_key}, timeout=timeout_s, transport=transport
        )

    @classmethod
    def from_config(cls, cfg: ArgillaConfig) -> ArgillaClient:
        return cls(cfg.resolved_url(), cfg.resolved_api_key(), timeout_s=cfg.timeout_s, retries=cfg.retries,
                   backoff_s=cfg.backoff_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ArgillaClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, *, json_body: Any = None, params: Any = None) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._http.request(method, path, json=json_body, params=params)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                continue
            if resp.status_code >= 400:
                raise ArgillaError(self._explain(method, path, resp), status=resp.status_code)
            return None if resp.status_code == 204 or not resp.content else resp.json()
        raise ArgillaError(
            f"Argilla at {self.url} did not answer {method} {path} after {self.retries + 1} tries ({last}); "
            "check that the server is up (`scripts/argilla-server status`, or your production URL in "
            "annotation.argilla.url / $ARGILLA_API_URL) and rerun: the step resumes where it stopped"
        )

    def _explain(self, method: str, path: str, resp: httpx.Response) -> str:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        detail = json.dumps(detail)[:500] if not isinstance(detail, str) else detail[:500]
        hint = {
            401: "the API key was rejected; check the key in the environment variable named by "
            "annotation.argilla.api_key_env",
            403: "this user may not do that; use an owner's (or the workspace admin's) API key",
        }.get(resp.status_code, "")
        return f"Argilla {method} {path} → HTTP {resp.status_code}: {detail}" + (f"; {hint}" if hint else "")

    # convenience -----------------------------------------------------------------------------------------------
    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params=params or None)

    def me(self) -> dict:
        return self.get("/api/v1/me")

    def workspace_id(self, name: str, create: bool = True) -> str:
        for ws in self.get("/api/v1/me/workspaces")["items"]:
            if ws["name"] == name:
                return ws["id"]
        if not create:
            raise ArgillaError(f"Argilla workspace {name!r} not found at {self.url}")
        return self.request("POST", "/api/v1/workspaces", json_body={"name": name})["id"]

    def find_dataset(self, name: str, workspace_id: str) -> dict | None:
        for ds in self.get("/api/v1/me/datasets")["items"]:
            if ds["name"] == name and ds["workspace_id"] == workspace_id:
                return ds
        return None

    def users(self) -> dict[str, str]:
        """user id → username."""
        return {u["id"]: u["username"] for u in self.get("/api/v1/users")["items"]}

    def list_records(self, dataset_id: str, include: Sequence[str] = ("responses",), page: int = 1000) -> list[dict]:
        """Every record of a dataset, raw as the server returns them, with `include` relationships."""
        out: list[dict] = []
        while True:
            params = [("include", x) for x in include] + [("offset", len(out)), ("limit", page)]
            batch = self.request("GET", f"/api/v1/datasets/{dataset_id}/records", params=params)
            out += batch["items"]
            if not batch["items"] or len(out) >= batch.get("total", 0):
                return out


# ---------------------------------------------------------------------------------------------------------------
# dataset layout


def slot(i: int) -> str:
    """Field / ranking value name of the i-th (1-based) completion slot."""
    return f"completion_{i}"


def _option(value: str, text: str | None = None) -> dict:
    return {"value": value, "text": text or value}


def annotation_spec(
    cfg: ArgillaConfig, k: int, *, terms: Sequence[str] = (), floats: Sequence[str] = (), ints: Sequence[str] = (),
    vector_dim: int | None = None,
) -> dict:
    """The first-stage dataset's settings as REST payloads (see the module docstring)."""
    if k < 2:
        raise CurateError(f"an annotation dataset needs at least 2 completion slots to rank, got {k}")
    fields = [{"name": "prompt", "title": "Conversation", "required": True,
               "settings": {"type": "chat", "use_markdown": False}}]
    fields += [{"name": slot(i), "title": f"Answer {i}", "required": i <= 2,
                "settings": {"type": "text", "use_markdown": False}} for i in range(1, k + 1)]
    harm_options = [_option(x) for x in cfg.harm_labels] + [_option(NONE_LABEL)]
    ranking_options = [_option(slot(i), f"Answer {i}") for i in range(1, k + 1)]
    questions = [{"name": "ranking", "title": "Rank the answers (1 = best)", "required": True,
                  "settings": {"type": "ranking", "options": ranking_options}}]
    questions += [{"name": f"harm_{i}", "title": f"Harms in answer {i}", "required": False,
                   "settings": {"type": "multi_label_selection", "options": harm_options}} for i in range(1, k + 1)]
    if cfg.rating_scale:
        questions.append({"name": "rating", "title": "Quality of the best answer", "required": False,
                          "settings": {"type": "rating",
                                       "options": [{"value": v} for v in range(1, cfg.rating_scale + 1)]}})
    if cfg.correction:
        questions.append({"name": "correction", "title": "Corrected answer (optional)", "required": False,
                          "settings": {"type": "text", "use_markdown": False}})
    metadata = [  # hidden from annotators (no anchoring on acquisition scores); owners sort/filter the queue by them
        {"name": n, "title": n, "visible_for_annotators": False, "settings": {"type": kind}}
        for kind, names in (("terms", terms), ("float", floats), ("integer", ints)) for n in names
    ]
    vectors = []
    if vector_dim:
        vectors.append({"name": "prompt_embedding", "title": "Prompt embedding", "dimensions": vector_dim})
    return {"guidelines": cfg.guidelines, "min_submitted": cfg.min_submitted, "fields": fields,
            "questions": questions, "metadata": metadata, "vectors": vectors}


def review_spec(cfg: ArgillaConfig, k: int) -> dict:
    """The second-stage review dataset: the item, a first-stage summary, a decision and harm re-check."""
    spec = annotation_spec(cfg, k, terms=("reasons",), floats=("tau",))
    spec["guidelines"] = cfg.review_guidelines
    spec["min_submitted"] = cfg.review_min_submitted
    spec["fields"].append({"name": "first_stage", "title": "First-stage summary", "required": True,
                           "settings": {"type": "text", "use_markdown": True}})
    harm = [q for q in spec["questions"] if q["name"].startswith("harm_")]
    spec["questions"] = [
        {"name": "decision", "title": "Decision", "required": True,
         "settings": {"type": "label_selection",
                      "options": [_option("keep"), _option("drop"), _option("fix")]}},
        *harm,
        {"name": "notes", "title": "Notes", "required": False, "settings": {"type": "text", "use_markdown": False}},
    ]
    return spec


def spec_signature(spec: dict) -> dict[str, Any]:
    """What must match for an existing dataset to be reused: names, types, required flags, options, dimensions."""
    sig: dict[str, Any] = {}
    for f in spec["fields"]:
        sig[f"field {f['name']}"] = (f["settings"]["type"], bool(f["required"]))
    for q in spec["questions"]:
        options = tuple(str(o["value"]) for o in q["settings"].get("options") or [])
        sig[f"question {q['name']}"] = (q["settings"]["type"], bool(q["required"]), options)
    for m in spec["metadata"]:
        sig[f"metadata {m['name']}"] = (m["settings"]["type"],)
    for v in spec["vectors"]:
        sig[f"vector {v['name']}"] = (int(v["dimensions"]),)
    return sig


def _server_spec(client: ArgillaClient, dataset_id: str) -> dict:
    return {
        "fields": client.get(f"/api/v1/datasets/{dataset_id}/fields")["items"],
        "questions": client.get(f"/api/v1/datasets/{dataset_id}/questions")["items"],
        "metadata": client.get(f"/api/v1/me/datasets/{dataset_id}/metadata-properties")["items"],
        "vectors": client.get(f"/api/v1/datasets/{dataset_id}/vectors-settings")["items"],
    }


def schema_differences(wanted: dict, have: dict) -> list[str]:
    w, h = spec_signature(wanted), spec_signature(have)
    out = [f"{k}: missing on the server" for k in w if k not in h]
    out += [f"{k}: not expected" for k in h if k not in w]
    out += [f"{k}: server has {h[k]}, wanted {w[k]}" for k in w if k in h and h[k] != w[k]]
    return out


def ensure_dataset(client: ArgillaClient, name: str, workspace: str, spec: dict) -> dict:
    """Create dataset `name` with `spec`, finish a half-created (draft) one, or reuse a matching one.

    Returns the server's dataset JSON plus `question_ids` (name → id). Raises CurateError on a schema mismatch.
    """
    ws_id = client.workspace_id(workspace)
    ds = client.find_dataset(name, ws_id)
    if ds is None:
        ds = client.request("POST", "/api/v1/datasets", json_body={
            "name": name, "workspace_id": ws_id, "guidelines": spec["guidelines"], "allow_extra_metadata": True,
            "distribution": {"strategy": "overlap", "min_submitted": spec["min_submitted"]},
        })
    if ds["status"] == "draft":  # new, or a creation that stopped half-way: add what is missing, then publish
        have = _server_spec(client, ds["id"])
        for kind, path in (("fields", "fields"), ("questions", "questions"),
                           ("metadata", "metadata-properties"), ("vectors", "vectors-settings")):
            present = {x["name"] for x in have[kind]}
            for item in spec[kind]:
                if item["name"] not in present:
                    client.request("POST", f"/api/v1/datasets/{ds['id']}/{path}", json_body=item)
        ds = client.request("PUT", f"/api/v1/datasets/{ds['id']}/publish")
    have = _server_spec(client, ds["id"])
    diffs = schema_differences(spec, have)
    if diffs:
        raise CurateError(
            f"Argilla dataset {name!r} (workspace {workspace!r}, {client.url}) exists with a different layout: "
            + "; ".join(diffs[:8]) + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "")
            + ". Use another name (annotation.argilla.dataset) or delete that dataset in Argilla if it is unused"
        )
    ds = dict(ds)
    ds["question_ids"] = {q["name"]: q["id"] for q in have["questions"]}
    return ds


# ---------------------------------------------------------------------------------------------------------------
# records and responses at the edge


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_item(
    record: AnnotationRecord,
    spec: dict,
    question_ids: dict[str, str],
    *,
    rewards: dict[str, float] | None = None,
    agent: str = "reward-model",
    extra_fields: dict[str, str] | None = None,
) -> dict:
    """One `AnnotationRecord` as a bulk-upsert item (external id = record id)."""
    k = sum(f["name"].startswith("completion_") for f in spec["fields"])
    if len(record.completions) > k:
        raise CurateError(f"record {record.record_id} has {len(record.completions)} completions, the dataset {k} slots")
    fields: dict[str, Any] = {"prompt": record.prompt.messages}
    fields.update({slot(i): c.text for i, c in enumerate(record.completions, 1)})
    fields.update({slot(i): EMPTY_SLOT for i in range(len(record.completions) + 1, k + 1)})
    fields.update(extra_fields or {})
    kinds = {m["name"]: m["settings"]["type"] for m in spec["metadata"]}
    metadata: dict[str, Any] = {"completion_ids": json.dumps([c.id for c in record.completions])}
    for name, kind in kinds.items():
        value = record.metadata.get(name)
        if kind == "terms" and value is not None and value != "":
            metadata[name] = str(value)
        elif kind == "float" and _finite(value):
            metadata[name] = float(value)
        elif kind == "integer" and _finite(value):
            metadata[name] = int(value)
    item: dict[str, Any] = {"external_id": record.record_id, "fields": fields, "metadata": metadata}
    if spec["vectors"] and record.vector is not None:
        item["vectors"] = {"prompt_embedding": [float(x) for x in record.vector]}
    scored = [(slot(i), rewards[c.id]) for i, c in enumerate(record.completions, 1) if rewards and c.id in rewards]
    if "ranking" in question_ids and len(scored) == len(record.completions) >= 2:
        scored.sort(key=lambda t: -t[1])
        top = max(r for _, r in scored)
        weights = [math.exp(r - top) for _, r in scored]
        item["suggestions"] = [{
            "question_id": question_ids["ranking"], "type": "model", "agent": agent,
            "value": [{"value": name, "rank": i} for i, (name, _) in enumerate(scored, 1)],
            "score": [w / sum(weights) for w in weights],
        }]
    return item


def upsert_records(
    client: ArgillaClient, dataset: dict, spec: dict, records: Sequence[AnnotationRecord], *,
    rewards: dict[str, float] | None = None, agent: str = "reward-model", batch_size: int = 100,
    extra_fields: dict[str, dict[str, str]] | None = None, progress: bool = False,
) -> dict[str, int]:
    """Upsert `records` into `dataset`; records that already have a response are skipped (never overwritten)."""
    existing = {r.get("external_id"): r for r in client.list_records(dataset["id"], include=("responses",))}
    answered = {eid for eid, r in existing.items() if r.get("responses")}
    todo = [r for r in records if r.record_id not in answered]
    items = [record_item(r, spec, dataset["question_ids"], rewards=rewards, agent=agent,
                         extra_fields=(extra_fields or {}).get(r.record_id)) for r in todo]
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(items), batch_size), desc=f"push {dataset['name']}", unit="batch",
                      disable=not progress):
        client.request("PUT", f"/api/v1/datasets/{dataset['id']}/records/bulk",
                       json_body={"items": items[start : start + batch_size]})
    return {
        "created": sum(r.record_id not in existing for r in todo),
        "updated": sum(r.record_id in existing for r in todo),
        "skipped_answered": len(records) - len(todo),
    }


def responses_from_raw(
    raw_records: Sequence[dict], completion_ids: dict[str, list[str]], users: dict[str, str], source: str
) -> list[Response]:
    """Argilla records (raw JSON with `responses`) → `Response`s, mapping slots back to completion ids.

    `completion_ids`: record id → the completion ids in slot order (from the push); a record's own
    `completion_ids` metadata is the fallback. Ranks of empty slots are dropped; harm "none" → [].
    """
    out = []
    for rec in raw_records:
        rid = rec.get("external_id") or rec["id"]
        ids = completion_ids.get(rid)
        if ids is None:
            ids = json.loads((rec.get("metadata") or {}).get("completion_ids") or "[]")
        slots = {slot(i): cid for i, cid in enumerate(ids, 1)}
        for resp in rec.get("responses") or []:
            values = resp.get("values") or {}
            ranks = {}
            ranking = (values.get("ranking") or {}).get("value") or []
            for pos, item in enumerate(ranking, 1):
                name, rank = (item.get("value"), item.get("rank")) if isinstance(item, dict) else (item, None)
                if name in slots:
                    ranks[slots[name]] = int(rank if rank is not None else pos)
            harm = {}
            for i, cid in enumerate(ids, 1):
                labels = (values.get(f"harm_{i}") or {}).get("value")
                if labels is not None:
                    harm[cid] = sorted(set(labels) - {NONE_LABEL})
            rating = (values.get("rating") or {}).get("value")
            out.append(Response(
                record_id=rid,
                annotator=users.get(resp["user_id"], resp["user_id"]),
                status=resp["status"],
                ranks=ranks,
                harm=harm,
                rating=int(rating) if rating is not None else None,
                correction=str((values.get("correction") or {}).get("value") or ""),
                source=source,
                updated_at=str(resp.get("updated_at", "")),
            ))
    return out


__all__ = [
    "ArgillaClient",
    "ArgillaConfig",
    "ArgillaError",
    "annotation_spec",
    "ensure_dataset",
    "record_item",
    "responses_from_raw",
    "review_spec",
    "schema_differences",
    "slot",
    "upsert_records",
]
