import html as html_lib
import json
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from curation.config import RoundConfig
from curation.steps.report import run_report
from preference.plumbing.io import read_json, read_jsonl, read_rows, write_json, write_rows
from preference.plumbing.store import Project

# under `pytest -n` (make test) these tests share one worker: the session's tiny rounds are made once
pytestmark = pytest.mark.xdist_group("tiny_rounds")


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

    from curation.steps.push import AnnotationConfig
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
    assert "<h2 id='reviewers'>Reviewers</h2>" in html and "unreliable annotators: sim-2" in html
    for name, row in annotators.items():
        assert f"<td class='short'>{name}</td><td class='num'>{row['answers']}</td>" in html
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


# ------------------------------------------------------------------ a real two-round project, read in a browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Measures the laid-out page after load and leaves the figures in a <pre id="probe"> for --dump-dom.
PROBE = """<script>
window.addEventListener('load', () => {
  const box = el => el.getBoundingClientRect();
  const page = document.documentElement;
  const out = {clientWidth: page.clientWidth, scrollWidth: page.scrollWidth,
    images: [...document.images].map(i => ({complete: i.complete, natural: i.naturalWidth, shown: box(i).width,
                                             right: box(i).right})),
    tables: [...document.querySelectorAll('table')].map(t => ({scroll: t.parentElement.scrollWidth,
                                                               client: t.parentElement.clientWidth,
                                                               right: box(t).right}))};
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args, tmp_path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_report_fits_a_1200px_browser_with_every_figure(tiny_rounds, tmp_path):
    report = tiny_rounds.round(2) / "report" / "report.html"
    figures = read_json(tiny_rounds.round(2) / "report" / "manifest.json")["counts"]["figures"]
    assert figures >= 2  # score distributions and the cross-round panel at least
    shot = tmp_path / "report.png"
    out = chromium("--window-size=1200,2400", f"--screenshot={shot}", report.as_uri(), tmp_path=tmp_path)
    assert shot.is_file(), out.stderr[-2000:]
    assert png_size(shot) == (1200, 2400)
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(report.read_text() + PROBE)
    out = chromium("--window-size=1200,900", "--dump-dom", probe_page.as_uri(), tmp_path=tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout)
    assert found, out.stderr[-2000:]
    page = json.loads(html_lib.unescape(found.group(1)))
    assert page["scrollWidth"] <= page["clientWidth"] <= 1200  # nothing overflows sideways
    assert len(page["images"]) == figures
    for img in page["images"]:  # loaded, shown at full size (not shrunk to unreadable), inside the page
        assert img["complete"] and img["natural"] > 0 and img["shown"] >= img["natural"] - 1, img
        assert img["right"] <= page["clientWidth"], img
    assert page["tables"] and all(t["scroll"] <= t["client"] and t["right"] <= page["clientWidth"]
                                  for t in page["tables"]), page["tables"]


def test_report_shows_snippets_timings_agreement_and_rounds(tiny_rounds):
    from curation.steps.report import _log_scale, snippet
    from preference.plumbing.console import wall_time

    r1, r2 = tiny_rounds.round(1), tiny_rounds.round(2)
    page = (r2 / "report" / "report.html").read_text()
    # selection: prompt and answer snippets beside the ids
    prompts = {p["id"]: p["messages"] for p in read_rows(r2 / "pool" / "prompts.parquet")}
    records = {r["record_id"]: r for r in read_jsonl(r2 / "push" / "records.jsonl")}
    for row in read_rows(r2 / "select" / "selected.parquet"):
        last_user = [m["content"] for m in prompts[row["prompt_id"]] if m["role"] == "user"][-1]
        assert html_lib.escape(f"{row['prompt_id']} · {row['slice']}\n{snippet(last_user)}") in page
        first_answer = records[row["prompt_id"]]["completions"][0]["text"]
        assert html_lib.escape(f"1. {snippet(first_answer, 90)}") in page
    # per-step wall time from the manifests
    for step in ("generate", "score", "train_reward", "evaluate"):
        seconds = read_json(r2 / step / "manifest.json")["seconds"]
        assert re.search(rf"<td class='short'>{step}</td>.*?<td class='short'>{re.escape(wall_time(seconds))}</td>",
                         page), step
    # across rounds: labels used, held-out accuracy, Kendall τ and Krippendorff α from the real agreement.json
    for number, rnd in ((1, r1), (2, r2)):
        agreement = read_json(rnd / "pull" / "agreement.json")
        accuracy = read_json(rnd / "evaluate" / "metrics.json")["reward"]["accuracy"]
        tau, alpha = agreement["ranking"]["kendall_tau_mean"], agreement["harm"]["alpha_nominal_sets"]
        row = re.search(rf"<tr><td class='num'>{number}</td>(.*?)</tr>", page.split("Labels used so far")[-1])
        assert row, number
        assert f"{accuracy:.3f}" in row.group(1) and f"{tau:.3f}" in row.group(1)
        assert (f"{alpha:.3f}" if alpha is not None else "<td class='short'>-</td>") in row.group(1)
    assert "labels requested so far: strategy arm 12, random arm 4" in page
    # the learning-curve forecast (curation.acquisition.budget) in words: next round's expected gain, labels to reach X
    from curation.acquisition.budget import learning_curve
    from preference.plumbing.store import Project

    curve = learning_curve(Project(tiny_rounds.project).round(2))
    gain = curve["expected_gain_next_round"]
    assert html_lib.escape(f"expected gain of the next round (+{gain['labels']} labels): {gain['accuracy']:+.3f}") in page
    for reach in curve["labels_to_reach"]:
        assert f"labels to reach {reach['target']:.3f}: " in page
    # heavy-tailed scores get a log axis, bounded ones do not
    scores = read_rows(r2 / "score" / "prompt_scores.parquet")
    assert _log_scale("prompt_perplexity", np.array([r["prompt_perplexity"] for r in scores]))
    assert not _log_scale("mean_logprob", np.array([r["mean_logprob"] for r in scores]))
