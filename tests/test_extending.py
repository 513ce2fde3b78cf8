"""The README's "Extending" section stays true: every file it names exists, every table it names is a registry in
the file it names, and every base class it names is defined there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def extending_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Extending", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return rows[1:]  # without the header


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_every_extension_point_names_real_files_tables_and_bases():
    rows = extending_rows()
    assert len(rows) == 5
    for add, touch, table, tests in rows:
        files = [f for f in re.findall(r"`([\w/<>]+\.py)`", touch) if "<" not in f]
        assert files and len(re.findall(r"`[\w/<>]+\.py`", touch)) <= 2, add  # at most two files to touch
        defined = set().union(*(top_level_names(ROOT / f) for f in files))
        registry = re.match(r"\|? ?`(\w+)`", table.strip()).group(1)
        assert registry in defined, (add, registry, files)
        for base in re.findall(r"a `(\w+)` (?:subclass|entry)", touch):
            assert base in defined or any(base in top_level_names(p) for p in (ROOT / "training").glob("*.py")), base
        for test in re.findall(r"`(tests/[\w/]+\.py)`", tests):
            assert (ROOT / test).is_file(), test


def test_the_registries_hold_what_the_loop_runs():
    from curation.acquisition.strategies import STRATEGIES, make
    from curation.backends import BACKENDS, backend_class
    from preference.questions import QUESTIONS
    from training.trainers import TRAINERS

    assert {"vllm", "transformers", "dummy"} <= set(BACKENDS) and all(backend_class(n) for n in BACKENDS)
    assert all(make(name).name == name for name in STRATEGIES)
    assert {"ranking", "harm"} <= set(QUESTIONS) and {"reward", "dpo", "kto"} <= set(TRAINERS)


def test_the_layout_shows_the_loop():
    """Each step function lives in `curation/steps/<step>.py` (the trainers' steps in `train.py`), and STEPS and
    the bootstrap's steps are plain lists of them."""
    from curation.round import BOOTSTRAP_STEPS, STEPS, step_name

    for fn in [*BOOTSTRAP_STEPS, *STEPS]:
        name = step_name(fn)
        module = "curation.steps.train" if name.startswith("train_") else f"curation.steps.{name}"
        assert fn.__module__ == module, (name, fn.__module__)
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_no_import_points_back_up():
    """preference ← training ← curation, and inside curation the libraries (acquisition, backends) and serving
    (which the pool step reads traffic through) never import the steps, the loop or the CLI."""
    above = {"preference": ("training", "curation", "scripts"), "training": ("curation", "scripts"),
             "curation/acquisition": ("curation.steps", "curation.serving", "curation.cli", "curation.round"),
             "curation/backends": ("curation.steps", "curation.serving", "curation.cli", "curation.round",
                                   "curation.acquisition"),
             "curation/serving": ("curation.steps", "curation.cli", "curation.round", "curation.drift")}
    for folder, forbidden in above.items():
        for path in (ROOT / folder).rglob("*.py"):
            bad = sorted(m for m in imports_of(path) if m.split(".")[0] in forbidden or m.startswith(forbidden))
            assert not bad, (path.relative_to(ROOT), bad)


def test_every_public_name_list_names_what_the_module_has():
    """`__all__` holds strings naming the module's attributes (so `from X import *` works)."""
    import importlib

    for path in sorted([*(ROOT / "curation").rglob("*.py"), *(ROOT / "preference").rglob("*.py"),
                        *(ROOT / "training").rglob("*.py")]):
        if "__all__" not in path.read_text():
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        bad = [n for n in getattr(module, "__all__", []) if not isinstance(n, str) or not hasattr(module, n)]
        assert not bad, (name, bad)
