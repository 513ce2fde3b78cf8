"""DPO/LoRA fine-tuning of the policy with TRL DPOTrainer, and a loader for the tuned policy.

    stats = train_dpo(pairs, cfg, work_dir, seed=0)        # writes work_dir/model (LoRA adapter + model card)
    policy = Policy.load(work_dir / "model")
    policy.logps(prompts, answers)                          # summed log p(answer | prompt); adapter on
    with policy.reference(): policy.logps(...)              # the reference = base with the adapter disabled

The reference model is the base with the adapter disabled (TRL: `ref_model=None` + a PEFT model), so only one
copy of the weights is in memory. Pairs are pre-truncated (`training.data`): the prompt keeps its latest turns,
answers their first `max_completion_length` tokens, so DPOTrainer never drops or cuts a pair at the wrong end.
Checkpoints go to `<work_dir>/checkpoints`; a killed run resumes from the last one.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import fast_bf16
from preference.plumbing.io import read_json, write_json
from preference.schema import PreferencePair
from training.data import ReplayConfig, answer_text, chat_ids, truncate_conversation, truncate_text
from training.reward import (
    DEFAULT_TARGETS,
    last_checkpoint,
    load_tokenizer,
    lora_config,
    prepare_training,
    trainer_step,
    trl_args,
)

MODEL_CARD = "curate-policy.json"


@dataclass
class DPOTrainConfig:
    """`dpo:` section. Maps onto `trl.DPOConfig` + `peft.LoraConfig`; `trl:` passes extra DPOConfig args."""

    enabled: bool = True
    base_model: str = "smollm2-135m-instruct"  # the policy to tune: built-in name or HF causal-LM folder
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    learning_rate: float = 1e-4  # TRL's default 1e-6 is far too low for LoRA
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 2
    grad_accum: int = 4
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    max_prompt_length: int = 192  # tokens; the prompt keeps its latest turns
    max_completion_length: int = 128  # tokens; answers keep their start
    bf16: bool | None = None  # null = bf16 autocast when supported
    threads: int = 2  # torch CPU threads (per process)
    num_processes: int = 1  # > 1: data-parallel under `accelerate launch` (training/launch.py)
    save_steps: int = 10
    logging_steps: int = 5
    max_train_pairs: int | None = None
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    trl: dict[str, Any] = field(default_factory=dict)  # extra trl.DPOConfig fields, validated by name

    def __post_init__(self):
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "threads", "num_processes", "save_steps",
                     "max_prompt_length", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.beta <= 0 or self.epochs <= 0:
            raise ValueError("learning_rate, beta and epochs must be > 0")
        if not self.loss_type:
            raise ValueError("loss_type must list at least one DPO loss, e.g. [sigmoid]")


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
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise CurateError("no preference pairs to train DPO on; run `curate pull` first")
    base, work_dir, tokenizer = prepare_training(cfg, work_dir)
    use_bf16 = fast_bf16() if cfg.bf16 is None else cfg.bf16
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, lora_config(cfg, "CAUSAL_LM"))
    ckpt_dir = work_dir / "checkpoints"
    args = trl_args(
        DPOConfig,
        dict(
            output_dir=str(ckpt_dir), seed=seed, learning_rate=cfg.learning_rate, beta=cfg.beta,
            loss_type=list(cfg.loss_type), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler,
            max_length=cfg.max_prompt_length + cfg.max_completion_length + 8, bf16=use_bf16, fp16=False,
            gradient_checkpointing=False, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
            logging_steps=cfg.logging_steps, report_to=[], disable_tqdm=not progress,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        ),
        cfg.trl, "dpo",
    )
    dataset = Dataset.from_dict(dpo_rows(tokenizer, pairs, cfg))
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer)
    resume = last_checkpoint(ckpt_dir)
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - t0
    if trainer.is_world_process_zero():  # under accelerate launch only the main process writes
        staging = work_dir / "model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        trainer.model.save_pretrained(staging)
        write_json(staging / MODEL_CARD, {"kind": "policy", "base_model": cfg.base_model, "base_path": str(base)})
        shutil.rmtree(work_dir / "model", ignore_errors=True)
        staging.rename(work_dir / "model")
    trainer.accelerator.wait_for_everyone()
    steps = trainer.state.global_step
    pairs_done = (steps - (trainer_step(resume) or 0)) * cfg.batch_size * cfg.grad_accum
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": float(result.training_loss), "steps": steps, "seconds": round(seconds, 1),
        "pairs_per_second": round(pairs_done / seconds, 3) if seconds > 0 else None, "bf16": use_bf16,
        "resumed_from": Path(resume).name if resume else None, "pairs": len(pairs),
        "losses": [h["loss"] for h in logs],
        "reward_accuracies": [h.get("rewards/accuracies") for h in logs],
    }


class Policy:
    """A causal LM, optionally with a LoRA adapter (`reference()` disables it)."""

    def __init__(self, model, tokenizer, has_adapter: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.has_adapter = has_adapter

    @classmethod
    def load(cls, folder: str | Path, *, dtype: str = "float32") -> Policy:
        """A folder written by `train_dpo` (`<dir>/model`), or a plain HF causal-LM folder / built-in name."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from training.models import resolve_model

        folder = Path(folder)
        if (folder / MODEL_CARD).is_file():
            card = read_json(folder / MODEL_CARD)
            base_path = Path(card["base_path"])
            base = base_path if (base_path / "config.json").is_file() else resolve_model(card["base_model"])
            model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
            model = PeftModel.from_pretrained(model, folder)
            has_adapter = True
        else:
            base = resolve_model(folder)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
            has_adapter = False
        model.eval()
        return cls(model, load_tokenizer(base), has_adapter)

    @contextlib.contextmanager
    def reference(self):
        """Within this block the model is the reference (the base, adapter disabled)."""
        if self.has_adapter:
            with self.model.disable_adapter():
                yield self
        else:
            yield self

    def _split(self, prompt: list[dict], answer: str, max_prompt: int, max_answer: int) -> tuple[list[int], list[int]]:
        prompt = truncate_conversation(self.tokenizer, prompt, max_prompt)
        answer = truncate_text(self.tokenizer, answer, max_answer)
        return chat_ids(self.tokenizer, prompt, answer)

    def logps(
        self, prompts: list[list[dict]], answers: list[str], *, max_prompt: int = 192, max_answer: int = 128
    ) -> tuple[np.ndarray, np.ndarray]:
        """(summed log p of each answer given its prompt, number of answer tokens). One sequence at a time."""
        import torch

        sums, counts = np.zeros(len(prompts)), np.zeros(len(prompts), dtype=np.int64)
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            head, tail = self._split(prompt, answer, max_prompt, max_answer)
            if not tail:
                continue
            ids = torch.tensor([head + tail])
            with torch.inference_mode():
                logits = self.model(input_ids=ids).logits[0, len(head) - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tail)[:, None])[:, 0]
            sums[i], counts[i] = float(logp.sum()), len(tail)
        return sums, counts

    def generate(self, prompts: list[list[dict]], *, max_new_tokens: int = 64, max_prompt: int = 192) -> list[str]:
        """Greedy answers (deterministic), one prompt at a time."""
        import torch

        out = []
        for prompt in prompts:
            prompt = truncate_conversation(self.tokenizer, prompt, max_prompt)
            enc = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_tensors="pt")
            ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                )
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return out
