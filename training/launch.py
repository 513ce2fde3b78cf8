"""Run a trainer of the table (`training.trainers.TRAINERS`) in this process, or under `accelerate launch`.

`<kind>.num_processes` > 1 makes the round step write its inputs (pairs.parquet, feedback.parquet for trainers
that use feedback, and the config section as JSON) into the work folder and start

    accelerate launch --multi_gpu --num_processes N -m training.launch <kind> --work <folder> --seed S

whose processes train data-parallel (DDP; gloo on CPU, NCCL on GPUs) and whose main process writes the model and
`stats.json`; the step then reads them back. Only the main process writes files, so the output folder is the same
as a single-process run's. Users can run the same command by hand (or with their own `accelerate config`).
Each process gets `threads` torch threads, or (`threads: null`) the usable cores divided by the processes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preference.plumbing.config import from_dict, to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, read_rows, write_json, write_rows
from preference.schema import Feedback, PreferencePair
from training.trainers import TRAINERS, trainer


def _train_here(kind: str, pairs: list[PreferencePair], cfg, work_dir: Path, seed: int, progress: bool,
                feedback: Sequence[Feedback]) -> dict:
    entry = trainer(kind)
    extra = {"feedback": list(feedback)} if entry.uses_feedback else {}
    return entry.train_function(pairs, cfg, work_dir, seed=seed, progress=progress, **extra)


def run_training(kind: str, pairs: list[PreferencePair], cfg, work_dir: str | Path, *, seed: int = 0,
                 progress: bool = True, feedback: Sequence[Feedback] = ()) -> dict[str, Any]:
    """Train `kind` (a key of TRAINERS) on `pairs` (and `feedback`, for trainers that use it) into
    `work_dir/model`; with `cfg.num_processes` > 1 under accelerate."""
    work_dir = Path(work_dir)
    if cfg.num_processes <= 1:
        return _train_here(kind, pairs, cfg, work_dir, seed, progress, feedback)
    inputs = work_dir / "launch"
    write_rows(inputs / "pairs.parquet", [p.to_row() for p in pairs])
    if trainer(kind).uses_feedback:
        write_rows(inputs / "feedback.parquet", [f.to_row() for f in feedback])
    write_json(inputs / "config.json", to_dict(cfg))
    (inputs / "stats.json").unlink(missing_ok=True)
    # --multi_gpu selects accelerate's torchrun launcher (N processes); on a CPU-only machine the trainers then
    # run DDP over gloo (accelerate's --cpu would start a single process unless MPI is set up).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(cfg.num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "training.launch", kind, "--work", str(work_dir),
           "--seed", str(seed)]
    if not progress:
        cmd.append("--quiet")
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads_per_process(cfg.num_processes))}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not (inputs / "stats.json").is_file():
        raise CurateError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}; its output is above. Rerun the step to "
            "resume from the last checkpoint, or set num_processes: 1 to train in this process"
        )
    return read_json(inputs / "stats.json")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of each process started by `accelerate launch -m training.launch`."""
    parser = argparse.ArgumentParser(description="Train one trainer of the table (one accelerate process).")
    parser.add_argument("kind", choices=list(TRAINERS))
    parser.add_argument("--work", type=Path, required=True, help="work folder holding launch/pairs.parquet + config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from accelerate import PartialState

    inputs = args.work / "launch"
    cfg = from_dict(TRAINERS[args.kind].config_class, read_json(inputs / "config.json"))
    pairs = [PreferencePair.from_row(r) for r in read_rows(inputs / "pairs.parquet")]
    feedback_file = inputs / "feedback.parquet"
    feedback = [Feedback.from_row(r) for r in read_rows(feedback_file)] if feedback_file.is_file() else []
    stats = _train_here(args.kind, pairs, cfg, args.work, args.seed, not args.quiet, feedback)
    state = PartialState()
    if state.is_main_process:
        stats["num_processes"] = state.num_processes
        write_json(inputs / "stats.json", stats)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    from preference.plumbing.env import apply_env_defaults

    apply_env_defaults()  # before torch is imported
    sys.exit(main())
