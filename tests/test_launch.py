"""Every trainer of the table under `accelerate launch` with 2 processes (DDP over gloo on CPU), tiny model."""

import pytest

from training.data import load_hh_pairs
from training.launch import run_training
from training.trainers import TRAINERS


@pytest.fixture(scope="module")
def pairs(hh_sample):
    return load_hh_pairs(hh_sample)[:16]


SECTION_ARGS = {  # each trainer's own length fields, kept small
    "reward": dict(max_length=64),
    "dpo": dict(max_prompt_length=48, max_completion_length=16),
    "kto": dict(max_prompt_length=48, max_completion_length=16),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TRAINERS))
def test_accelerate_launch_two_processes(kind, pairs, tiny_model, tmp_path):
    common = dict(base_model=str(tiny_model), max_steps=2, batch_size=2, grad_accum=1, threads=1, num_processes=2)
    cfg = TRAINERS[kind].config_class(**common, **SECTION_ARGS.get(kind, {}))
    stats = run_training(kind, pairs, cfg, tmp_path / "work", seed=0, progress=False)
    assert stats["num_processes"] == 2
    model = tmp_path / "work" / "model"
    adapters = list(model.rglob("adapter_model.safetensors"))
    assert adapters and all(a.stat().st_size > 0 for a in adapters)
    assert not list(tmp_path.rglob("*.partial"))  # only the main process wrote, and it finished
