"""Real reviewers through the real Argilla web UI, from `curate reviewers add` to a trained reward model.

A round of configs/tiny.yaml (the dummy backend writes the answers; 4 records, no gold, no suggestions: round 1 has
no reward model) goes to the session's
local Argilla server with `simulate_reviewers: false`. Two reviewers are added with `curate reviewers add`; alice
signs in to headless Chromium, opens the queue link the push printed and answers all 4 records with the mouse and
keyboard (a tie, harm chips, one correction); `curate round run` then exits 11 and says who has pending records;
bob answers the first two; `curate round run` continues: the pull must give exactly the pairs, harm exclusions,
correction and agreement figures these clicks imply, and the round goes on to a trained reward model.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from argilla_browser import answer, reviewer_browser, shown_prompt, sign_in

from preference.plumbing.io import read_json, read_jsonl, read_rows
from preference.schema import Response

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = [pytest.mark.argilla, pytest.mark.slow, pytest.mark.xdist_group("argilla")]

# what each reviewer clicks, by queue position: ranks per answer slot (1 = best; equal = a tie), harm chips per slot
ALICE = [
    {"ranks": {1: 1, 2: 1, 3: 2}, "harms": {1: ["none"]}},                        # a tie at the top
    {"ranks": {1: 2, 2: 1, 3: 3}, "harms": {1: ["none"], 2: ["none"], 3: ["violence"]}},
    {"ranks": {1: 1, 2: 2, 3: 3}, "correction": "A corrected answer, typed in the browser."},
    {"ranks": {1: 1, 2: 3, 3: 2}},
]
BOB = [
    {"ranks": {1: 1, 2: 2, 3: 3}},
    {"ranks": {1: 2, 2: 1, 3: 3}, "harms": {1: ["none"], 2: ["none"], 3: ["violence"]}},
]
# the pairs these answers imply (Borda: an answer scores (answers it beats + ½ per answer tied with it) / 2,
# averaged over the record's reviewers — alice's 1=2>3 gives 0.75, 0.75, 0 and bob's 1>2>3 1, 0.5, 0; a pair for
# every score difference; an answer flagged by half the reviewers or more is harmful: rejected against
# every clean answer with margin ≥ 1; a correction beats the best answer by 0.5):
#   (chosen slot | "correction", rejected slot, margin, rejected_harmful)
EXPECTED = [
    [(1, 2, 0.25, False), (1, 3, 0.875, False), (2, 3, 0.625, False)],            # alice 1=2>3, bob 1>2>3
    [(2, 1, 0.5, False), (2, 3, 1.0, True), (1, 3, 1.0, True)],                   # both 2>1>3, both flag 3
    [(1, 2, 0.5, False), (1, 3, 1.0, False), (2, 3, 0.5, False), ("correction", 1, 0.5, False)],
    [(1, 3, 0.5, False), (1, 2, 1.0, False), (3, 2, 0.5, False)],
]
TAU_TIE = 2 / math.sqrt(6)  # Kendall τ-b of (1, 1, 2) vs (1, 2, 3): 2 concordant pairs, 1 tie


def curate(*args, env, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, input=stdin)


def write_config(path: Path, project: Path, url: str) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["project"] = str(project)
    cfg["pool"]["sources"][0]["limit"] = 12
    cfg["selection"] = {"k": 4, "random_share": 0.25}
    cfg["annotation"] = {
        "backend": "argilla", "completions_per_record": 3, "simulate_reviewers": False,
        "argilla": {"url": url, "min_submitted": 2, "min_responses": 6, "rating_scale": 0},
        "review": {"wait": False},
    }
    cfg["dpo"]["enabled"] = False
    for section in ("generation", "scoring"):  # what is reviewed matters here, not which model wrote it
        cfg[section]["backend"] = {"name": "dummy"}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_reviewers_in_the_web_ui_to_a_trained_reward_model(argilla_server, tmp_path):
    with reviewer_browser(tmp_path) as browser:  # skips (fails in CI) before any work when chromium is missing
        project = tmp_path / "browser-review"  # the dataset is named after it: unique on the shared server
        config = write_config(tmp_path / "round.yaml", project, argilla_server.url)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ARGILLA_API_KEY": argilla_server.api_key}
        env.pop("ARGILLA_API_URL", None)
        c = ["-c", config]

        # the round runs up to the push and waits: nobody has answered
        first = curate("round", "run", *c, "-q", env=env)
        assert first.returncode == 11, first.stderr[-3000:]
        assert "0 submitted responses are in" in first.stdout and "rerun `curate round run`" in first.stdout
        r1 = project / "round-0001"
        push = read_json(r1 / "push" / "manifest.json")["argilla"]
        queue = push["queue_url"]
        assert queue.endswith("annotation-mode?sort=metadata.queue.asc")
        records = read_jsonl(r1 / "push" / "records.jsonl")
        assert len(records) == 4 and all(len(r["completions"]) == 3 for r in records)
        assert [r["metadata"]["queue"] for r in records] == [1, 2, 3, 4]
        assert [r["metadata"]["rank"] for r in records] == sorted(r["metadata"]["rank"] for r in records)

        # the team lead adds two reviewers (passwords through stdin; an existing name is refused in one line)
        for name in ("alice", "bob"):
            out = curate("reviewers", "add", name, *c, "--password-stdin", env=env, stdin=f"{name}-secret-pw\n")
            assert out.returncode == 0, out.stderr
            assert f"reviewer {name} (annotator) created and added to workspace 'curate'" in out.stdout
            assert f"{name}-secret-pw" not in out.stdout + out.stderr
        again = curate("reviewers", "add", "alice", *c, "--password-stdin", env=env, stdin="x\n")
        assert again.returncode == 2 and "already in workspace 'curate'" in again.stderr

        def text(record: dict) -> str:
            return " ".join(record["prompt"]["messages"][-1]["content"].split())[:60]

        # alice answers the whole queue, most useful record first
        page = sign_in(browser, argilla_server.url, "alice", "alice-secret-pw")
        page.goto(queue)
        for i, plan in enumerate(ALICE):
            assert text(records[i]) in " ".join(shown_prompt(page).split()), f"queue position {i + 1}"
            answer(page, **plan, shot=tmp_path / f"alice-{i}.png")
        page.context.close()

        # not enough answers yet (min_responses 6): a waiting round exits 11 and says who has pending records
        waiting = curate("round", "run", *c, "-q", env=env)
        assert waiting.returncode == 11, waiting.stderr[-3000:]
        assert "4 submitted responses are in" in waiting.stdout
        assert "alice 4/0" in waiting.stdout and "bob 0/4" in waiting.stdout
        status = curate("status", *c, env=env)
        assert " pull " in status.stdout and "waiting" in status.stdout and "bob 0/4" in status.stdout
        listed = curate("reviewers", "list", *c, env=env)
        row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("bob "))
        assert row[:7] == ["bob", "annotator", "0", "0", "0", "4", "-"]

        # bob answers the first two records of his queue
        page = sign_in(browser, argilla_server.url, "bob", "bob-secret-pw")
        page.goto(queue)
        for i, plan in enumerate(BOB):
            assert text(records[i]) in " ".join(shown_prompt(page).split()), f"queue position {i + 1}"
            answer(page, **plan, shot=tmp_path / f"bob-{i}.png")
        page.context.close()

    # enough answers: the round continues through the pull into training
    done = curate("round", "run", *c, "-q", env=env)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert "round 1 finished" in done.stdout
    pull = r1 / "pull"
    responses = [Response.from_row(r) for r in read_jsonl(pull / "responses.jsonl")]
    slots = [[c["id"] for c in r["completions"]] for r in records]
    got = {(r.annotator, r.record_id): r for r in responses}
    assert len(responses) == 6 and all(r.status == "submitted" for r in responses)
    for who, plans in (("alice", ALICE), ("bob", BOB)):
        for i, plan in enumerate(plans):
            r = got[(who, records[i]["record_id"])]
            assert r.ranks == {slots[i][s - 1]: rank for s, rank in plan["ranks"].items()}
            assert r.harm == {slots[i][s - 1]: [x for x in labels if x != "none"]
                              for s, labels in plan.get("harms", {}).items()}
            assert r.correction == plan.get("correction", "")

    pairs = read_rows(pull / "pairs.parquet")
    want = set()
    for i, rows in enumerate(EXPECTED):
        for chosen, rejected, margin, harmful in rows:
            chosen_id = "corr-" if chosen == "correction" else slots[i][chosen - 1]
            want.add((records[i]["record_id"], chosen_id, slots[i][rejected - 1], margin, harmful))
    have = {(p["prompt_id"], "corr-" if p["chosen_id"].startswith("corr-") else p["chosen_id"], p["rejected_id"],
             round(p["margin"], 6), p["rejected_harmful"]) for p in pairs}
    assert have == want and len(pairs) == 13
    correction = next(p for p in pairs if p["chosen_id"].startswith("corr-"))
    assert correction["chosen"] == [{"role": "assistant", "content": ALICE[2]["correction"]}]
    assert {tuple(p["annotators"]) for p in pairs if p["prompt_id"] == records[0]["record_id"]} == {("alice", "bob")}

    agreement = read_json(pull / "agreement.json")
    assert agreement["ranking"]["kendall_tau_mean"] == pytest.approx((TAU_TIE + 1.0) / 2)
    assert agreement["harm"]["alpha_nominal_sets"] == pytest.approx(1.0)  # both flagged the same answer
    counts = read_json(pull / "manifest.json")["counts"]
    assert counts["submitted"] == 6 and counts["annotators"] == 2 and counts["pairs"] == 13
    assert counts["pairs_rejected_harmful"] == 2 and counts["routed_to_review"] == 1  # the flagged record
    annotators = read_json(pull / "annotators.json")
    assert annotators["alice"]["corrections"] == 1 and annotators["alice"]["seconds_per_record"] is not None

    # ... and a reward model trained on these pairs
    train = read_json(r1 / "train_reward" / "manifest.json")
    assert not train.get("skipped"), train["counts"]
    assert (r1 / "report" / "manifest.json").is_file()
    print("train_reward counts:", train["counts"])
