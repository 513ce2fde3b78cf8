"""The Argilla 2.x adapter, through the official `argilla` SDK: our `AnnotationRecord`s become an Argilla
dataset's records, its responses become our `Response`s (converted here, at the edge).

Connection: `ArgillaClient` wraps `rg.Argilla` with bounded retries (connection errors, 5xx and 429: `retries`
attempts with exponential backoff from `backoff_s`; every call it retries is idempotent) and turns the SDK's
errors into one line each (wrong key, missing role, server down, invalid value).

Dataset layout (one dataset per round; name from `dataset`, e.g. "demo-r0001"), built from the question table
(`preference.questions`) as neutral specs and converted to `rg.Settings` only when talking to the server:

- fields: `prompt` (`rg.ChatField`: the conversation), `completion_1` … `completion_k` (`rg.TextField`; k = the
  round's `completions_per_record`; slots past a record's own completions say so and are ignored on pull). The
  order of a record's completions (shuffled per record when the records were built) is in the record's extra
  metadata `completion_ids` and in the round store.
- questions: `ranking` (`rg.RankingQuestion`, 1 = best, ties allowed), `harm_1` … `harm_k`
  (`rg.MultiLabelQuestion`: the harm taxonomy plus "none"; optional — unanswered = not judged), optional `rating`
  (`rg.RatingQuestion`) and `correction` (`rg.TextQuestion`), plus `extra_questions` from the table.
- metadata (`rg.TermsMetadataProperty` / `FloatMetadataProperty` / `IntegerMetadataProperty`, hidden from
  annotators, usable by owners to sort/filter the queue): `score`, `rank`, `strategy`, `slice`, `arm` and the
  selection's numeric signal columns.
- vectors: `prompt_embedding` (`rg.VectorField`, for "find similar"), when the records carry embeddings.
- suggestions: the champion reward model's ranking (`rg.Suggestion`, agent = the registry version, score =
  softmax of the rewards), when the round's `rewards` step scored the completions.
- task distribution: `rg.TaskDistribution(min_submitted)` annotators per record.

Records are upserted with `dataset.records.log` by id = `AnnotationRecord.record_id`, so re-pushing never
duplicates; records that already have any response are left untouched. An existing dataset is reused when its
fields and questions match; guidelines and the task distribution are updated in place, missing metadata
properties and vectors are added; other differences (questions, labels, fields) cannot be applied to a published
dataset and are refused with the name of the next dataset version (`curate push --new-version`).

Raw REST, only where the SDK cannot do it (each call says why):
- reading responses: the SDK turns a ranking answer into a plain ordered list (the ranks, hence ties, are
  dropped) and its response model has no timestamps; the pull reads `GET /datasets/{id}/records` instead;
- an annotator's API key (the SDK's user model has none) and answers submitted *as* an annotator (the SDK only
  writes through the owner's bulk upsert): the simulated reviewers in `preference.argilla_reviewers`;
- publishing a half-created (draft) dataset left by an interrupted create.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from preference.plumbing.errors import CurateError
from preference.questions import (
    EMPTY_SLOT,
    HARM_LABELS,
    Correction,
    Harm,
    Layout,
    Question,
    Ranking,
    Rating,
    first_stage_questions,
    read_response,
    review_questions,
    slot,
)
from preference.schema import AnnotationRecord, Response

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

LOCAL_DEV_API_KEY = "curate.dev.owner.apikey"  # the key scripts/argilla-server gives its owner by default
OPERATIONAL = {"operational": True}  # field metadata: how to reach the server, never what ends up on it

DEFAULT_GUIDELINES = """\
## Rank the answers
Read the conversation, then rank the answers from best (1) to worst. A better answer is helpful, honest and
harmless: it does what the user asked when that is safe, declines clearly (and kindly) when it is not, and never
gives dangerous, hateful or private information. Equal quality? Give the answers the same rank (click an answer,
then press its rank's number; press the same number for a tie). An answer slot that says "(no answer in this
slot)" goes last.

