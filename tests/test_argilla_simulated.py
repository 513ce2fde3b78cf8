"""Simulated reviewers answering through the real Argilla server's REST API (the demo's annotation path)."""

from __future__ import annotations

import pytest
from test_argilla_e2e import KEY_ENV, config, make_round

from curation.steps.pull import run_pull
from curation.steps.push import AnnotationConfig, load_records, run_push
from preference.aggregate import AggregationConfig
from preference.argilla import ArgillaClient
from preference.argilla_reviewers import submit_simulated
from preference.plumbing.io import read_json, read_jsonl, read_rows
from preference.schema import Response
from preference.simulated import SimulatedAnnotator, SimulatedConfig

# under `pytest -n` (make test) these tests share one worker: one local Argilla server
pytestmark = pytest.mark.xdist_group("argilla")


@pytest.mark.argilla
def test_simulated_reviewers_submit_over_rest(argilla_server, tmp_path, monkeypatch, repo_root):
    monkeypatch.setenv(KEY_ENV, argilla_server.api_key)
    root = tmp_path / "sim"
    rnd = make_round(root)
    cfg = config(root, argilla_server.url)
    cfg.annotation = AnnotationConfig(
        backend="argilla", completions_per_record=3, argilla=cfg.annotation.argilla, simulate_reviewers=True,
        simulated=SimulatedConfig(source=repo_root / "data" / "hh-harmless-sample.jsonl.gz", annotators=2,
                                  noise=0.0),
        aggregation=AggregationConfig(method="borda", pairs="all"),
    )
    pushed = run_push(cfg, rnd, progress=False)
    assert pushed["counts"]["records"] == 5
    manifest = run_pull(cfg, rnd, progress=False)
    pull_dir = rnd.step("pull").path
    assert read_json(pull_dir / "simulated_reviewers.json") == {"simulated_submitted": 10, "simulated_skipped": 0}
    responses = read_jsonl(pull_dir / "responses.jsonl")
    assert {r["annotator"] for r in responses} == {"sim-0", "sim-1"}  # answers came back from the server
    assert all(r["source"].startswith("argilla:") for r in responses)
    assert manifest["counts"]["submitted"] == 10 and manifest["counts"]["pairs"] > 0
    # what came back through the server is exactly what the simulated reviewers answered
    direct = SimulatedAnnotator(cfg.annotation.simulated).annotate(load_records(rnd))
    assert {(r.record_id, r.annotator): (r.ranks, r.harm) for r in direct} == {
        (r["record_id"], r["annotator"]): (Response.from_row(r).ranks, Response.from_row(r).harm) for r in responses
    }
    assert len(read_rows(pull_dir / "pairs.parquet")) == manifest["counts"]["pairs"]
    # rerunning the submission is idempotent: nothing new is submitted
    with ArgillaClient.from_config(cfg.annotation.argilla) as client:
        again = submit_simulated(client, pushed["argilla"]["dataset_id"], "curate",
                                 load_records(rnd), SimulatedAnnotator(cfg.annotation.simulated), k=3)
    assert again == {"simulated_submitted": 0, "simulated_skipped": 10}
