"""DPO/LoRA fine-tuning of the policy with TRL DPOTrainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DPOTrainConfig:
    base_model: str = "smollm2-135m-instruct"
