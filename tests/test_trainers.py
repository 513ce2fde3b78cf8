"""The trainer table: every consumer (config, round steps, CLI, launch, registry) reads it; one base config maps
onto TRL; report_to reaches TRL; threads and precision come from the hardware module."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from curation.config import RoundConfig
from preference.plumbing.config import ConfigError, from_dict, replace_path
from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import usable_cores
from training.common import TrainConfig
from training.trainers import TRAINERS

ROOT = Path(__file__).resolve().parent.parent


def test_table_entries_are_consistent():
    assert list(TRAINERS)[:2] == ["reward", "dpo"] and "kto" in TRAINERS
    for kind, entry in TRAINERS.items():
        cls = entry.config_class
        assert issubclass(cls, TrainConfig) and cls.section == kind
        assert callable(entry.train_function) and callable(entry.evaluate_function)
        assert entry.step == f"train_{kind}"
    artifacts = [t.artifact for t in TRAINERS.values()]
    assert len(set(artifacts)) == len(artifacts)  # one registry folder per trainer
    assert TRAINERS["reward"].artifact == "reward" and TRAINERS["dpo"].artifact == "policy"
    assert TRAINERS["reward"].role == "reward_model" and TRAINERS["kto"].role == "policy"


def test_importing_the_table_config_and_pipeline_loads_no_torch():
    code = ("import sys, training.trainers, curation.config, curation.round; "
            "print(json.dumps([m in sys.modules for m in ('torch', 'trl', 'transformers')]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, False, False]


def test_round_config_steps_and_cli_come_from_the_table():
    from curation.round import STEPS, step_function, step_name

    cfg = RoundConfig()
    for kind, entry in TRAINERS.items():
        assert isinstance(getattr(cfg, kind), entry.config_class)
    names = [step_name(fn) for fn in STEPS]
    train = [n for n in names if n.startswith("train_")]
    assert train == [t.step for t in TRAINERS.values()]  # table order
    assert names.index("pull") + 1 == names.index(train[0]) and names.index(train[-1]) + 1 == names.index("evaluate")
    for name in names:
        assert step_name(step_function(name)) == name
    assert not cfg.kto.enabled and cfg.reward.enabled and cfg.dpo.enabled  # KTO is opt-in
    # --set and unknown keys work on the derived sections exactly as on hand-written ones
    cfg = replace_path(cfg, "kto.enabled", "true")
    assert cfg.kto.enabled
    assert replace_path(cfg, "reward.lora_r", "4").reward.lora_r == 4
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        replace_path(cfg, "kto.nope", "1")
    with pytest.raises(ConfigError, match="kto.betta: unknown key for KTOTrainConfig"):
        from_dict(RoundConfig, {"kto": {"betta": 0.1}})
    with pytest.raises(ConfigError, match="batch_size must be ≥ 2 for loss_type kto"):
        from_dict(RoundConfig, {"kto": {"batch_size": 1}})


def test_curate_train_help_lists_every_trainer():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-m", "curation.cli", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    for kind in TRAINERS:
        assert kind in out.stdout


def test_a_new_trainer_is_one_module_and_one_entry(tmp_path):
    """Adding an entry (pointing at a new module) gives a config section, a round step and a CLI command."""
    module = tmp_path / "my_trainer.py"
    module.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar
        from training.common import TrainConfig

        @dataclass
        class MyConfig(TrainConfig):
            section: ClassVar[str] = "mine"
            trl_config: ClassVar[str] = "SFTConfig"
            enabled: bool = False

        def train(pairs, cfg, work_dir, *, seed=0, progress=True):
            return {}
    '''))
    code = textwrap.dedent('''
        import json
        from training.trainers import TRAINERS, Trainer
        TRAINERS["mine"] = Trainer(kind="mine", config="my_trainer:MyConfig", train="my_trainer:train",
                                   evaluate="training.evaluate:evaluate_policy_dir", artifact="mine", role="policy",
                                   help="My trainer.")
        from curation.config import RoundConfig
        from curation.round import STEPS, step_name
        from typer.testing import CliRunner
        from curation.cli import app
        cli = CliRunner().invoke(app, ["train", "mine", "--help"])
        print(json.dumps({"section": type(RoundConfig().mine).__name__, "steps": [step_name(fn) for fn in STEPS],
                          "cli": cli.exit_code == 0 and "My trainer." in cli.output}))
    ''')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["section"] == "MyConfig" and got["cli"]
    assert got["steps"].index("train_mine") == got["steps"].index("evaluate") - 1


# ------------------------------------------------------------------------------------------- one TRL mapping
@pytest.mark.parametrize("kind", list(TRAINERS))
def test_common_fields_map_onto_trl_once(kind, tmp_path):
    cls = TRAINERS[kind].config_class
    cfg = cls(learning_rate=2e-4, batch_size=3 if kind != "kto" else 4, grad_accum=5, epochs=2.0, max_steps=7,
              warmup_ratio=0.2, save_steps=3, logging_steps=2, bf16=False, report_to=[],
              trl={"max_grad_norm": 0.25})
    args = cfg.to_trl(tmp_path, seed=3, progress=False)
    assert type(args).__name__ == cls.trl_config
    assert (args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        2e-4, cfg.batch_size, 5)
    assert (args.num_train_epochs, args.max_steps, args.save_steps, args.logging_steps) == (2.0, 7, 3, 2)
    assert args.seed == 3 and args.bf16 is False and args.report_to == [] and args.max_grad_norm == 0.25
    assert args.output_dir == str(tmp_path) and args.disable_tqdm
    for name, value in cfg.trl_kwargs().items():  # the method's own arguments
        assert getattr(args, name) == value, name
    with pytest.raises(CurateError, match=f"{kind}.trl.not_a_field"):
        dataclasses.replace(cfg, trl={"not_a_field": 1}).to_trl(tmp_path, seed=0, progress=False)


def test_configs_share_one_base_and_keep_their_defaults():
    from training.dpo import DPOTrainConfig
    from training.kto import KTOTrainConfig
    from training.reward import RewardTrainConfig

    common = {f.name for f in dataclasses.fields(TrainConfig)}
    for cls in (RewardTrainConfig, DPOTrainConfig, KTOTrainConfig):
        assert common <= {f.name for f in dataclasses.fields(cls)}
    assert RewardTrainConfig().learning_rate == 3e-4 and RewardTrainConfig().save_steps == 20
    assert DPOTrainConfig().batch_size == 2 and DPOTrainConfig().grad_accum == 4
    assert KTOTrainConfig().enabled is False


# ----------------------------------------------------------------------------------------- threads, report_to
def test_threads_default_to_all_usable_cores_split_across_processes():
    from training.dpo import DPOTrainConfig

    assert DPOTrainConfig().threads_per_process(1) == usable_cores()
    assert DPOTrainConfig().threads_per_process(2) == max(1, usable_cores() // 2)
    assert DPOTrainConfig(threads=3).threads_per_process(2) == 3
    with pytest.raises(ValueError, match="threads"):
        DPOTrainConfig(threads=0)


def test_report_to_defaults_to_tensorboard_and_checks_integrations():
    from training.common import tensorboard_available
    from training.dpo import DPOTrainConfig

    assert DPOTrainConfig().reporters() == (["tensorboard"] if tensorboard_available() else [])
    assert DPOTrainConfig(report_to=[]).reporters() == []
    with pytest.raises(CurateError, match="'tensorbored' is not a TRL/transformers integration"):
        DPOTrainConfig(report_to=["tensorbored"]).reporters()
    for name in ("mlflow", "wandb"):
        cfg = DPOTrainConfig(report_to=[name])
        if importlib.util.find_spec(name) is None:
            with pytest.raises(CurateError, match=f"dpo.report_to: {name} is not installed"):
                cfg.reporters()
        else:
            assert cfg.reporters() == [name]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events_by_default_none_with_empty_report_to(tmp_path, hh_sample, tiny_model):
    from training.data import load_hh_pairs
    from training.dpo import DPOTrainConfig, train_dpo

    pairs = load_hh_pairs(hh_sample)[:4]
    small = dict(base_model="tiny-llama", max_steps=1, batch_size=2, grad_accum=1, threads=1, lora_r=2, lora_alpha=4,
                 max_prompt_length=32, max_completion_length=8, logging_steps=1)
    train_dpo(pairs, DPOTrainConfig(**small), tmp_path / "tb", progress=False)
    events = list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not list((tmp_path / "tb").rglob("runs"))  # not transformers' default output_dir/runs/
    train_dpo(pairs, DPOTrainConfig(**small, report_to=[]), tmp_path / "off", progress=False)
    assert not list((tmp_path / "off").rglob("events.out.tfevents.*"))
