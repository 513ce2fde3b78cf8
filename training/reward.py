"""Reward model training: TRL RewardTrainer + PEFT LoRA (score head trained and saved)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardTrainConfig:
    base_model: str = "smollm2-135m-instruct"
