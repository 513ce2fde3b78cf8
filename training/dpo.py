"""DPO/LoRA fine-tuning of the policy with TRL DPOTrainer.

    stats = train_dpo(pairs, cfg, work_dir, seed=0)        # writes work_dir/model (LoRA adapter + model card)
    policy = training.policy.Policy.load(work_dir / "model")

The reference model is the base with the adapter disabled (TRL: `peft_config` + no `ref_model`), so only one
copy of the weights is in memory. Pairs are pre-truncated (`training.data`): the prompt keeps its latest turns,
answers their first `max_completion_length` tokens, so DPOTrainer never drops or cuts a pair at the wrong end.
Checkpoints go to `<work_dir>/checkpoints`; a killed run resumes from the last one. Metrics go through TRL's
`report_to` (default: TensorBoard event files in `<work_dir>/tensorboard/`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from preference.plumbing.errors import CurateError
from preference.schema import PreferencePair
from training.common import TrainConfig
from training.data import answer_text, truncate_conversation, truncate_text
from training.policy import train_lora_policy


@dataclass
class DPOTrainConfig(TrainConfig):
    """`dpo:` section. Maps onto `trl.DPOConfig` + `peft.LoraConfig` (common fields: `TrainConfig`)."""

    section: ClassVar[str] = "dpo"
    trl_config: ClassVar[str] = "DPOConfig"

    learning_rate: float = 1e-4  # TRL's default 1e-6 is far too low for LoRA
    batch_size: int = 2
    grad_accum: int = 4
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    max_prompt_length: int = 192  # tokens; the prompt keeps its latest turns
    max_completion_length: int = 128  # tokens; answers keep their start

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_prompt_length", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.loss_type:
            raise ValueError("loss_type must list at least one DPO loss, e.g. [sigmoid]")

    def trl_kwargs(self) -> dict[str, Any]:
        return dict(beta=self.beta, loss_type=list(self.loss_type),
                    max_length=self.max_prompt_length + self.max_completion_length + 8)


def dpo_rows(tokenizer, pairs: list[PreferencePair], cfg: DPOTrainConfig) -> dict[str, list]:
    """Conversational TRL columns `prompt`, `chosen`, `rejected`, pre-truncated."""
    cols: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for p in pairs:
        cols["prompt"].append(truncate_conversation(tokenizer, p.prompt, cfg.max_prompt_length))
        for key, msgs in (("chosen", p.chosen), ("rejected", p.rejected)):
            text = truncate_text(tokenizer, answer_text(msgs), cfg.max_completion_length)
            cols[key].append([{"role": "assistant", "content": text}])
    return cols


def train_dpo(
    pairs: list[PreferencePair], cfg: DPOTrainConfig, work_dir: str | Path, *, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """DPO with LoRA on `pairs`; saves the adapter to `work_dir/model`. Resumes from the last checkpoint."""
    from trl import DPOTrainer

    if not pairs:
        raise CurateError("no preference pairs to train DPO on; run `curate pull` first")
    trainer, stats = train_lora_policy(DPOTrainer, "dpo", cfg, work_dir, lambda tok: dpo_rows(tok, pairs, cfg),
                                       seed=seed, progress=progress, unit="pairs")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {**stats, "pairs": len(pairs),
            "reward_accuracies": [h.get("rewards/accuracies") for h in logs]}
