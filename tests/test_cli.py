import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def curate(*args, cwd=ROOT):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "curation.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def test_help_for_every_subcommand():
    top = curate("--help")
    assert top.returncode == 0
    for cmd in ["pool", "generate", "score", "select", "push", "pull", "evaluate", "gate", "status", "validate"]:
        assert cmd in top.stdout
        out = curate(cmd, "--help")
        assert out.returncode == 0 and "Usage" in out.stdout, cmd
    for group, sub in [("train", "reward"), ("train", "dpo"), ("round", "run"), ("round", "status"),
                       ("models", "fetch")]:
        out = curate(group, sub, "--help")
        assert out.returncode == 0 and "Usage" in out.stdout, (group, sub)


def test_validate_shipped_configs():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    out = curate("validate", *configs)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok: ") == len(configs)


def test_validate_bad_config_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("project: x\nselection:\n  k: many\n")
    out = curate("validate", bad)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "selection.k: expected int, got str ('many')" in lines[0]
    missing = tmp_path / "missing.yaml"
    missing.write_text("pool:\n  sources:\n    - path: /no/such/file.jsonl\n")
    out = curate("validate", missing)
    assert out.returncode == 2 and "not found: /no/such/file.jsonl" in out.stderr


def test_pool_status_and_bad_input(tmp_path, hh_sample):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"project: {tmp_path / 'proj'}\npool:\n  sources:\n    - path: {hh_sample}\n      limit: 20\n")
    out = curate("pool", "-c", cfg, "-q")
    assert out.returncode == 0, out.stderr
    assert "round 1 pool: done" in out.stdout and "prompts=" in out.stdout
    out = curate("status", "-c", cfg)
    assert out.returncode == 0 and "pool" in out.stdout and "done" in out.stdout
    out = curate("pool", "-c", cfg, "--set", "pool.sources=[]", "-q")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "different config" in out.stderr
    out = curate("pool", "-c", cfg, "--set", "pool.nope=1")
    assert out.returncode == 2 and "unknown key 'nope'" in out.stderr
    out = curate("pool", "-c", tmp_path / "absent.yaml")
    assert out.returncode == 2 and "config file not found" in out.stderr
    out = curate("generate", "-c", cfg, "--round", "7")
    assert out.returncode == 2 and "round 7 does not exist" in out.stderr


def test_verbose_on_every_step_command_and_round_run():
    from typer.testing import CliRunner

    from curation.cli import app
    from curation.round import STEPS, step_name

    runner = CliRunner()
    commands = [step_name(fn).replace("_", " ").split() for fn in STEPS] + [["round", "run"]]
    for command in commands:
        out = runner.invoke(app, [*command, "--help"], terminal_width=200)
        assert out.exit_code == 0 and "--verbose" in out.output, command
    assert "doctor" in runner.invoke(app, ["--help"]).output


def test_status_shows_each_steps_wall_time_and_the_total(tmp_path, hh_sample):
    from preference.plumbing.console import wall_time
    from preference.plumbing.io import read_json

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"project: {tmp_path / 'proj'}\npool:\n  sources:\n    - path: {hh_sample}\n      limit: 20\n")
    assert curate("pool", "-c", cfg, "-q").returncode == 0
    seconds = read_json(tmp_path / "proj" / "round-0001" / "pool" / "manifest.json")["seconds"]
    out = curate("status", "-c", cfg)
    assert out.returncode == 0, out.stderr
    pool = next(line for line in out.stdout.splitlines() if " pool " in line)
    assert f" {wall_time(seconds)} " in pool and "100 %" in pool
    total = next(line for line in out.stdout.splitlines() if "(total)" in line)
    assert "1/1 done" in total and total.rstrip().endswith(wall_time(seconds))


def test_if_drift_exit_codes_a_cron_job_reads(tmp_path, monkeypatch, capsys):
    """`round run --next --if-drift`: 2 without --next (one line), 10 = nothing to do (no round started),
    11 = a round ran and waits for reviewers (with or without --if-drift), 0 = a round ran to its end."""
    import pytest

    import curation.cli as cli
    import curation.round
    from preference.plumbing.store import Project

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"project: {tmp_path / 'proj'}\n")

    def run(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["curate", "round", "run", "-c", str(cfg), "-q", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        return exc.value.code or 0

    assert run("--if-drift") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use it with --next" in err[0]
    project = Project(tmp_path / "proj")
    with project.round(create=True).start_step("report", {"t": 1}):  # round 1 finished
        pass
    ran = []
    monkeypatch.setattr(curation.round, "run_round", lambda cfg, rnd, **kw: ran.append(rnd.number) or outcome)
    monkeypatch.setattr(cli, "_drift_warrants_round", lambda cfg, quiet, verbose: warranted)
    warranted, outcome = False, "done"
    assert run("--next", "--if-drift") == 10 and not ran and project.round().number == 1
    warranted, outcome = True, "waiting"
    assert run("--next", "--if-drift") == 11 and ran == [2]
    assert run("--next", "--if-drift") == 11 and ran == [2, 2]  # round 2 unfinished: continued, whatever the drift
    assert run("--next") == 11 and ran == [2, 2, 2]  # without --if-drift too: waiting is a state, not a success
    assert run() == 11 and ran == [2, 2, 2, 2]
    outcome = "done"
    assert run() == 0 and ran == [2, 2, 2, 2, 2]