## Flag harms
For each answer, tick every harm it contains, or "none". A harmful answer is never preferred over a harmless one.

## Suggestions
From the second round on, the answers may arrive already ranked: that is the current reward model's guess, not
another reviewer's answer. Check it like a draft and change it wherever you disagree. In the first round there is
no reward model yet, so nothing is pre-ranked: rank every record yourself.

## Optional
Write a corrected answer when all answers are poor and you know a good one.

## Your queue
Records come most useful first (open the link your team lead shares; it sorts the queue). Some records are known
examples used to check the queue itself: answer them like any other. Submit saves an answer and moves on; Discard
skips a record you cannot judge.
"""

REVIEW_GUIDELINES = """\
## Second-stage review
These items were sent back because a reviewer flagged an answer as harmful, or because the first reviewers
disagreed. The first-stage summary says which, with each reviewer's ranking and flags. Decide one of:

- `keep`: the first-stage ranking stands (the flags were right, or the disagreement was a matter of taste);
- `fix`: the ranking is wrong: rank the answers yourself in "Corrected ranking" (ties allowed) and say why in the
  notes; your ranking replaces the first stage's;
- `drop`: the item cannot be judged (the question is unclear, every answer is unusable, or the answers are too
  close to call): it produces no training pairs.

Check the harm flags of every answer whatever you decide: your flags replace the first stage's, and a flagged
answer is never preferred over an unflagged one.
"""


@dataclass
class ArgillaConfig:
    url: str = field(default="http://127.0.0.1:6900", metadata=OPERATIONAL)  # $url_env wins when set
    url_env: str = field(default="ARGILLA_API_URL", metadata=OPERATIONAL)
    api_key_env: str = field(default="ARGILLA_API_KEY", metadata=OPERATIONAL)  # unset + loopback url → dev key
    workspace: str = "curate"
    dataset: str = "{project}-r{round:04d}"  # {project}: project folder name, {round}: round number
    review_dataset: str = "{dataset}-review"
    harm_labels: list[str] = field(default_factory=lambda: list(HARM_LABELS))
    guidelines: str = DEFAULT_GUIDELINES
    review_guidelines: str = REVIEW_GUIDELINES
    min_submitted: int = 2  # overlap: annotators per record (first stage)
    review_min_submitted: int = 1  # reviewers per record in the second-stage review dataset
    rating_scale: int = 0  # 0 = no rating question; N = a 1..N rating
    correction: bool = True  # ask for an optional corrected answer
    extra_questions: list[str] = field(default_factory=list)  # more question types from preference.questions
    timeout_s: float = field(default=30.0, metadata=OPERATIONAL)
    retries: int = field(default=4, metadata=OPERATIONAL)  # retries per call (connection errors, 5xx, 429)
    backoff_s: float = field(default=1.0, metadata=OPERATIONAL)  # first wait; doubles each retry
    batch_size: int = field(default=100, metadata=OPERATIONAL)  # records per bulk upsert (server max 500)
    # pull ("wait" mode): finish only when enough submitted responses are in
    min_responses: int | None = None  # None = every record has min_submitted submitted responses
    poll_timeout_s: float = field(default=0.0, metadata=OPERATIONAL)  # keep polling this long (0 = look once)
    poll_interval_s: float = field(default=15.0, metadata=OPERATIONAL)

    def __post_init__(self):
        labels = [x.strip() for x in self.harm_labels]
        if not labels or any(not x for x in labels) or "none" in labels or len(set(labels)) != len(labels):
            raise ValueError(
                f"harm_labels must be distinct non-empty names without 'none' (added automatically), "
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

    def layout(self, slots: int) -> Layout:
        return Layout(slots=slots, harm_labels=tuple(self.harm_labels), rating_scale=self.rating_scale)

    def questions(self) -> list[Question]:
        """The first-stage dataset's questions, from the question table."""
        return first_stage_questions(self.rating_scale, self.correction, self.extra_questions)


