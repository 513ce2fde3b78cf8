"""A policy: a causal LM, optionally with LoRA adapters (what DPO and KTO train, what evaluation and serving load).

    policy = Policy.load(work_dir / "model")              # a trained adapter folder (model card) or a base model
    policy.logps(prompts, answers)                          # summed log p(answer | prompt), adapter on; batched
    with policy.reference(): policy.logps(...)              # the reference = base with the adapter disabled
    policy.generate(prompts, max_new_tokens=64)             # greedy answers, batched
    if policy.add_adapter(other_folder, "previous"):        # another adapter on the same base: no second load
        with policy.adapter("previous"): policy.generate(...)

Batches are left-padded with explicit position ids, so every sequence sees the positions it would see alone
(batched results equal one-at-a-time results up to float rounding), and only the answer positions' logits are
computed (`logits_to_keep`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from preference.plumbing.io import read_json
from training.common import (
    TrainConfig,
    causal_lm,
    fit,
    fit_stats,
    load_tokenizer,
    lora_config,
    merged_adapter,
    prepare_training,
    save_adapter,
    tensorboard_callbacks,
)
from training.data import chat_ids, prompt_ids, truncate_conversation, truncate_text

MODEL_CARD = "curate-policy.json"


def train_lora_policy(trainer_class, kind: str, cfg: TrainConfig, work_dir: str | Path, rows, *, seed: int,
                      progress: bool, unit: str):
    """The run every LoRA policy trainer shares (DPO, KTO): TRL's `trainer_class` on the columns `rows(tokenizer)`
    returns, the base model as its reference (adapter disabled); resumes from the last checkpoint; saves the adapter
    to `work_dir/model` with the policy card. Returns (trainer, `fit_stats` counted in `unit`)."""
    from datasets import Dataset

    base, work_dir, tokenizer = prepare_training(cfg, work_dir)
    ckpt_dir = work_dir / "checkpoints"
    trainer = trainer_class(  # seeds, then wraps the model with LoRA; the reference = the base, adapter disabled
        model=causal_lm(base), args=cfg.to_trl(ckpt_dir, seed=seed, progress=progress),
        train_dataset=Dataset.from_dict(rows(tokenizer)), processing_class=tokenizer,
        peft_config=lora_config(cfg, "CAUSAL_LM"), callbacks=tensorboard_callbacks(cfg, work_dir / "tensorboard"),
    )
    result, seconds, resume = fit(trainer, ckpt_dir)
    save_adapter(trainer, work_dir / "model", MODEL_CARD,
                 {"kind": "policy", "trainer": kind, "base_model": cfg.base_model, "base_path": str(base)})
    return trainer, fit_stats(trainer, result, seconds, resume, cfg, unit)


def policy_base(folder: str | Path) -> Path:
    """The base model folder of a policy: the card's base of an adapter folder, else the model itself."""
    from training.models import resolve_model

    folder_path = Path(folder)
    if (folder_path / MODEL_CARD).is_file():
        card = read_json(folder_path / MODEL_CARD)
        base_path = Path(card["base_path"])
        return base_path if (base_path / "config.json").is_file() else resolve_model(card["base_model"])
    return resolve_model(folder)


