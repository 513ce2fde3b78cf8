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
def tiny_sentence_model(tmp_path_factory) -> Path:
    """A tiny random sentence-transformers folder (2-layer BERT, WordPiece vocabulary of a few dozen words, mean
    pooling, L2 normalization), saved by the library itself as a real one is."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-st")
    words = sorted(set("the quick brown fox jumps over lazy dog how do i bake bread at home mix flour water salt "
                       "yeast can t help with that but here is a safer alternative what capital of france".split()))
    letters = "abcdefghijklmnopqrstuvwxyz"
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters,
                                               *(f"##{c}" for c in letters)]) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len((root / "vocab.txt").read_text().split()), hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(root / "bert")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True).save_pretrained(root / "bert")
    modules = [st_models.Transformer(str(root / "bert"), max_seq_length=64), st_models.Pooling(32, "mean"),
               st_models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="session")
def tiny_rounds(tmp_path_factory):
    """Two real tiny-llama rounds made once per session through the CLI (see tests/round_fixture.py)."""
    from round_fixture import make_tiny_rounds

    return make_tiny_rounds(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_project(tiny_rounds) -> Path:
    """The project folder of `tiny_rounds`."""
    return tiny_rounds.project


@pytest.fixture(scope="session")
def seeded(tmp_path_factory, hh_sample):
    """A project bootstrapped from seed labels by `curate round run`, then round 1 (tests/seeded_fixture.py)."""
    from seeded_fixture import make_seeded

    return make_seeded(tmp_path_factory, hh_sample)