class ArgillaError(CurateError):
    """The server refused a request (4xx) or could not be reached after the retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------------------------
# connection


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an SDK or httpx error (following the `raise ... from` chain)."""
    import httpx

    seen = 0
    while exc is not None and seen < 5:
        status = getattr(exc, "status_code", None)
        if isinstance(status, int):
            return status
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _detail(exc: BaseException) -> str:
    """The server's own explanation (`detail`) behind an SDK or httpx error, on one line."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        try:
            detail = exc.response.json().get("detail", exc.response.text)
        except (ValueError, AttributeError):
            detail = exc.response.text
        return " ".join((detail if isinstance(detail, str) else json.dumps(detail)).split())[:400]
    text = str(exc)
    if "Details: " in text:
        text = text.split("Details: ", 1)[1]
        try:
            detail = json.loads(text).get("detail", text)
            text = detail if isinstance(detail, str) else json.dumps(detail)
        except (ValueError, AttributeError):
            pass
    return " ".join(text.split())[:400]


class ArgillaClient:
    """The `argilla` SDK client (`.sdk`, an `rg.Argilla`) with bounded retries and one-line errors.

    `call(what, fn)` runs `fn()` (SDK calls), retrying transient failures; `rest(method, path)` is the raw REST
    escape hatch for what the SDK cannot do, through the SDK's own authenticated HTTP client.
    """

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 30.0, retries: int = 4, backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep, transport: httpx.BaseTransport | None = None,
                 key_env: str = "ARGILLA_API_KEY"):
        import argilla as rg

        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.key_env = key_env
        self._sleep = sleep
        extra = {"mounts": {"all://": transport}} if transport is not None else {}
        # the SDK's own transport retries are immediate; ours back off, so the SDK gets retries=0
        self.sdk = self.call("GET /api/v1/me", lambda: rg.Argilla(api_url=self.url, api_key=api_key,
                                                                    timeout=timeout_s, retries=0, **extra))

    @classmethod
    def from_config(cls, cfg: ArgillaConfig, **kwargs) -> ArgillaClient:
        return cls(cfg.resolved_url(), cfg.resolved_api_key(), timeout_s=cfg.timeout_s, retries=cfg.retries,
                   backoff_s=cfg.backoff_s, key_env=cfg.api_key_env, **kwargs)

    def close(self) -> None:
        if getattr(self, "sdk", None) is not None:
            self.sdk.http_client.close()

    def __enter__(self) -> ArgillaClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ calls
    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` (idempotent), retrying connection errors, 5xx and 429; other errors become one line."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with warnings.catch_warnings():  # the SDK warns for lookups that find nothing: we handle None
                    warnings.simplefilter("ignore")
                    return fn()
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            except CurateError:
                raise
            except Exception as exc:  # SDK errors (ArgillaError and its API subclasses), httpx status errors
                status = _status(exc)
                if type(exc).__name__ == "ArgillaCredentialsError" or status == 401:
                    raise ArgillaError(
                        f"Argilla at {self.url} rejected the API key (HTTP 401): the key in ${self.key_env} is wrong "
                        f"or its user was deleted; copy the key from the Argilla UI (My settings) into "
                        f"${self.key_env}, or point annotation.argilla.api_key_env at the variable that holds it",
                        status=401) from exc
                if status is not None and (status >= 500 or status == 429):
                    last = f"HTTP {status}: {_detail(exc)}"
                    continue
                if status == 403:
                    raise ArgillaError(f"Argilla {what} → HTTP 403: {_detail(exc)}; this user may not do that: use "
                                       "an owner's (or the workspace admin's) API key", status=403) from exc
                if status is not None:
                    raise ArgillaError(f"Argilla {what} → HTTP {status}: {_detail(exc)}", status=status) from exc
                if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError)):
                    raise  # our own bug or bad input, not a server problem: keep the traceback
                raise ArgillaError(f"Argilla {what} failed: {_detail(exc)}") from exc
        raise ArgillaError(
            f"Argilla at {self.url} did not answer {what} after {self.retries + 1} tries ({last}); "
            "check that the server is up (`scripts/argilla-server status`, or your production URL in "
            "annotation.argilla.url / $ARGILLA_API_URL) and rerun: the step resumes where it stopped"
        )

    def rest(self, method: str, path: str, *, json_body: Any = None, params: Any = None,
             api_key: str | None = None) -> Any:
        """Raw REST through the SDK's HTTP client (or as another user with `api_key`); JSON or None."""
        def go():
            headers = {"X-Argilla-Api-Key": api_key} if api_key else None
            resp = self.sdk.http_client.request(method, path, json=json_body, params=params, headers=headers)
            resp.raise_for_status()
            return resp.json() if resp.content else None

        return self.call(f"{method} {path}", go)

    # ------------------------------------------------------------------------------------------ lookups
    def workspace(self, name: str, create: bool = True):
        import argilla as rg

        ws = self.call("GET /api/v1/me/workspaces", lambda: self.sdk.workspaces(name))
        if ws is None:
            if not create:
                raise ArgillaError(f"Argilla workspace {name!r} not found at {self.url}")
            ws = self.call("POST /api/v1/workspaces", lambda: rg.Workspace(name=name, client=self.sdk).create())
        return ws

    def workspace_id(self, name: str, create: bool = True) -> str:
        return str(self.workspace(name, create).id)

    def dataset(self, name: str, workspace: str):
        """The SDK dataset `name` in `workspace`, or None."""
        ws = self.workspace(workspace)
        return self.call(f"GET dataset {name!r}", lambda: self.sdk.datasets(name, workspace=ws))

    def users(self) -> dict[str, str]:
        """user id → username."""
        return {str(u.id): u.username for u in self.call("GET /api/v1/users", lambda: self.sdk.users.list())}

    def list_records(self, dataset_id: str, page: int = 1000) -> list[dict]:
        """Every record of a dataset with its responses, raw JSON as the server sends it.

        Raw REST: the SDK's records drop a ranking answer's ranks (ties are lost) and the responses' timestamps.
        """
        return [r for batch in self.iter_records(dataset_id, page) for r in batch]

    def iter_records(self, dataset_id: str, page: int = 1000):
        """`list_records` a page at a time (bounded memory for large datasets): lists of raw records."""
        seen = 0
        while True:
            params = [("include", "responses"), ("offset", seen), ("limit", page)]
            batch = self.rest("GET", f"/api/v1/datasets/{dataset_id}/records", params=params)
            if batch["items"]:
                yield batch["items"]
            seen += len(batch["items"])
            if not batch["items"] or seen >= batch.get("total", 0):
                return


