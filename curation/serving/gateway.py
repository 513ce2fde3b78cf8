"""The logging layer of `curate serve`: the only thing clients talk to (FastAPI + uvicorn, started as
`python -m curation.serving.gateway --state <serve.json>` by `curation.serving.serve.start`).

- `POST /v1/chat/completions` (OpenAI format, `"model": serve.model_name` or omitted; `stream` and `n > 1` are
  refused): checks the key, the size and the shape, forwards to vLLM, appends the request and the answer with
  the model version to the traffic log (`curation.serving.traffic.TrafficLog`: JSONL, rotated, fsynced) and only then
  answers. The response's `id` is the response id for feedback; it also carries `model_version`.
  Optional `metadata: {"slice": ...}` tags the request for per-slice drift checks.
- `POST /v1/feedback {response_id, rating: "up"|"down", comment?}`: appended to the same log.
- `GET /v1/models` (with the key), `GET /health` (without).
Errors are `{"error": {"message", "type", "code"}}` with a 4xx status saying what is wrong: 401 missing or
wrong key, 400 malformed JSON or request, 404 unknown model or response id, 413 too large; 502 when the
model server does not answer.
"""

# No `from __future__ import annotations` here: FastAPI reads the request handlers' annotations at runtime.
import argparse
import contextlib
import hmac
import json
import os
import sys
import time
import uuid
from pathlib import Path

from preference.plumbing.io import read_json


