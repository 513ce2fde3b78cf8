import re
import shutil

import numpy as np

from curation.config import RoundConfig
from curation.report import run_report
from preference.plumbing.io import read_json, read_rows, write_json, write_rows
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


def real_pull(tmp_path, hh_sample):
    """A pull step written by the real pull (simulated backend; 3 reviewers, one of them adversarial)."""
    from test_aggregate import simulated_round

    from curation.annotate import AnnotationConfig
    from preference.simulated import SimulatedConfig

    ann = AnnotationConfig(backend="simulated", simulated=SimulatedConfig(
        source=hh_sample, annotators=3, profiles=["careful", "noisy", "adversarial"]))
    return simulated_round(tmp_path / "reviewed", hh_sample, ann, n=12).step("pull")


def test_report_embeds_plots_and_reads_artifacts(tmp_path, hh_sample):
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
    pulled = real_pull(tmp_path, hh_sample)
    shutil.copytree(pulled.path, rnd.step("pull").path)
    agreement = read_json(pulled.path / "agreement.json")
    pairs = read_rows(pulled.path / "pairs.parquet")
    _step(rnd, "train_reward", {"log_history.json": {"log_history": [{"step": 1, "loss": 0.7},
                                                                     {"step": 2, "loss": 0.6}]}})
    manifest = run_report(cfg, rnd, progress=False)
    html = (rnd.step("report").path / "report.html").read_text()
    assert manifest["counts"]["figures"] == 2  # score histograms + reward loss curve
    assert len(re.findall(r"data:image/png;base64,", html)) == 2
    tau, alpha = agreement["ranking"]["kendall_tau_mean"], agreement["harm"]["alpha_nominal_sets"]
    for text in ("uncertainty", "random arm", f"Kendall τ between annotators&#x27; rankings: mean {tau:.3f}",
                 f"pairs: {len(pairs)} from {len({p['prompt_id'] for p in pairs})} prompts",
                 "strategy arm 1, random arm 1", "train_dpo: has not run"):
        assert text in html, text
    assert alpha is None or f"Krippendorff α on harm flags: label sets {alpha:.3f}" in html
    # the reviewer section: per-annotator table from the real annotators.json, the adversarial one flagged
    annotators = read_json(pulled.path / "annotators.json")
    assert "<h2>Reviewers</h2>" in html and "unreliable annotators: sim-2" in html
    for name, row in annotators.items():
        assert f"<td>{name}</td><td>{row['answers']}</td>" in html
    assert "second-stage review: " in html
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