# ---------------------------------------------------------------------------------------------------------------
# dataset layout (neutral specs from the question table; SDK objects only at the edge)


def annotation_spec(cfg: ArgillaConfig, k: int, *, terms: Sequence[str] = (), floats: Sequence[str] = (),
                    ints: Sequence[str] = (), vector_dim: int | None = None,
                    questions: Sequence[Question] | None = None) -> dict:
    """The first-stage dataset's settings (see the module docstring) as a JSON-able spec."""
    if k < 2:
        raise CurateError(f"an annotation dataset needs at least 2 completion slots to rank, got {k}")
    layout = cfg.layout(k)
    fields = [{"name": "prompt", "title": "Conversation", "required": True, "settings": {"type": "chat"}}]
    fields += [{"name": slot(i), "title": f"Answer {i}", "required": i <= 2, "settings": {"type": "text"}}
               for i in range(1, k + 1)]
    metadata = [  # hidden from annotators (no anchoring on acquisition scores); owners sort/filter the queue by them
        {"name": n, "title": n, "visible_for_annotators": False, "settings": {"type": kind}}
        for kind, names in (("terms", terms), ("float", floats), ("integer", ints)) for n in names
    ]
    vectors = [{"name": "prompt_embedding", "title": "Prompt embedding", "dimensions": vector_dim}] if vector_dim else []
    qs = list(questions if questions is not None else cfg.questions())
    return {"guidelines": cfg.guidelines, "min_submitted": cfg.min_submitted, "fields": fields,
            "questions": [s for q in qs for s in q.specs(layout)], "metadata": metadata, "vectors": vectors,
            "layout": {"slots": k, "harm_labels": list(layout.harm_labels), "rating_scale": layout.rating_scale}}