class Refused(Exception):
    """A request the gateway refuses: its HTTP status, message and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def check_chat(req: dict, limits: dict, name: str, version: str, upstream_model: str) -> tuple:
    """A chat request's messages, the body forwarded to the model server, its metadata and user (or Refused)."""
    from preference.schema import validate_messages

    try:
        messages = validate_messages(req.get("messages"))
    except ValueError as exc:
        raise Refused(400, f"messages: {exc}") from exc
    if req.get("stream"):
        raise Refused(400, "stream: true is not supported (every answer is logged whole); send stream: false")
    if req.get("n", 1) not in (1, None):
        raise Refused(400, f"n must be 1 (feedback refers to one answer), got {req.get('n')!r}")
    if req.get("model") not in (None, name, version):
        raise Refused(404, f"model {req.get('model')!r} is not served here; ask for {name!r} "
                      f"(champion {version})", "not_found_error")
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    if max_tokens is None:
        max_tokens = limits["default_max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits["max_tokens"]:
        raise Refused(400, f"max_tokens must be an integer in 1..{limits['max_tokens']}, got {max_tokens!r}")
    metadata = req.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Refused(400, "metadata must be an object of strings, e.g. {\"slice\": \"billing\"}")
    user = req.get("user") if isinstance(req.get("user"), str) else None
    body = {k: v for k, v in req.items() if k not in ("metadata", "max_completion_tokens", "user")}
    body.update(model=upstream_model, messages=messages, max_tokens=max_tokens)
    return messages, body, metadata, user


def check_feedback(req: dict, limits: dict, known: dict[str, str]) -> tuple[str, str, str]:
    """A feedback request's response id, rating and comment (or Refused)."""
    extra = sorted(set(req) - {"response_id", "rating", "comment"})
    if extra:
        raise Refused(400, f"unknown field(s) {', '.join(extra)}; expected response_id, rating, comment")
    response_id, rating, comment = req.get("response_id"), req.get("rating"), req.get("comment") or ""
    if not isinstance(response_id, str) or not response_id:
        raise Refused(400, "response_id is required: the `id` of a chat completion this server returned")
    if rating not in ("up", "down"):
        raise Refused(400, f"rating must be \"up\" or \"down\", got {rating!r}")
    if not isinstance(comment, str):
        raise Refused(400, f"comment must be a string, got {type(comment).__name__}")
    if len(comment) > limits["max_comment_chars"]:
        raise Refused(413, f"comment has {len(comment)} characters, more than {limits['max_comment_chars']} "
                      "(serve.max_comment_chars)")
    if response_id not in known:
        raise Refused(404, f"unknown response_id {response_id!r}: this server never returned it",
                      "not_found_error")
    return response_id, rating, comment


def create_app(state: dict, key: str, log, known: dict[str, str] | None = None):
    """The logging layer (a FastAPI app) in front of the model server described by `state` (see `start`).

    `log` is a `TrafficLog`; `known` maps served response ids to their model version (for feedback)."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from curation.serving.traffic import error_record, feedback_record, response_record

    limits, version, name = state["limits"], state["version"], state["model_name"]
    upstream_model = state["upstream"]["model"]
    known = {} if known is None else known
    client = httpx.AsyncClient(base_url=state["upstream"]["url"], headers={"Authorization": f"Bearer {key}"},
                               timeout=httpx.Timeout(600.0, connect=5.0))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()
        log.close()

    app = FastAPI(title="curate serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(Refused)
    async def refused(_request, exc: Refused):
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                            status_code=exc.status)

    def check_key(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if not header:
            raise Refused(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                          "authentication_error")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Refused(401, "invalid API key: the key does not match the server's "
                          f"${state['api_key_env']}", "authentication_error")

    async def read_json_body(request: Request) -> dict:
        limit = limits["max_request_bytes"]
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"request body of {declared} bytes is larger than the limit of {limit} bytes "
                          "(serve.max_request_bytes)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Refused(413, f"request body is larger than the limit of {limit} bytes (serve.max_request_bytes)")
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Refused(400, f"request body is not valid JSON ({exc}); send a JSON object") from exc
        if not isinstance(obj, dict):
            raise Refused(400, f"request body must be a JSON object, got {type(obj).__name__}")
        return obj

    async def append(record: dict) -> None:
        await run_in_threadpool(log.append, record)  # fsynced before the caller answers

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "model_version": version}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "curate",
                                            "model_version": version}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = await read_json_body(request)
        messages, body, metadata, user = check_chat(req, limits, name, version, upstream_model)
        t0 = time.monotonic()
        try:
            resp = await client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            await append(error_record(status=502, reason=f"model server: {type(exc).__name__}", messages=messages))
            raise Refused(502, f"the model server is not answering ({type(exc).__name__}); check `curate serve "
                          "--status`", "api_error") from exc
        if resp.status_code != 200:
            try:
                reason = resp.json().get("error", {}).get("message") or resp.text
            except (ValueError, AttributeError):
                reason = resp.text
            status_code = resp.status_code if 400 <= resp.status_code < 500 else 502
            await append(error_record(status=status_code, reason=str(reason)[:2000], messages=messages))
            raise Refused(status_code, f"the model server refused the request: {str(reason)[:500]}")
        data = resp.json()
        choice = data["choices"][0]
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        await append(response_record(
            response_id=response_id, messages=messages, completion=choice["message"].get("content") or "",
            model_version=version, served_model=upstream_model, finish_reason=choice.get("finish_reason") or "",
            slice=metadata.get("slice"), user=user,
            params={k: v for k, v in body.items() if k not in ("messages", "model")},
            usage=data.get("usage") or {}, latency_ms=1000 * (time.monotonic() - t0),
        ))
        known[response_id] = version
        data.update(id=response_id, model=name, model_version=version)
        return JSONResponse(data, headers={"X-Curate-Model-Version": version})

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        check_key(request)
        req = await read_json_body(request)
        response_id, rating, comment = check_feedback(req, limits, known)
        feedback_id = f"fb-{uuid.uuid4().hex}"
        await append(feedback_record(feedback_id=feedback_id, response_id=response_id, rating=rating,
                                     comment=comment, model_version=known[response_id]))
        return {"id": feedback_id, "response_id": response_id, "rating": rating, "status": "recorded"}

    return app


def main(argv: list[str] | None = None) -> int:
    """The logging-layer process: `python -m curation.serving.serve --state <serve.json>` (started by `curate serve`)."""
    from preference.plumbing.env import apply_env_defaults

    apply_env_defaults()
    parser = argparse.ArgumentParser(description="curate serve: the logging layer (started by `curate serve`)")
    parser.add_argument("--state", type=Path, required=True, help="serve.json written by `curate serve`")
    args = parser.parse_args(argv)
    import uvicorn

    from curation.serving.traffic import TrafficLog, read_traffic

    state = read_json(args.state)
    key = os.environ.get(state["api_key_env"], "")
    if len(key) < 8:
        print(f"error: ${state['api_key_env']} is not set (or shorter than 8 characters)", file=sys.stderr)
        return 2
    known = {rid: r.model_version for rid, r in read_traffic(state["traffic"]).responses.items()}
    log = TrafficLog(state["traffic"], rotate_bytes=state["limits"]["rotate_bytes"])
    app = create_app(state, key, log, known)
    gw = state["gateway"]
    uvicorn.run(app, host=gw["host"], port=gw["port"], log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
