"""The round config: one YAML file → one `RoundConfig`, with one typed section per step.

Each section's dataclass lives beside the code that uses it (TRL style); this module only composes them. The
trainer sections (`reward:`, `dpo:`, `kto:`, ...) come from the trainer table (`training.trainers.TRAINERS`): a new
trainer gets its section without an edit here. Relative paths in a config are relative to the current working
directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

from curation.drift import DriftConfig
from curation.export import ExportConfig
from curation.serving.serve import ServeConfig
from curation.steps.generate import GenerationConfig
from curation.steps.labels import LabelsConfig
from curation.steps.pool import PoolConfig
from curation.steps.push import AnnotationConfig
from curation.steps.score import ScoringConfig
from curation.steps.select import SelectionConfig
from preference.plumbing.config import load_yaml, replace_path
from training.evaluate import EvalConfig
from training.registry import GateConfig
from training.trainers import TRAINERS


@dataclass
class RoundSections:
    """The sections every round has besides its trainers' (see `RoundConfig`)."""

    project: Path = Path("runs/default")  # the round store folder
    seed: int = 0
    description: str = ""
    labels: LabelsConfig = field(default_factory=LabelsConfig)  # seed labels: round 0 (`curate bootstrap`)
    pool: PoolConfig = field(default_factory=PoolConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # `curate serve`: the champion behind a logging layer
    drift: DriftConfig = field(default_factory=DriftConfig)  # `curate drift`, `round run --next --if-drift`
    export: ExportConfig = field(default_factory=ExportConfig)  # `curate export`: the dataset card's extras


# `RoundSections` + one section per trainer of the table, named by its kind: `cfg.reward`, `cfg.dpo`, `cfg.kto`, ...
RoundConfig = make_dataclass(
    "RoundConfig",
    [(kind, t.config_class, field(default_factory=t.config_class)) for kind, t in TRAINERS.items()],
    bases=(RoundSections,),
    namespace={"__doc__": "A whole round: the common sections plus one section per trainer (training/trainers.py).",
               "__module__": __name__},
)


def bootstrap_config(cfg):
    """The round config round 0 runs with: `labels.train` applied over the trainer sections (type-checked)."""
    for kind, overrides in cfg.labels.train.items():
        for key, value in overrides.items():
            cfg = replace_path(cfg, f"{kind}.{key}", value)
    return cfg


def load_config(path: str | Path) -> RoundConfig:
    cfg = load_yaml(path, RoundConfig)
    if cfg.labels.train:  # the bootstrap's trainer settings type-check against the trainer sections now
        from preference.plumbing.config import ConfigError

        try:
            bootstrap_config(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{path}: labels.train: {str(exc).removeprefix('--set ')}") from exc
    return cfg