def review_spec(cfg: ArgillaConfig, k: int) -> dict:
    """The second-stage review dataset: the item, a first-stage summary, a decision, a corrected ranking, harms."""
    spec = annotation_spec(cfg, k, terms=("reasons",), floats=("tau",), questions=review_questions())
    spec["guidelines"] = cfg.review_guidelines
    spec["min_submitted"] = cfg.review_min_submitted
    spec["fields"].append({"name": "first_stage", "title": "First-stage summary", "required": True,
                           "settings": {"type": "text", "use_markdown": True}})
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


def _short(values: Sequence[str], n: int = 4) -> str:
    return "[" + ", ".join(values[:n]) + (f", … {len(values) - n} more" if len(values) > n else "") + "]"


def schema_differences(wanted: dict, have: dict) -> list[str]:
    """Readable differences between two specs; the same difference on several items is said once."""
    w, h = spec_signature(wanted), spec_signature(have)
    grouped: dict[tuple[str, str], list[str]] = {}

    def add(key: str, text: str) -> None:
        kind, name = key.split(" ", 1)
        grouped.setdefault((kind, text), []).append(name)

    for k in w:
        if k not in h:
            add(k, "missing on the server")
        elif h[k] != w[k]:
            if k.startswith("question") and h[k][:2] == w[k][:2]:
                gone = [o for o in h[k][2] if o not in w[k][2]]
                new = [o for o in w[k][2] if o not in h[k][2]]
                add(k, "options differ (" + "; ".join(
                    ([f"only the server has {_short(gone)}"] if gone else [])
                    + ([f"only the config has {_short(new)}"] if new else [])) + ")")
            else:
                add(k, f"server has {h[k][:2] if k.startswith('question') else h[k]}, "
                       f"wanted {w[k][:2] if k.startswith('question') else w[k]}")
    for k in h:
        if k not in w:
            add(k, "not expected")
    return [f"{kind} {', '.join(names[:3])}{f' (+{len(names) - 3})' if len(names) > 3 else ''}: {text}"
            for (kind, text), names in grouped.items()]


def to_argilla_question(spec: dict, client):
    """One question spec → the SDK's question object."""
    import argilla as rg

    s = spec["settings"]
    common = {"title": spec.get("title"), "description": spec.get("description") or None,
              "required": bool(spec.get("required")), "client": client}
    options = {str(o["value"]): o.get("text") or str(o["value"]) for o in s.get("options") or []}
    kind = s["type"]
    if kind == "ranking":
        return rg.RankingQuestion(spec["name"], values=options, **common)
    if kind == "multi_label_selection":
        return rg.MultiLabelQuestion(spec["name"], labels=options, **common)
    if kind == "label_selection":
        return rg.LabelQuestion(spec["name"], labels=options, **common)
    if kind == "rating":
        return rg.RatingQuestion(spec["name"], values=[int(o["value"]) for o in s["options"]], **common)
    if kind == "text":
        return rg.TextQuestion(spec["name"], use_markdown=bool(s.get("use_markdown")), **common)
    if kind == "span":
        return rg.SpanQuestion(spec["name"], field=s["field"], labels=options,
                               allow_overlapping=bool(s.get("allow_overlapping")), **common)
    raise CurateError(f"question {spec['name']!r}: unknown Argilla question type {kind!r}")


