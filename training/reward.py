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
the last checkpoint, and finished ensemble members are not retrained.

An ensemble (`ensemble: K`) trains K LoRA heads on bootstrap resamples of the training set (different seeds);
their spread is the acquisition signal for disagreement-based selection.
"""

from __future__ import annotations

import dataclasses
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
from training.data import ReplayConfig, answer_text, encode_pair

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_CARD = "curate-reward.json"


@dataclass
class RewardTrainConfig:
    """`reward:` section. Maps onto `trl.RewardConfig` + `peft.LoraConfig`; `trl:` passes extra RewardConfig args."""

    base_model: str = "smollm2-135m-instruct"  # built-in name or HF causal-LM folder
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    learning_rate: float = 3e-4  # measured: 60.3% held-out on HH harmless (scripts/bench_reward_hh.py)
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    max_length: int = 192  # tokens of prompt + answer after pre-truncation
    use_margin: bool = False  # pass pair.margin to the loss (-logsigmoid(r_c - r_r - margin))
    center_rewards_coefficient: float | None = None
    ensemble: int = 1  # K LoRA heads; K > 1 trains each on a bootstrap resample
    bf16: bool | None = None  # null = bf16 autocast when the CPU/GPU supports it
    threads: int = 2  # torch CPU threads (per process)
    num_processes: int = 1  # > 1: data-parallel under `accelerate launch` (training/launch.py)
    save_steps: int = 20  # checkpoint every N optimizer steps (resume point)
    logging_steps: int = 10
    score_batch_size: int = 8
    max_train_pairs: int | None = None  # cap (after mixing), for quick runs
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    trl: dict[str, Any] = field(default_factory=dict)  # extra trl.RewardConfig fields, validated by name

    def __post_init__(self):
        positive = {"lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "max_length": self.max_length, "ensemble": self.ensemble,
                    "threads": self.threads, "num_processes": self.num_processes, "save_steps": self.save_steps, "score_batch_size": self.score_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise ValueError(f"learning_rate and epochs must be > 0, got {self.learning_rate}, {self.epochs}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("lora_dropout and warmup_ratio must be in [0, 1)")
        if self.max_length < 16:
            raise ValueError(f"max_length must be ≥ 16 tokens, got {self.max_length}")


# ---------------------------------------------------------------------------------------------------- helpers
def main_process() -> bool:
    """True unless this is a non-main process of an `accelerate launch` run (which must not write files)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def trl_args(config_cls, ours: dict[str, Any], extra: dict[str, Any], section: str):
    """Build a TRL config from our mapped args plus the user's `trl:` extras (unknown names → CurateError)."""
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise CurateError(
            f"{section}.trl.{unknown[0]}: not a field of trl.{config_cls.__name__}; remove it or use one of the "
            f"documented {config_cls.__name__} arguments (e.g. {', '.join(sorted(known)[:6])}, ...)"
        )
    try:
        return config_cls(**{**ours, **extra})
    except (TypeError, ValueError) as exc:
        raise CurateError(f"{section}.trl: trl.{config_cls.__name__} rejected the arguments: {exc}") from exc


def lora_config(cfg, task_type: str):
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
    )


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def trainer_step(checkpoint: str | None) -> int | None:
    """The global step of a `checkpoint-N` folder (None when not resuming)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else None


def _load_seqcls(base: Path, dtype):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)


def prepare_training(cfg, work_dir: str | Path) -> tuple[Path, Path, Any]:
    """Shared start of both trainers: resolve the base model, make the work folder, set threads, load the
    tokenizer. Returns (base model folder, work folder, tokenizer)."""
    import torch

    from training.models import resolve_model

    base = resolve_model(cfg.base_model)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    return base, work_dir, load_tokenizer(base)


def load_tokenizer(base: Path):
    """The base model's tokenizer, with pad = eos when it has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, use_margin: bool) -> dict[str, list]:
    """Columns `chosen_ids`, `rejected_ids` (and `margin`) for TRL's RewardTrainer (already truncated)."""
    cols: dict[str, list] = {"chosen_ids": [], "rejected_ids": []}
    if use_margin:
        cols["margin"] = []
    for p in pairs:
        cols["chosen_ids"].append(encode_pair(tokenizer, p.prompt, answer_text(p.chosen), max_length))
        cols["rejected_ids"].append(encode_pair(tokenizer, p.prompt, answer_text(p.rejected), max_length))
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
    stats["seconds"] = round(time.monotonic() - t0, 1)
    return stats


def _train_member(base, tokenizer, cols, cfg, member_dir: Path, *, seed: int, progress: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    use_bf16 = fast_bf16() if cfg.bf16 is None else cfg.bf16
    set_seed(seed)  # the new score head's init
    model = _load_seqcls(base, torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, lora_config(cfg, "SEQ_CLS"))
    ckpt_dir = member_dir / "checkpoints"
    args = trl_args(
        RewardConfig,
        dict(
            output_dir=str(ckpt_dir), seed=seed, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler, max_length=None,
            center_rewards_coefficient=cfg.center_rewards_coefficient, bf16=use_bf16, fp16=False,
            gradient_checkpointing=False, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
            logging_steps=cfg.logging_steps, report_to=[], disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, remove_unused_columns=True,
        ),
        cfg.trl, "reward",
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_dict(cols), processing_class=tokenizer)
    t0 = time.monotonic()
    resume = last_checkpoint(ckpt_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():  # under accelerate launch only the main process writes
        trainer.model.save_pretrained(member_dir / "adapter.partial")
        shutil.rmtree(member_dir / "adapter", ignore_errors=True)
        (member_dir / "adapter.partial").rename(member_dir / "adapter")
    trainer.accelerator.wait_for_everyone()
    steps_done = trainer.state.global_step
    n_trained = (steps_done - (trainer_step(resume) or 0)) * cfg.batch_size * cfg.grad_accum
    return {
        "train_loss": float(result.training_loss), "losses": losses, "steps": steps_done,
        "resumed_from": Path(resume).name if resume else None, "seconds": round(seconds, 1),
        "pairs_per_second": round(n_trained / seconds, 3) if seconds > 0 else None, "bf16": use_bf16,
    }


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
        """Load a folder written by `train_reward_model` (`<dir>/model`). fp32 by default (exact, comparable)."""
        import torch
        from peft import PeftModel

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
        model = _load_seqcls(base, getattr(torch, dtype))
        model.config.pad_token_id = tokenizer.pad_token_id
        members = [f"member-{k}" for k in range(card["members"])]
        model = PeftModel.from_pretrained(model, folder / members[0], adapter_name=members[0])
        for name in members[1:]:
            model.load_adapter(folder / name, adapter_name=name)
        model.eval()
        return cls(model, tokenizer, members, card["max_length"], card.get("score_batch_size", 8))

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

        encoded = [self._encode(x) for x in items]
        order = np.argsort([len(e) for e in encoded])  # similar lengths per batch: less padding
        out = np.zeros((len(self.members), len(items)), dtype=np.float64)
        pad = self.tokenizer.pad_token_id
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for name_i, name in enumerate(self.members):
            self.model.set_adapter(name)
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
        return out

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
