"""The trainer table: every trainer the loop knows, in the order a round trains them.

    TRAINERS["reward"].config_class      # the dataclass of the YAML section `reward:`
    TRAINERS["dpo"].train_function       # train(pairs, cfg, work_dir, *, seed, progress) -> stats
    TRAINERS["kto"].artifact             # its folder name in a registry version

Everything that used to branch on "reward"/"dpo" reads this table: the round config (one section per trainer),
the round steps `train_<kind>` (between `pull` and `evaluate`, in table order), `curate train <kind>`,
`accelerate launch -m training.launch <kind>`, the evaluate step (one evaluation per trained kind), the gate (one
registry artifact per trained kind) and the report. Entries hold import paths, so importing the table imports
neither torch nor TRL.

Adding a trainer = its module (a config dataclass on `training.common.TrainConfig`, a train function, a model
folder) + one entry here + tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from preference.plumbing.errors import CurateError

Role = Literal["reward_model", "policy"]


def _load(path: str) -> Any:
    """`"package.module:attr"` → the attribute (imported on first use)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Trainer:
    """One row of the table. `kind` names the YAML section, the round step `train_<kind>` and the CLI command."""

    kind: str
    config: str  # import path of the config dataclass (a `training.common.TrainConfig`)
    train: str  # import path of train(pairs, cfg, work_dir, *, seed, progress[, feedback]) -> stats dict
    evaluate: str  # import path of evaluate(model_dir, section_cfg, ctx: EvalContext) -> Evaluation
    artifact: str  # the model's folder name in a registry version (`<registry>/vNNNN/<artifact>/`)
    role: Role  # "reward_model" (judges answers) or "policy" (answers prompts; what `curate serve` serves)
    help: str  # one line for `curate train <kind> --help`
    uses_feedback: bool = False  # also trains on unpaired thumbs up/down (`training.data.load_round_feedback`)

    @property
    def step(self) -> str:
        """The round step that trains it."""
        return f"train_{self.kind}"

    @property
    def config_class(self) -> type:
        return _load(self.config)

    @property
    def train_function(self):
        return _load(self.train)

    @property
    def evaluate_function(self):
        return _load(self.evaluate)


TRAINERS: dict[str, Trainer] = {
    t.kind: t
    for t in (
        Trainer(
            kind="reward", config="training.reward:RewardTrainConfig", train="training.reward:train_reward_model",
            evaluate="training.evaluate:evaluate_reward_dir", artifact="reward", role="reward_model",
            help="Train a LoRA reward model (TRL RewardTrainer) on this round's pairs plus replay.",
        ),
        Trainer(
            kind="dpo", config="training.dpo:DPOTrainConfig", train="training.dpo:train_dpo",
            evaluate="training.evaluate:evaluate_policy_dir", artifact="policy", role="policy",
            help="DPO/LoRA fine-tune of the policy (TRL DPOTrainer) on this round's pairs plus replay.",
        ),
        Trainer(
            kind="kto", config="training.kto:KTOTrainConfig", train="training.kto:train_kto",
            evaluate="training.evaluate:evaluate_policy_dir", artifact="policy_kto", role="policy",
            help="KTO/LoRA fine-tune of the policy (TRL KTOTrainer) on thumbs up/down plus the round's pairs "
                 "unrolled.",
            uses_feedback=True,
        ),
    )
}


def trainer(kind: str) -> Trainer:
    """The table entry of `kind`; a clear error for an unknown one."""
    if kind not in TRAINERS:
        raise CurateError(f"unknown trainer {kind!r}; expected one of {', '.join(TRAINERS)} (training/trainers.py)")
    return TRAINERS[kind]


def with_role(role: Role) -> list[Trainer]:
    """The table's trainers of one role, in table order."""
    return [t for t in TRAINERS.values() if t.role == role]