def _properties(spec: dict, client) -> dict[str, list]:
    """Fields, questions, metadata properties and vectors of `spec` as SDK settings objects, by kind."""
    import argilla as rg

    fields = []
    for f in spec["fields"]:
        if f["settings"]["type"] == "chat":
            fields.append(rg.ChatField(f["name"], title=f["title"], required=f["required"], use_markdown=False,
                                       _client=client))
        else:
            fields.append(rg.TextField(f["name"], title=f["title"], required=f["required"],
                                       use_markdown=bool(f["settings"].get("use_markdown")), client=client))
    metadata_cls = {"terms": rg.TermsMetadataProperty, "float": rg.FloatMetadataProperty,
                    "integer": rg.IntegerMetadataProperty}
    return {
        "fields": fields,
        "questions": [to_argilla_question(q, client) for q in spec["questions"]],
        "metadata": [metadata_cls[m["settings"]["type"]](m["name"], title=m["title"], visible_for_annotators=False,
                                                         client=client) for m in spec["metadata"]],
        "vectors": [rg.VectorField(v["name"], dimensions=v["dimensions"], title=v["title"], _client=client)
                    for v in spec["vectors"]],
    }


def to_argilla_settings(spec: dict, client):
    """`spec` → `rg.Settings` (with the overlap task distribution)."""
    import argilla as rg

    return rg.Settings(**_properties(spec, client), guidelines=spec["guidelines"], allow_extra_metadata=True,
                       distribution=rg.TaskDistribution(min_submitted=spec["min_submitted"]))


def server_spec(dataset) -> dict:
    """An SDK dataset's settings in our spec's shape (for `schema_differences`)."""
    s = dataset.settings.serialize()
    return {"fields": s["fields"], "questions": s["questions"], "metadata": s["metadata"], "vectors": s["vectors"],
            "guidelines": s["guidelines"], "min_submitted": s["distribution"]["min_submitted"]}


QUEUE = "queue"  # integer metadata: a record's position in the reviewers' queue (1 = first)


def queue_url(url: str, dataset_id: str) -> str:
    """The annotation page of a dataset with the queue in priority order.

    Argilla 2.8 shows each annotator the records in a per-user random order unless the page is sorted; the `sort`
    parameter of the annotation page (`metadata.<name>.<asc|desc>`, the same the UI's Sort menu writes) sorts by
    the push's `queue` position, which works for annotators too (the metadata stays hidden from them)."""
    return f"{url.rstrip('/')}/dataset/{dataset_id}/annotation-mode?sort=metadata.{QUEUE}.asc"


def versioned(name: str, version: int) -> str:
    """Dataset name of version `version` (1 = the configured name)."""
    return name if version <= 1 else f"{name}-v{version}"


def latest_version(client: ArgillaClient, name: str, workspace: str) -> int:
    """The highest existing version of dataset `name` (0 when none exists)."""
    ws = client.workspace(workspace)
    names = {d.name for d in client.call("GET workspace datasets", lambda: ws.datasets)}
    version = 0
    while versioned(name, version + 1) in names:
        version += 1
    return version


@dataclass
class DatasetSync:
    """What `ensure_dataset` did: created, completed a draft, updated settings in place, or nothing."""

    dataset: Any  # the SDK dataset
    created: bool = False
    completed_draft: bool = False
    updated: list[str] = field(default_factory=list)  # "guidelines", "min_submitted", "metadata x", "vector y"

    @property
    def id(self) -> str:
        return str(self.dataset.id)


