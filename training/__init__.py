"""Reward models, DPO/LoRA, evaluation, the model registry and promotion gate."""
