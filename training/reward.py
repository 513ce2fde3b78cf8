"""Reward model training: TRL RewardTrainer + PEFT LoRA (score head trained and saved), optionally an ensemble.

    model = train_reward_model(pairs, cfg, out_dir, seed=0)     # writes out_dir/model (adapter(s) + config)
    rm = RewardModel.load(out_dir / "model")
    chosen, rejected = rm.score_pairs(pairs)                  # higher = preferred
    rm.reward([conversation, ...])                             # one scalar per conversation (ensemble mean)
    rm.disagreement(conversations)                             # ensemble std; higher = more informative

Pairs are tokenized here (chat template, `training.data.encode_pair`: prompt keeps its end, answer its start)
and handed to TRL already tokenized, so the trainer never drops an over-long pair. The base model is any HF
causal-LM folder (`training.models.resolve_model`); it is loaded as a sequence classifier with one label (a new
`score` head), LoRA adapters go on the attention/MLP projections (`task_type=SEQ_CLS` keeps `score` trainable and
saved in the adapter). Training checkpoints go to `<work_dir>/member-<k>/checkpoints`; a killed run resumes from
the last checkpoint, and finished ensemble members are not retrained. Metrics go through TRL's `report_to`
(default: TensorBoard event files in `<work_dir>/tensorboard/member-<k>/`, see `training.common`).

An ensemble (`ensemble: K`) trains K LoRA heads on bootstrap resamples of the training set (different seeds);
their spread is the acquisition signal for disagreement-based selection.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, write_json
from preference.schema import PreferencePair
from training.common import (
    TrainConfig,
    fit,
    fit_stats,
    load_tokenizer,
    lora_config,
    main_process,
    merged_adapter,
    prepare_training,
    save_adapter,
    tensorboard_callbacks,
    wait_for_everyone,
)
from training.data import answer_text, encode_pair

MODEL_CARD = "curate-reward.json"


@dataclass
class RewardTrainConfig(TrainConfig):
    """`reward:` section. Maps onto `trl.RewardConfig` + `peft.LoraConfig` (common fields: `TrainConfig`)."""

    section: ClassVar[str] = "reward"
    trl_config: ClassVar[str] = "RewardConfig"

    learning_rate: float = 3e-4  # measured: 60.3% held-out on HH harmless (scripts/bench_reward_hh.py)
    save_steps: int = 20
    logging_steps: int = 10
    max_length: int = 192  # tokens of prompt + answer after pre-truncation
    use_margin: bool = False  # pass pair.margin to the loss (-logsigmoid(r_c - r_r - margin))
    center_rewards_coefficient: float | None = None
    ensemble: int = 1  # K LoRA heads; K > 1 trains each on a bootstrap resample
    score_batch_size: int = 8

    def __post_init__(self):
        super().__post_init__()
        for name in ("ensemble", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be ≥ 16 tokens, got {self.max_length}")

    def trl_kwargs(self) -> dict[str, Any]:
        # pairs arrive tokenized and pre-truncated (max_length=None: TRL must not drop long pairs). Batches hold
        # pairs of similar length (the `length` column, transformers' LengthGroupedSampler): less padding, the
        # same pairs per epoch; `trl: {train_sampling_strategy: random}` restores plain shuffling. The column
        # must reach the sampler, so unused columns are kept (TRL's collator reads only its own).
        return dict(max_length=None, center_rewards_coefficient=self.center_rewards_coefficient,
                    remove_unused_columns=False, train_sampling_strategy="group_by_length", length_column_name="length")


# ---------------------------------------------------------------------------------------------------- helpers
def _load_seqcls(base: Path, dtype):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, use_margin: bool) -> dict[str, list]:
    """Columns `chosen_ids`, `rejected_ids` (and `margin`) for TRL's RewardTrainer (already truncated), and
    `length`: the longer side's tokens, what a batch is padded to (for length-grouped batches)."""
    cols: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "length": []}
    if use_margin:
        cols["margin"] = []
    for p in pairs:
        cols["chosen_ids"].append(encode_pair(tokenizer, p.prompt, answer_text(p.chosen), max_length))
        cols["rejected_ids"].append(encode_pair(tokenizer, p.prompt, answer_text(p.rejected), max_length))
        cols["length"].append(max(len(cols["chosen_ids"][-1]), len(cols["rejected_ids"][-1])))
        if use_margin:
            cols["margin"].append(float(p.margin))
    return cols