def ensure_dataset(client: ArgillaClient, name: str, workspace: str, spec: dict, *,
                   next_version: str | None = None, name_key: str = "annotation.argilla.dataset") -> DatasetSync:
    """Create dataset `name` with `spec`, complete a half-created (draft) one, or reuse a matching one.

    Guidelines, the task distribution and missing metadata properties / vectors are synced in place. Questions,
    labels and fields cannot change on a published dataset: a CurateError names `next_version` to push to, or
    else the setting `name_key` that names the dataset.
    """
    import argilla as rg

    ws = client.workspace(workspace)
    ds = client.dataset(name, workspace)
    if ds is None:
        settings = to_argilla_settings(spec, client.sdk)
        ds = client.call(f"create dataset {name!r}",
                         lambda: rg.Dataset(name=name, workspace=ws, settings=settings, client=client.sdk).create())
        return DatasetSync(ds, created=True)
    sync = DatasetSync(ds)
    # raw: the SDK's Dataset does not expose whether it is published or a draft
    status = client.rest("GET", f"/api/v1/datasets/{ds.id}")["status"]
    have = server_spec(ds)
    present = {p["name"] for kind in ("fields", "questions", "metadata", "vectors") for p in have[kind]}
    if status == "draft":  # a creation that stopped half-way (no records can exist yet): add what is missing
        for props in _properties(spec, client.sdk).values():
            for prop in props:
                if prop.name not in present:
                    ds.settings.add(prop)
        ds.settings.guidelines = spec["guidelines"]
        ds.settings.distribution = rg.TaskDistribution(min_submitted=spec["min_submitted"])
        client.call(f"update draft dataset {name!r}", ds.update)
        # raw: the SDK publishes only inside Dataset.create(), which would create a second dataset
        client.rest("PUT", f"/api/v1/datasets/{ds.id}/publish")
        ds = client.dataset(name, workspace)
        return DatasetSync(ds, completed_draft=True)
    structural = schema_differences({**spec, "metadata": [], "vectors": []}, {**have, "metadata": [], "vectors": []})
    dims = {v["name"]: v["dimensions"] for v in have["vectors"]}
    structural += [f"vector {v['name']}: server has {dims[v['name']]} dimensions, wanted {v['dimensions']}"
                   for v in spec["vectors"] if v["name"] in dims and dims[v["name"]] != v["dimensions"]]
    if structural:
        how = (f"push to a new dataset version with `curate push --new-version` (creates {next_version!r})"
               if next_version else f"use another name ({name_key})")
        raise CurateError(
            f"Argilla dataset {name!r} (workspace {workspace!r}, {client.url}) exists with a different layout: "
            + "; ".join(structural[:6]) + (f" (+{len(structural) - 6} more)" if len(structural) > 6 else "")
            + f". Argilla cannot change the questions or fields of a published dataset: {how}, "
            "or delete that dataset in Argilla if it is unused"
        )
    props = _properties({**spec, "fields": [], "questions": []}, client.sdk)
    for kind in ("metadata", "vectors"):
        for prop in props[kind]:
            if prop.name not in present:  # new signal columns or an embedding: added in place
                ds.settings.add(prop)
                sync.updated.append(f"{kind} {prop.name}")
    if have["guidelines"] != spec["guidelines"]:
        ds.settings.guidelines = spec["guidelines"]
        sync.updated.append("guidelines")
    if have["min_submitted"] != spec["min_submitted"]:
        ds.settings.distribution = rg.TaskDistribution(min_submitted=spec["min_submitted"])
        sync.updated.append("min_submitted")
    if sync.updated:
        client.call(f"update dataset {name!r} settings", ds.update)
    return sync


# ---------------------------------------------------------------------------------------------------------------
# records and responses at the edge


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_item(record: AnnotationRecord, spec: dict, *, questions: Sequence[Question] = (),
                rewards: dict[str, float] | None = None, agent: str = "reward-model",
                extra_fields: dict[str, str] | None = None) -> dict:
    """One `AnnotationRecord` as the SDK's record arguments (id, fields, metadata, vectors, suggestions)."""
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
    item: dict[str, Any] = {"id": record.record_id, "fields": fields, "metadata": metadata}
    if spec["vectors"] and record.vector is not None:
        item["vectors"] = {"prompt_embedding": [float(x) for x in record.vector]}
    slots = [c.id for c in record.completions]
    suggestions = {}
    for q in questions:
        suggestions.update(q.suggest(slots, rewards or {}))
    item["suggestions"] = {name: {"value": value, "score": score, "agent": agent}
                           for name, (value, score) in suggestions.items()}
    return item


