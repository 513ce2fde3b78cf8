import re

import numpy as np

from curation.config import RoundConfig
from curation.report import run_report
from preference.plumbing.io import write_json, write_rows
from preference.plumbing.store import Project


def _step(rnd, name, files):
    run = rnd.start_step(name, {"x": 1})
    with run:
        for fname, content in files.items():
            if fname.endswith(".parquet"):
                write_rows(run.path / fname, content)
            else:
                write_json(run.path / fname, content)
        run.counts["items"] = 3


def test_report_embeds_plots_and_reads_artifacts(tmp_path):
    cfg = RoundConfig(project=tmp_path)
    rnd = Project(tmp_path).round(create=True)
    rng = np.random.default_rng(0)
    _step(rnd, "pool", {})
    scores = [{"prompt_id": f"p{i}", "slice": "s", "prompt_perplexity": float(rng.uniform(2, 9)),
               "mean_logprob": float(-rng.uniform(0.5, 3)), "committee_disagreement": float(rng.uniform())}
              for i in range(40)]
    _step(rnd, "score", {"prompt_scores.parquet": scores})
    selected = [{"prompt_id": "p1", "slice": "s", "arm": "strategy", "strategy": "uncertainty", "score": 0.9,
                 "rank": 1, "reason": "prompt_perplexity 8.1 (p95)"},
                {"prompt_id": "p2", "slice": "s", "arm": "random", "strategy": "random", "score": 0.0, "rank": 2,
                 "reason": "random arm"}]
    _step(rnd, "select", {"selected.parquet": selected})
    _step(rnd, "pull", {"agreement.json": {"kendall_tau": 0.41, "krippendorff_alpha": 0.3},
                        "annotators.json": {"ann-1": {"submitted": 2}},
                        "pairs.parquet": [{"prompt_id": "p1", "margin": 2.0, "rejected_harmful": True}]})
    _step(rnd, "train_reward", {"log_history.json": {"log_history": [{"step": 1, "loss": 0.7},
                                                                     {"step": 2, "loss": 0.6}]}})
    manifest = run_report(cfg, rnd, progress=False)
    html = (rnd.step("report").path / "report.html").read_text()
    assert manifest["counts"]["figures"] == 2  # score histograms + reward loss curve
    assert len(re.findall(r"data:image/png;base64,", html)) == 2
    for text in ("uncertainty", "random arm", "kendall_tau: 0.410", "pairs: 1 from 1 prompts",
                 "strategy arm 1, random arm 1", "train_dpo: has not run"):
        assert text in html, text
    summary = (rnd.step("report").path / "summary.txt").read_text()
    assert "Labels used so far" in summary
    # unchanged inputs: kept; a changed upstream step: rebuilt, never stale
    assert run_report(cfg, rnd, progress=False) == manifest
    _step(rnd, "evaluate", {"metrics.json": {"reward": {"accuracy": 0.61}}})
    (rnd.step("evaluate").path / "metrics.txt").write_text("all  60  0.617  [0.483, 0.733]\n")
    _step(rnd, "gate", {"decision.json": {"promote": False, "version": "v0002", "champion": "v0001",
                                          "reasons": ["reward.accuracy: +0.010 ≤ min_improvement 0.02"],
                                          "comparisons": {"reward.accuracy": {"candidate": 0.617, "champion": 0.607,
                                                                              "delta": 0.01}}}})
    rebuilt = run_report(cfg, rnd, progress=False)
    html = (rnd.step("report").path / "report.html").read_text()
    assert rebuilt["key"] != manifest["key"]
    assert "[0.483, 0.733]" in html and "candidate v0002 not promoted" in html
    assert "reward.accuracy: candidate 0.617 vs champion 0.607, delta +0.010" in html