class Policy:
    """A causal LM, optionally with a LoRA adapter (`reference()` disables it)."""

    def __init__(self, model, tokenizer, has_adapter: bool, base: Path | None = None, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.has_adapter = has_adapter
        self.base = base
        self.batch_size = batch_size
        self._adapter_on = has_adapter  # False inside `reference()`

    @classmethod
    def load(cls, folder: str | Path, *, dtype: str = "float32", batch_size: int = 8) -> Policy:
        """A folder written by a policy trainer (`<dir>/model`: adapter + model card), or a plain HF causal-LM
        folder / built-in name. `dtype`: "float32" (default: exact), "bfloat16" or "auto" (hardware decides)."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from preference.plumbing.hardware import resolve_dtype

        base = policy_base(folder)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, resolve_dtype(dtype)))
        has_adapter = (Path(folder) / MODEL_CARD).is_file()
        if has_adapter:
            model = PeftModel.from_pretrained(model, folder)
        model.eval()
        return cls(model, load_tokenizer(base), has_adapter, base, batch_size)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    # ---------------------------------------------------------------------------------------------- adapters
    @contextlib.contextmanager
    def reference(self):
        """Within this block the model is the reference (the base, adapter disabled)."""
        if self.has_adapter:
            with self.model.disable_adapter():
                self._adapter_on = False
                try:
                    yield self
                finally:
                    self._adapter_on = True
        else:
            yield self

    def add_adapter(self, folder: str | Path, name: str) -> bool:
        """Load another policy's adapter beside this one when both share the base; False when they do not (or
        this policy has no adapter to load beside), so the caller loads that policy on its own."""
        folder = Path(folder)
        if not self.has_adapter or not (folder / MODEL_CARD).is_file() or policy_base(folder) != self.base:
            return False
        self.model.load_adapter(folder, adapter_name=name)
        return True

    @contextlib.contextmanager
    def adapter(self, name: str):
        """Within this block adapter `name` (added with `add_adapter`) is active instead of the trained one."""
        previous = self.model.active_adapter
        self.model.set_adapter(name)
        try:
            yield self
        finally:
            self.model.set_adapter(previous)

    # ------------------------------------------------------------------------------------------------ batches
    def _batches(self, lengths: list[int]) -> list[np.ndarray]:
        order = np.argsort(lengths, kind="stable")  # similar lengths per batch: less padding
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _left_padded(self, seqs: list[list[int]]):
        """(input_ids, attention_mask, position_ids) of left-padded `seqs`."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids, mask, positions

    # ---------------------------------------------------------------------------------------------- log-probs
    def _split(self, prompt: list[dict], answer: str, max_prompt: int, max_answer: int) -> tuple[list[int], list[int]]:
        prompt = truncate_conversation(self.tokenizer, prompt, max_prompt)
        answer = truncate_text(self.tokenizer, answer, max_answer)
        return chat_ids(self.tokenizer, prompt, answer)

    def logps(
        self, prompts: list[list[dict]], answers: list[str], *, max_prompt: int = 192, max_answer: int = 128
    ) -> tuple[np.ndarray, np.ndarray]:
        """(summed log p of each answer given its prompt, number of answer tokens), `batch_size` at a time."""
        import torch

        split = [self._split(p, a, max_prompt, max_answer) for p, a in zip(prompts, answers, strict=True)]
        sums, counts = np.zeros(len(split)), np.zeros(len(split), dtype=np.int64)
        todo = [i for i, (_, tail) in enumerate(split) if tail]
        with merged_adapter(self.model, self._adapter_on):
            for batch in self._batches([len(split[i][0]) + len(split[i][1]) for i in todo]):
                rows = [todo[j] for j in batch]
                ids, mask, positions = self._left_padded([split[i][0] + split[i][1] for i in rows])
                keep = max(len(split[i][1]) for i in rows) + 1  # logits of the last `keep` positions suffice
                with torch.inference_mode():
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        logits_to_keep=keep).logits.float()
                for row, i in enumerate(rows):
                    tail = split[i][1]
                    # position t predicts token t+1: the answer's tokens are the last len(tail) positions of the row
                    step_logits = logits[row, keep - 1 - len(tail) : keep - 1]
                    logp = torch.log_softmax(step_logits, dim=-1).gather(1, torch.tensor(tail)[:, None])[:, 0]
                    sums[i], counts[i] = float(logp.sum()), len(tail)
        return sums, counts

    # ---------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[list[dict]], *, max_new_tokens: int = 64, max_prompt: int = 192) -> list[str]:
        """Greedy answers (deterministic), `batch_size` prompts at a time."""
        import torch

        encoded = [prompt_ids(self.tokenizer, truncate_conversation(self.tokenizer, p, max_prompt)) for p in prompts]
        out = [""] * len(prompts)
        with merged_adapter(self.model, self._adapter_on):
            for batch in self._batches([len(e) for e in encoded]):
                ids, mask, _ = self._left_padded([encoded[i] for i in batch])
                with torch.inference_mode():
                    gen = self.model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    )
                for row, i in enumerate(batch):
                    out[i] = self.tokenizer.decode(gen[row, ids.shape[1]:], skip_special_tokens=True).strip()
        return out