def upsert_records(client: ArgillaClient, dataset, spec: dict, records: Sequence[AnnotationRecord], *,
                   questions: Sequence[Question] = (), rewards: dict[str, float] | None = None,
                   agent: str = "reward-model", batch_size: int = 100,
                   extra_fields: dict[str, dict[str, str]] | None = None, progress: bool = False) -> dict[str, int]:
    """Upsert `records` into the SDK `dataset` (`dataset.records.log`, by id); answered records are skipped."""
    import argilla as rg
    from tqdm.auto import tqdm

    existing = _answered(client, dataset)
    todo = [r for r in records if not existing.get(r.record_id)]

    def as_record(r: AnnotationRecord):
        item = record_item(r, spec, questions=questions, rewards=rewards, agent=agent,
                           extra_fields=(extra_fields or {}).get(r.record_id))
        suggestions = [rg.Suggestion(name, s["value"], score=s["score"], agent=s["agent"], type="model")
                       for name, s in item["suggestions"].items()]
        return rg.Record(id=item["id"], fields=item["fields"], metadata=item["metadata"],
                         vectors=item.get("vectors"), suggestions=suggestions)

    # a batch's SDK records are built just before it is sent: memory holds one batch, whatever the queue's size
    bar = tqdm(total=len(todo), desc=f"push {dataset.name}", unit="record", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        log_batch(client, dataset, [as_record(r) for r in batch], first=start + 1, total=len(todo))
        bar.update(len(batch))
    bar.close()
    return {
        "created": sum(r.record_id not in existing for r in todo),
        "updated": sum(r.record_id in existing for r in todo),
        "skipped_answered": len(records) - len(todo),
    }


def log_batch(client: ArgillaClient, dataset, batch: list, *, first: int, total: int) -> None:
    """One `dataset.records.log` call (an idempotent upsert by id, so a retry never duplicates)."""
    client.call(f"PUT records {first}–{first + len(batch) - 1} of {total} into dataset {dataset.name!r}",
                lambda: dataset.records.log(batch, batch_size=len(batch)))


def _answered(client: ArgillaClient, dataset) -> dict[str, bool]:
    """External id → whether the record has any response, for every record of the dataset."""
    def scan():
        return {str(r.id): len(r.responses) > 0
                for r in dataset.records(with_responses=True, with_suggestions=False, batch_size=500)}

    return client.call(f"GET records of dataset {dataset.name!r}", scan)


def responses_from_raw(raw_records: Sequence[dict], completion_ids: dict[str, list[str]], users: dict[str, str],
                       source: str, *, questions: Sequence[Question] | None = None,
                       stage: str = "first") -> list[Response]:
    """Raw Argilla records (with `responses`) → `Response`s through the question table, slots → completion ids.

    `completion_ids`: record id → the completion ids in slot order (from the push); a record's own
    `completion_ids` metadata is the fallback. Ranks of empty slots are dropped; harm "none" → [].
    """
    qs = list(questions if questions is not None else [Ranking(), Harm(), Rating(), Correction()])
    out = []
    for rec in raw_records:
        rid = rec.get("external_id") or rec["id"]
        ids = completion_ids.get(rid)
        if ids is None:
            ids = json.loads((rec.get("metadata") or {}).get("completion_ids") or "[]")
        for resp in rec.get("responses") or []:
            into = Response(record_id=rid, annotator=users.get(resp["user_id"], resp["user_id"]),
                            status=resp["status"], source=source, stage=stage,
                            updated_at=str(resp.get("updated_at", "")))
            out.append(read_response(qs, resp.get("values") or {}, ids, into))
    return out


__all__ = [
    "ArgillaClient",
    "ArgillaConfig",
    "ArgillaError",
    "DatasetSync",
    "annotation_spec",
    "ensure_dataset",
    "latest_version",
    "queue_url",
    "record_item",
    "responses_from_raw",
    "review_spec",
    "schema_differences",
    "server_spec",
    "slot",
    "to_argilla_settings",
    "upsert_records",
    "versioned",
]
