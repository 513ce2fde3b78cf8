"""KTO/LoRA fine-tuning of the policy with TRL KTOTrainer, on unpaired judgements.

    stats = train_kto(pairs, cfg, work_dir, seed=0, feedback=thumbs)   # writes work_dir/model (adapter + card)
    policy = training.policy.Policy.load(work_dir / "model")

KTO learns from single answers labelled desirable or undesirable (TRL's unpaired preference format: `prompt`,
`completion`, `label`), so it trains on users' thumbs up/down (`preference.schema.Feedback`, from
`training.data.load_round_feedback`) plus the round's preference pairs unrolled (chosen → desirable, rejected →
undesirable; `training.data.unroll_pairs`). The reference is the base with the adapter disabled, prompts and
answers are pre-truncated like DPO's, checkpoints go to `<work_dir>/checkpoints` (a killed run resumes), metrics
through TRL's `report_to` (default: TensorBoard in `<work_dir>/tensorboard/`). The `kto` loss estimates its KL
term from mismatched answers within a batch, so `batch_size` must be ≥ 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from preference.plumbing.errors import CurateError
from preference.schema import Feedback, PreferencePair
from training.common import TrainConfig
from training.data import answer_text, truncate_conversation, truncate_text, unroll_pairs
from training.policy import train_lora_policy


@dataclass
class KTOTrainConfig(TrainConfig):
    """`kto:` section. Maps onto `trl.KTOConfig` + `peft.LoraConfig` (common fields: `TrainConfig`). Off unless
    the round config enables it (`kto: {enabled: true}`)."""

    section: ClassVar[str] = "kto"
    trl_config: ClassVar[str] = "KTOConfig"

    enabled: bool = False
    learning_rate: float = 1e-4  # TRL's default 1e-6 is far too low for LoRA
    beta: float = 0.1
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = 1.0  # raise/lower to balance unequal numbers of thumbs up and down (KTO paper eq. 8)
    undesirable_weight: float = 1.0
    max_prompt_length: int = 192  # tokens; the prompt keeps its latest turns
    max_completion_length: int = 128  # tokens; answers keep their start

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_prompt_length", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("beta, desirable_weight and undesirable_weight must be > 0")
        if self.loss_type == "kto" and self.batch_size < 2:
            raise ValueError(f"batch_size must be ≥ 2 for loss_type kto (its KL term compares answers within a "
                             f"batch), got {self.batch_size}")

    def trl_kwargs(self) -> dict[str, Any]:
        return dict(beta=self.beta, loss_type=self.loss_type, desirable_weight=self.desirable_weight,
                    undesirable_weight=self.undesirable_weight,
                    max_length=self.max_prompt_length + self.max_completion_length + 8)


def kto_rows(tokenizer, examples: list[Feedback], cfg: KTOTrainConfig) -> dict[str, list]:
    """Conversational TRL unpaired columns `prompt`, `completion`, `label`, pre-truncated."""
    cols: dict[str, list] = {"prompt": [], "completion": [], "label": []}
    for f in examples:
        cols["prompt"].append(truncate_conversation(tokenizer, f.prompt, cfg.max_prompt_length))
        text = truncate_text(tokenizer, answer_text(f.completion), cfg.max_completion_length)
        cols["completion"].append([{"role": "assistant", "content": text}])
        cols["label"].append(bool(f.label))
    return cols


def train_kto(
    pairs: list[PreferencePair], cfg: KTOTrainConfig, work_dir: str | Path, *, seed: int = 0, progress: bool = True,
    feedback: Sequence[Feedback] = (),
) -> dict[str, Any]:
    """KTO with LoRA on `feedback` plus `pairs` unrolled; saves the adapter to `work_dir/model`. Resumable."""
    from trl import KTOTrainer

    examples = unroll_pairs(pairs) + list(feedback)
    labels = {bool(f.label) for f in examples}
    if len(labels) < 2:
        have = "nothing" if not examples else f"only {'desirable' if True in labels else 'undesirable'} answers"
        raise CurateError(f"KTO needs desirable and undesirable answers, got {have} ({len(pairs)} pairs, "
                          f"{len(feedback)} feedback items); label more items or disable kto")
    order = np.random.default_rng([seed, 1]).permutation(len(examples))  # mix feedback and unrolled pairs
    examples = [examples[i] for i in order]
    _, stats = train_lora_policy(KTOTrainer, "kto", cfg, work_dir, lambda tok: kto_rows(tok, examples, cfg),
                                 seed=seed, progress=progress, unit="examples")
    desirable = sum(bool(f.label) for f in examples)
    return {**stats, "pairs": len(pairs),
            "feedback": len(feedback), "examples": len(examples), "desirable": desirable,
            "undesirable": len(examples) - desirable}
