from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from curation.config import RoundConfig, load_config
from preference.plumbing.config import ConfigError, config_hash, from_dict, load_yaml, replace_path

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, RoundConfig)
    for src in cfg.pool.sources:
        assert Path(src.path).exists() or not Path(src.path).is_absolute()


def test_shipped_configs_exist():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    n: int = 1
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    path: Path | None = None

    def __post_init__(self):
        if self.n < 0:
            raise ValueError(f"n must be ≥ 0, got {self.n}")


def test_nested_parse_and_int_to_float():
    cfg = from_dict(Outer, {"name": "x", "inner": {"rate": 1}, "items": [{"mode": "b"}], "path": "a/b"})
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.items[0].mode == "b"
    assert cfg.path == Path("a/b")


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"name": "x", "bogus": 1}, "bogus: unknown key for Outer"),
        ({"name": "x", "inner": {"rte": 1}}, "inner.rte: unknown key for Inner"),
        ({"name": "x", "n": "four"}, "n: expected int, got str ('four')"),
        ({"name": "x", "n": True}, "n: expected int, got bool"),
        ({"name": "x", "flag": "yes"}, "flag: expected true or false"),
        ({"name": "x", "inner": {"mode": "c"}}, "inner.mode: expected one of 'a', 'b', got 'c'"),
        ({"name": "x", "items": [{"rate": "fast"}]}, "items[0].rate: expected a number"),
        ({}, "name: required key is missing"),
        ({"name": "x", "n": -1}, "n must be ≥ 0, got -1"),
        ({"name": "x", "inner": [1]}, "inner: expected a mapping"),
    ],
)
def test_errors_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert fragment in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("project: runs/x\ngeneration:\n  nn: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: generation\.nn: unknown key"):
        load_yaml(path, RoundConfig)
    path.write_text("project: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path, RoundConfig)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml", RoundConfig)


def test_a_renamed_key_says_its_new_name(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("project: runs/x\nevaluation:\n  dpo_pairs: 3\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: evaluation\.dpo_pairs: renamed to 'policy_pairs'"):
        load_yaml(path, RoundConfig)
    path.write_text("project: runs/x\nevaluation:\n  policy_pairs: 3\n")
    assert load_yaml(path, RoundConfig).evaluation.policy_pairs == 3


def test_replace_path_and_hash():
    cfg = from_dict(Outer, {"name": "x"})
    new = replace_path(cfg, "inner.rate", "0.5")
    assert new.inner.rate == 0.5 and cfg.inner.rate == 0.1
    assert config_hash(new) != config_hash(cfg)
    assert config_hash(cfg) == config_hash(from_dict(Outer, {"name": "x"}))
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        replace_path(cfg, "nope", "1")
    with pytest.raises(ConfigError, match="expected int"):
        replace_path(cfg, "n", "abc")
    with pytest.raises(ConfigError, match="--set n: n must be ≥ 0, got -1"):
        replace_path(cfg, "n", "-1")


def test_set_reaches_into_a_trainers_trl_extras():
    """`--set reward.trl.<TRL argument>=...`: the free-form `trl:` mapping takes dotted keys too, and the value
    reaches TRL's config (where an unknown name still fails)."""
    from trl import RewardConfig

    from training.common import trl_args

    cfg = load_config(CONFIGS[0])
    new = replace_path(cfg, "reward.trl.train_sampling_strategy", "random")
    new = replace_path(new, "reward.trl.max_grad_norm", "0.5")
    assert new.reward.trl == {**cfg.reward.trl, "train_sampling_strategy": "random", "max_grad_norm": 0.5}
    args = new.reward.to_trl("out", seed=0, progress=False)
    assert args.train_sampling_strategy == "random" and args.max_grad_norm == 0.5
    assert cfg.reward.to_trl("out", seed=0, progress=False).train_sampling_strategy == "group_by_length"
    with pytest.raises(ConfigError, match="not a section"):
        replace_path(new, "reward.trl.max_grad_norm.deeper", "1")
    with pytest.raises(Exception, match="reward.trl.not_a_field"):
        trl_args(RewardConfig, {"output_dir": "x"}, replace_path(cfg, "reward.trl.not_a_field", "1").reward.trl, "reward")
