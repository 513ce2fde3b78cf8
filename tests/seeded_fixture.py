"""A project seeded from existing labels, made once per test session through the CLI: `curate round run` on the
tiny model (dummy generation and scoring: no vLLM, seconds) bootstraps round 0 from two seed-label files (TRL
conversational pairs written by `datasets`, HH transcripts whose prompts are in the pool) plus TRL unpaired
judgements, then runs round 1.

    def test_x(seeded): project, args, completed = seeded      # the session fixture (conftest.py)

Tests read what the real steps wrote (tests/test_bootstrap.py, tests/test_export.py); `args` are the CLI's
`-c … --set …` for more commands on the same project.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SEED_OVERLAP = 3  # seed pairs whose prompts are in the tiny pool (its first 24 HH prompts)
UNPAIRED = 4  # imported unpaired judgements


def curate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def seed_files(folder: Path, hh_sample: Path) -> list[dict]:
    """Three seed sources: 10 HH pairs the pool does not have (rows 40-49 of the sample) as TRL conversational pairs
    (written by `datasets`), the pool's first prompts' HH rows (their prompts must leave the pool), and
    UNPAIRED judgements in TRL's unpaired format (the chosen / rejected answers of rows 50-51)."""
    import datasets

    from preference.schema import parse_hh_pair

    rows = [json.loads(line) for line in gzip.open(hh_sample, "rt")]
    trl = []
    for row in rows[40:50]:
        prompt, chosen, rejected = parse_hh_pair(row)
        trl.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    datasets.Dataset.from_list(trl).to_json(str(folder / "trl.jsonl"))
    (folder / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1 : 1 + SEED_OVERLAP]))
    unpaired = []
    for row in rows[50:50 + UNPAIRED // 2]:
        prompt, chosen, rejected = parse_hh_pair(row)
        unpaired += [{"prompt": prompt, "completion": [{"role": "assistant", "content": text}], "label": label}
                     for text, label in ((chosen, True), (rejected, False))]
    datasets.Dataset.from_list(unpaired).to_parquet(str(folder / "kto.parquet"))
    return [{"path": str(folder / "trl.jsonl"), "name": "last-quarter", "license": "mit"},
            {"path": str(folder / "hh.jsonl"), "format": "jsonl", "license": "mit", "name": "hh"},
            {"path": str(folder / "kto.parquet"), "name": "thumbs", "license": "cc-by-4.0"}]


def bootstrap_args(project: Path, sources: list[dict]) -> list[str]:
    sets = {"project": str(project), "labels.sources": json.dumps(sources),
            "labels.train": "{reward: {max_steps: 3}, dpo: {max_steps: 1}}", "reward.ensemble": "2",
            "reward.max_steps": "2", "generation.backend.name": "dummy", "generation.models": "[dummy-a]",
            "scoring.backend.name": "dummy", "scoring.committee": "[dummy-a, dummy-b]",
            "evaluation.heldout_size": "20", "selection.k": "6"}
    return ["-c", TINY, *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]


def make_seeded(tmp_path_factory, hh_sample):
    """A project whose `curate round run` bootstrapped from seed labels, then ran round 1."""
    folder = tmp_path_factory.mktemp("seeded")
    args = bootstrap_args(folder / "proj", seed_files(folder, hh_sample))
    out = curate("round", "run", *args, "-q")
    assert out.returncode == 0, out.stderr[-3000:]
    return folder / "proj", args, out


