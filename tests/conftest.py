import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import preference  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


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