# --------------------------------------------------------------------------------------------------- training
def train_reward_model(
    pairs: list[PreferencePair],
    cfg: RewardTrainConfig,
    work_dir: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the LoRA reward model (or K ensemble members) on `pairs`; save to `work_dir/model`.

    Resumable: finished members (`work_dir/member-k/adapter`) are kept, a member in progress resumes from its
    last checkpoint. Returns training stats (loss curve per member, pairs/s, seconds).
    """
    if not pairs:
        raise CurateError("no preference pairs to train the reward model on; run `curate pull` first")
    base, work_dir, tokenizer = prepare_training(cfg, work_dir)
    cols = tokenize_pairs(tokenizer, pairs, cfg.max_length, cfg.use_margin)
    stats: dict[str, Any] = {"members": [], "pairs": len(pairs)}
    t0 = time.monotonic()
    for k in range(cfg.ensemble):
        member_dir = work_dir / f"member-{k}"
        adapter_dir = member_dir / "adapter"
        if (adapter_dir / "adapter_config.json").is_file() and (member_dir / "stats.json").is_file():
            stats["members"].append(read_json(member_dir / "stats.json"))
            continue
        rng = np.random.default_rng([seed, k])
        index = np.arange(len(pairs)) if cfg.ensemble == 1 else rng.integers(0, len(pairs), size=len(pairs))
        member_stats = _train_member(
            base, tokenizer, {c: [v[i] for i in index] for c, v in cols.items()}, cfg, member_dir,
            seed=seed + k, progress=progress,
        )
        if main_process():
            write_json(member_dir / "stats.json", member_stats)
        stats["members"].append(member_stats)
    if main_process():
        save_reward_model(work_dir, work_dir / "model", cfg, base)
    wait_for_everyone()
    members = stats["members"]
    stats.update({  # the ensemble in one line: what the round step's manifest shows
        "train_loss": float(np.mean([m["train_loss"] for m in members])), "steps": members[0]["steps"],
        "pairs_per_second": members[0]["pairs_per_second"], "bf16": members[0]["bf16"],
        "resumed_from": members[0]["resumed_from"], "seconds": round(time.monotonic() - t0, 1),
    })
    return stats


def reward_trainer(base, tokenizer, cols, cfg: RewardTrainConfig, member_dir: Path, *, seed: int, progress: bool):
    """TRL's RewardTrainer for one member: the base with a fresh score head and LoRA, on `tokenize_pairs` columns,
    checkpoints under `member_dir/checkpoints`."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import RewardTrainer

    set_seed(seed)  # the new score head's init
    model = _load_seqcls(base, torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, lora_config(cfg, "SEQ_CLS"))
    return RewardTrainer(
        model=model, args=cfg.to_trl(member_dir / "checkpoints", seed=seed, progress=progress),
        train_dataset=Dataset.from_dict(cols), processing_class=tokenizer,
        callbacks=tensorboard_callbacks(cfg, member_dir.parent / "tensorboard" / member_dir.name),
    )


def _train_member(base, tokenizer, cols, cfg, member_dir: Path, *, seed: int, progress: bool) -> dict[str, Any]:
    trainer = reward_trainer(base, tokenizer, cols, cfg, member_dir, seed=seed, progress=progress)
    result, seconds, resume = fit(trainer, member_dir / "checkpoints")
    save_adapter(trainer, member_dir / "adapter")
    return fit_stats(trainer, result, seconds, resume, cfg, "pairs")


def save_reward_model(work_dir: Path, out: Path, cfg: RewardTrainConfig, base: Path) -> Path:
    """Collect the members' adapters into `out` (written to a temp folder, then renamed)."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for k in range(cfg.ensemble):
        shutil.copytree(work_dir / f"member-{k}" / "adapter", staging / f"member-{k}")
    card = {"kind": "reward", "base_model": cfg.base_model, "base_path": str(base), "members": cfg.ensemble,
            "max_length": cfg.max_length, "score_batch_size": cfg.score_batch_size}
    write_json(staging / MODEL_CARD, card)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------- scoring
class RewardModel:
    """A trained (ensemble of) LoRA reward model(s). Scores are scalars; higher = preferred by the model."""

    def __init__(self, model, tokenizer, members: list[str], max_length: int, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.members = members
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(cls, folder: str | Path, *, dtype: str = "float32", threads: int | None = None) -> RewardModel:
        """Load a folder written by `train_reward_model` (`<dir>/model`). `dtype`: "float32" (default: exact,
        comparable scores), "bfloat16", or "auto" (bf16 only where the hardware is fast at it)."""
        import torch
        from peft import PeftModel

        from preference.plumbing.hardware import resolve_dtype
        from training.models import resolve_model

        folder = Path(folder)
        if not (folder / MODEL_CARD).is_file():
            raise CurateError(f"{folder} is not a trained reward model (no {MODEL_CARD}); run `curate train reward`")
        if threads:
            torch.set_num_threads(threads)
        card = read_json(folder / MODEL_CARD)
        base_path = Path(card["base_path"])
        base = base_path if (base_path / "config.json").is_file() else resolve_model(card["base_model"])
        tokenizer = load_tokenizer(base)
        model = _load_seqcls(base, getattr(torch, resolve_dtype(dtype)))
        model.config.pad_token_id = tokenizer.pad_token_id
        members = [f"member-{k}" for k in range(card["members"])]
        model = PeftModel.from_pretrained(model, folder / members[0], adapter_name=members[0])
        for name in members[1:]:
            model.load_adapter(folder / name, adapter_name=name)
        model.eval()
        return cls(model, tokenizer, members, card["max_length"], card.get("score_batch_size", 8))

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def _encode(self, item) -> list[int]:
        if isinstance(item, str):
            return self.tokenizer(item, add_special_tokens=False)["input_ids"][-self.max_length:]
        if item and item[-1]["role"] == "assistant":
            return encode_pair(self.tokenizer, item[:-1], item[-1]["content"], self.max_length)
        return encode_pair(self.tokenizer, item, "", self.max_length)

    def member_rewards(self, items: list, *, progress: bool = False) -> np.ndarray:
        """(K, N) rewards of each ensemble member for N conversations (ending with the assistant answer) or texts."""
        import torch
        from tqdm.auto import tqdm

        # identical sequences (a round's best-vs-rest pairs repeat each record's best answer) are scored once
        distinct: dict[tuple[int, ...], int] = {}
        slot = [distinct.setdefault(tuple(self._encode(x)), len(distinct)) for x in items]
        encoded = [list(seq) for seq in distinct]
        order = np.argsort([len(e) for e in encoded])  # similar lengths per batch: less padding
        out = np.zeros((len(self.members), len(encoded)), dtype=np.float64)
        pad = self.tokenizer.pad_token_id
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for name_i, name in enumerate(self.members):
            self.model.set_adapter(name)
            with merged_adapter(self.model):
                for idx in tqdm(batches, disable=not progress, desc=f"scoring ({name})", leave=False):
                    seqs = [encoded[i] for i in idx]
                    width = max(len(s) for s in seqs)
                    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(seqs), width), dtype=torch.long)
                    for row, s in enumerate(seqs):
                        ids[row, : len(s)] = torch.tensor(s)
                        mask[row, : len(s)] = 1
                    with torch.inference_mode():
                        logits = self.model(input_ids=ids, attention_mask=mask).logits
                    out[name_i, idx] = logits[:, 0].float().numpy()
        return out[:, slot]

    def reward(self, items: list, *, progress: bool = False) -> np.ndarray:
        """(N,) ensemble-mean reward per conversation/text. Higher = better."""
        return self.member_rewards(items, progress=progress).mean(axis=0)

    def disagreement(self, items: list, *, progress: bool = False) -> np.ndarray:
        """(N,) std of the members' rewards (0 for a single model). Higher = more informative to label."""
        return self.member_rewards(items, progress=progress).std(axis=0)

    def score_pairs(self, pairs: list[PreferencePair], *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(chosen rewards, rejected rewards), each (N,), ensemble means."""
        items = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        r = self.reward(items, progress=progress)
        return r[: len(pairs)], r[len(pairs):]
