"""The quiet console: library output of a step goes to its log.txt, our bars and summaries to the console,
errors reach the console with the log's path, and nothing of the redirection outlives the step."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

import pytest
from round_fixture import TINY, curate

from preference.plumbing.console import step_console
from preference.plumbing.errors import CurateError
from preference.plumbing.store import Project

# under `pytest -n` (make test) these tests share one worker: the session's tiny rounds are made once
pytestmark = pytest.mark.xdist_group("tiny_rounds")

# Code that runs as a module of our packages (the console routes by who writes, not by what is written).
OUR_CODE = """
from tqdm.auto import tqdm

def work():
    print("our own summary line")
    for _ in tqdm(range(3), desc="our-bar", mininterval=0):
        pass
"""


def our_module():
    namespace = {"__name__": "curation._console_probe"}
    exec(compile(OUR_CODE, "curation/_console_probe.py", "exec"), namespace)
    return namespace["work"]


def library_chatter():
    from tqdm.auto import tqdm

    os.write(2, b"[W native] a C-level warning\n")
    os.write(1, b"native stdout line\n")
    print("library print")
    warnings.warn("library UserWarning", UserWarning, stacklevel=1)
    logging.getLogger("somelib").warning("library logging WARNING")
    for _ in tqdm(range(2), desc="library-bar", mininterval=0):
        pass


def state():
    """Everything the console touches, to compare before and after."""
    root = logging.getLogger()
    return {
        "fd1": (os.fstat(1).st_dev, os.fstat(1).st_ino), "fd2": (os.fstat(2).st_dev, os.fstat(2).st_ino),
        "stdout": sys.stdout, "stderr": sys.stderr, "root_handlers": list(root.handlers), "root_level": root.level,
        "filters": list(warnings.filters), "showwarning": warnings.showwarning,
    }


@pytest.fixture
def step(tmp_path):
    return Project(tmp_path / "proj").round(create=True).step("generate")


@pytest.fixture
def library_logger():
    """A library logger configured before the step (as vLLM's is at import): its handler holds the real stderr."""
    logger = logging.getLogger("somelib")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    logger.propagate = False
    yield logger
    logger.removeHandler(handler)
    logger.propagate = True


def test_library_output_goes_to_the_log_ours_to_the_console(step, capfd, library_logger):
    before = state()
    new_handler = None
    with step_console(step) as log:
        library_chatter()
        our_module()()
        new_handler = logging.StreamHandler()  # a library configuring logging during the step
        logging.getLogger("newlib").addHandler(new_handler)
    out, err = capfd.readouterr()
    assert state() == before
    assert new_handler.stream is sys.stderr  # not the step's routing stream
    logging.getLogger("newlib").removeHandler(new_handler)
    assert "our own summary line" in out and "our-bar" in err
    for text in ("C-level", "native stdout", "library print", "UserWarning", "library logging", "library-bar"):
        assert text not in out + err, text
    text = log.read_text()
    assert log == step.path / "log.txt" and text.startswith("=== ")
    for line in ("[W native] a C-level warning", "native stdout line", "library print", "library UserWarning",
                 "library logging WARNING", "library-bar"):
        assert line in text, line
    assert "our own summary line" not in text and "our-bar" not in text
    assert not list(step.round.path.glob(".*.log"))  # the live log was moved into the step folder


def test_a_command_outside_the_round_steps_is_quiet_too(tmp_path, capfd):
    """`curate drift` (not a round step) runs under `command_console`: library output in <folder>/log.txt,
    appended per run; ours on the console; a failure names the log."""
    from preference.plumbing.console import command_console

    folder = tmp_path / "proj" / "drift"
    before = state()
    for _ in range(2):
        with command_console(folder, "drift") as log:
            library_chatter()
            our_module()()
    out, err = capfd.readouterr()
    assert state() == before and log == folder / "log.txt"
    assert "our own summary line" in out and "our-bar" in err and "library print" not in out + err
    text = log.read_text()
    assert text.count("=== ") == 2 and text.count("library print") == 2 and "our own summary line" not in text
    with pytest.raises(RuntimeError) as info, command_console(folder, "drift"):
        raise RuntimeError("scoring model died")
    assert f"full log of `curate drift`: {log}" in "\n".join(info.value.__notes__)
    assert not list(folder.glob(".*.log"))


def test_a_failing_step_restores_everything_and_names_its_log(step, capfd):
    before = state()
    with pytest.raises(RuntimeError, match="engine died") as info, step_console(step) as log:
        warnings.simplefilter("ignore")  # a library changing filters mid-step
        os.write(2, b"ERROR native: out of memory in kernel\n")
        raise RuntimeError("engine died")
    assert state() == before
    notes = "\n".join(info.value.__notes__)
    assert f"full log of step 'generate': {log}" in notes and "out of memory in kernel" in notes
    text = log.read_text()
    assert "ERROR native: out of memory" in text and "RuntimeError: engine died" in text
    out, err = capfd.readouterr()
    assert "out of memory" not in out + err


def test_a_lost_live_log_never_hides_the_steps_own_error(step, capfd):
    """The console's teardown failing (the live log removed under it, as a second writer once did) must not
    replace the step's real error, and must not fail a step that succeeded; the console is restored either way."""
    before = state()
    live = step.round.path / f".{step.name}.log"
    with pytest.raises(RuntimeError, match="the real error") as info, step_console(step):
        os.write(2, b"some library output\n")
        live.unlink()
        raise RuntimeError("the real error")
    assert state() == before
    assert "log could not be saved" in "\n".join(info.value.__notes__)
    with step_console(step):
        os.write(2, b"output of a run that succeeds\n")
        live.unlink()
    assert state() == before
    assert "step 'generate''s log could not be saved" in capfd.readouterr().err


def test_user_error_before_any_output_leaves_no_folder(step):
    with pytest.raises(CurateError) as info, step_console(step):
        raise CurateError("step 'generate' needs step 'pool', which has not finished")
    assert not step.path.exists() and not getattr(info.value, "__notes__", None)
    assert not list(step.round.path.glob(".*.log"))


def test_runs_append_to_the_log_and_a_skipped_run_adds_nothing(step):
    with step_console(step) as log:
        os.write(2, b"first run\n")
    with step_console(step):
        pass  # e.g. a finished step skipped: no output, nothing appended
    with step_console(step):
        os.write(2, b"second run\n")
    text = log.read_text()
    assert text.count("=== ") == 2 and text.index("first run") < text.index("second run")


def test_verbose_redirects_nothing(step, capfd):
    before = state()
    with step_console(step, verbose=True) as log:
        assert state() == before
        os.write(2, b"native warning shown\n")
    assert log is None and not step.path.exists()
    assert "native warning shown" in capfd.readouterr().err


# ------------------------------------------------------------------------------------- through the CLI, real steps
WARNING = re.compile(r"\bWARNING\b|Warning:")


def test_round_console_is_quiet_and_logs_hold_the_warnings(tiny_rounds):
    first, r1 = tiny_rounds.first, tiny_rounds.round(1)
    console = first.stdout + first.stderr
    assert not WARNING.search(console), [x for x in console.splitlines() if WARNING.search(x)][:5]
    generate_log = (r1 / "generate" / "log.txt").read_text()
    assert len(WARNING.findall(generate_log)) >= 3  # vLLM's and torch's warnings, kept
    assert "generate: 100%" in first.stderr and "score: 100%" in first.stderr  # our bars, with their ETA
    summaries = [x for x in first.stdout.splitlines() if re.match(r"  \w+ +done in ", x)]
    assert len(summaries) == len([p for p in r1.iterdir() if p.is_dir()])  # one summary line per step
    assert "'train_runtime'" in (r1 / "train_dpo" / "log.txt").read_text()  # the trainer's logs: in the log
    assert "'train_runtime'" not in console


def test_failing_step_shows_its_error_and_log_path(tiny_rounds, tmp_path):
    project = tiny_rounds.copy_project(tmp_path / "proj")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = curate("train", "reward", "-c", TINY, "--set", f"project={project}", "--set", f"reward.base_model={broken}",
                 "--force", "--round", "1")
    assert out.returncode != 0
    log = project / "round-0001" / "train_reward" / "log.txt"
    assert "Traceback" in out.stderr and f"full log of step 'train_reward': {log}" in out.stderr
    assert "Traceback" in log.read_text()


def test_verbose_shows_library_output(tiny_rounds, tmp_path):
    project = tiny_rounds.copy_project(tmp_path / "proj")
    out = curate("score", "-c", TINY, "--set", f"project={project}", "--force", "--round", "1", "--verbose")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(WARNING.findall(out.stdout + out.stderr)) >= 3  # vLLM's and torch's warnings, on the console
    assert "round 1 score: done" in out.stdout
    assert not (project / "round-0001" / "score" / "log.txt").exists()  # --force replaced the folder; no log
