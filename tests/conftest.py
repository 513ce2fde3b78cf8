from preference.plumbing.env import apply_env_defaults

apply_env_defaults()  # the entry point of the test run: environment defaults before torch is imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest_plugins = ["argilla_server_fixture"]  # one local Argilla server for the whole session

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def pytest_collection_modifyitems(config, items):
    """Longest work first, so that `pytest -n auto`'s workers finish together: the tests sharing a session or
    module fixture (`xdist_group`, each group one unit of work on one worker), then `slow` tests, then the rest,
    each in collection order. Without it a large group collected last can keep one worker busy while the other
    idles."""
    def rank(item) -> int:
        if item.get_closest_marker("xdist_group"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: collection order within each rank


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def hh_sample() -> Path:
    """400 real HH-harmless preference pairs shipped with the repo (MIT, see data/hh-rlhf-LICENSE)."""
    return DATA / "hh-harmless-sample.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random Llama + small BPE tokenizer with a ChatML template, built once into the model cache."""
    from training.models import TINY, resolve_model

    return resolve_model(TINY)


@pytest.fixture(scope="session")
def tiny_rounds(tmp_path_factory):
    """Two real tiny-llama rounds made once per session through the CLI (see tests/round_fixture.py)."""
    from round_fixture import make_tiny_rounds

    return make_tiny_rounds(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_project(tiny_rounds) -> Path:
    """The project folder of `tiny_rounds`."""
    return tiny_rounds.project
