"""What every trainer shares: the base config (common fields, one mapping onto TRL's argument names) and the
helpers around a TRL trainer (tokenizer, LoRA, threads, checkpoints and resume, TensorBoard, saving, stats).

    @dataclass
    class MyTrainConfig(TrainConfig):                  # the YAML section `my:`
        section: ClassVar[str] = "my"
        trl_config: ClassVar[str] = "MyConfig"        # the trl.*Config it maps onto
        beta: float = 0.1
        def trl_kwargs(self) -> dict:                  # method-specific TRL arguments
            return {"beta": self.beta}

    args = cfg.to_trl(output_dir, seed=0, progress=True)   # common + method args + the user's `trl:` extras

Precision and threads come from `preference.plumbing.hardware`: `bf16: null` = bf16 autocast only where the
hardware computes it natively (`fast_bf16`), `threads: null` = the usable cores split across the training
processes. Metrics go through TRL's `report_to`: by default TensorBoard event files in the step folder when
tensorboard is installed; `report_to: [mlflow]`, `[wandb]`, ... as in any TRL script; `[]` turns logging off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from preference.plumbing.errors import CurateError
from preference.plumbing.hardware import cuda_available, fast_bf16, resolve_threads
from preference.plumbing.io import write_json
from training.data import ReplayConfig

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TENSORBOARD = "tensorboard"

# transformers' report_to integrations → the modules each needs (any one of them), checked before training so a
# missing package is one clear line instead of a traceback from inside the Trainer
_REPORTER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",),
                     "comet_ml": ("comet_ml",), "clearml": ("clearml",), "trackio": ("trackio",),
                     "swanlab": ("swanlab",), "dvclive": ("dvclive",), "neptune": ("neptune",),
                     "codecarbon": ("codecarbon",), "azure_ml": ("azureml",), "dagshub": ("dagshub",),
                     "flyte": ("flytekit",), "kubeflow": ("kubeflow",)}


def tensorboard_available() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in _REPORTER_MODULES[TENSORBOARD])


@dataclass
class TrainConfig:
    """Fields every trainer section has. Subclasses add their own fields and method-specific TRL arguments
    (`trl_kwargs`); `trl:` passes further arguments of the TRL config by name (unknown names fail)."""

    section: ClassVar[str] = ""  # the YAML section (= the trainer's kind in training/trainers.py)
    trl_config: ClassVar[str] = ""  # the trl config class it maps onto, e.g. "RewardConfig"

    enabled: bool = True  # false: the round's train step records "skipped" and nothing downstream uses it
    base_model: str = "smollm2-135m-instruct"  # built-in name or HF causal-LM folder
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 2
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    bf16: bool | None = None  # null = bf16 autocast where the hardware is fast at it (hardware.fast_bf16)
    threads: int | None = None  # torch CPU threads per process; null = the usable cores / num_processes
    num_processes: int = 1  # > 1: data-parallel under `accelerate launch` (training/launch.py)
    save_steps: int = 10  # checkpoint every N optimizer steps (resume point)
    logging_steps: int = 5
    max_train_pairs: int | None = None  # cap (after mixing), for quick runs
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    report_to: list[str] | None = None  # TRL report_to; null = [tensorboard] when installed (step folder), else []
    trl: dict[str, Any] = field(default_factory=dict)  # extra fields of the TRL config, validated by name

    def __post_init__(self):
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "num_processes", "save_steps",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be ≥ 1 or null (= all usable cores), got {self.threads}")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise ValueError(f"learning_rate and epochs must be > 0, got {self.learning_rate}, {self.epochs}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("lora_dropout and warmup_ratio must be in [0, 1)")
        if self.max_train_pairs is not None and self.max_train_pairs < 1:
            raise ValueError(f"max_train_pairs must be ≥ 1 or null, got {self.max_train_pairs}")

    # ------------------------------------------------------------------------------------------ resolution
    def use_bf16(self) -> bool:
        return fast_bf16() if self.bf16 is None else self.bf16

    def reporters(self) -> list[str]:
        """The resolved `report_to`: the configured list, or [tensorboard] when installed, else []."""
        if self.report_to is None:
            return [TENSORBOARD] if tensorboard_available() else []
        unknown = [r for r in self.report_to if r not in _REPORTER_MODULES]
        if unknown:
            raise CurateError(f"{self.section}.report_to: {unknown[0]!r} is not a TRL/transformers integration; use "
                              f"one of {', '.join(sorted(_REPORTER_MODULES))}, or [] for none")
        for name in self.report_to:
            modules = _REPORTER_MODULES[name]
            if not any(importlib.util.find_spec(m) for m in modules):
                raise CurateError(f"{self.section}.report_to: {name} is not installed; `pip install {modules[0]}` "
                                  f"or remove {name!r} from {self.section}.report_to")
        return list(self.report_to)

    def threads_per_process(self, processes: int = 1) -> int:
        """`threads`, or the usable cores split evenly across `processes` training processes."""
        return self.threads if self.threads else max(1, resolve_threads(None) // max(1, processes))

    # --------------------------------------------------------------------------------------- TRL mapping
    def trl_kwargs(self) -> dict[str, Any]:
        """Method-specific TRL arguments (subclasses override)."""
        return {}

    def to_trl(self, output_dir: str | Path, *, seed: int, progress: bool):
        """The TRL config of this section: the common fields mapped onto TRL's names, the method's own arguments,
        then the user's `trl:` extras (which win)."""
        import trl

        ours = dict(
            output_dir=str(output_dir), seed=seed, learning_rate=self.learning_rate, num_train_epochs=self.epochs,
            max_steps=self.max_steps, per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum, warmup_steps=self.warmup_ratio,
            weight_decay=self.weight_decay, lr_scheduler_type=self.lr_scheduler, bf16=self.use_bf16(), fp16=False,
            gradient_checkpointing=False, save_strategy="steps", save_steps=self.save_steps, save_total_limit=2,
            logging_steps=self.logging_steps, disable_tqdm=not progress, use_cpu=not cuda_available(),
            dataloader_num_workers=0,
            # TensorBoard is attached by `tensorboard_callbacks` (so its files land in the step folder)
            report_to=[r for r in self.reporters() if r != TENSORBOARD],
            **self.trl_kwargs(),
        )
        return trl_args(getattr(trl, self.trl_config), ours, self.trl, self.section)


# ---------------------------------------------------------------------------------------------------- helpers
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


def main_process() -> bool:
    """True unless this is a non-main process of an `accelerate launch` run (which must not write files)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def lora_config(cfg: TrainConfig, task_type: str):
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


@contextlib.contextmanager
def merged_adapter(model, enabled: bool = True) -> Iterator[None]:
    """Within the block the active LoRA adapter is merged into the base weights (PEFT's `merge_adapter` /
    `unmerge_adapter`): one matmul per projection instead of three small ones and the adapter's bookkeeping. On
    2 AVX2 cores (medians of 3 alternating runs, SmolLM2): greedy generation and reward scoring ≈ 1.2× faster,
    policy log-probs ≈ 1.05×, the same numbers to float rounding (tested). Unmerging restores the base weights to
    rounding (≈ 1e-7 relative), so repeated calls agree to that rounding, not bit for bit. Only for float32
    models (merging into bf16 weights would round the adapter away) and when `enabled` (the adapter is on)."""
    import torch

    if not (enabled and getattr(model, "peft_config", None) and model.dtype == torch.float32):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def load_tokenizer(base: Path):
    """The base model's tokenizer, with pad = eos when it has no pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def prepare_training(cfg: TrainConfig, work_dir: str | Path) -> tuple[Path, Path, Any]:
    """Shared start of every trainer: resolve the base model, make the work folder, set threads (per process),
    load the tokenizer. Returns (base model folder, work folder, tokenizer)."""
    import torch
    from accelerate import PartialState

    from training.models import resolve_model

    base = resolve_model(cfg.base_model)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads_per_process(PartialState().num_processes))
    return base, work_dir, load_tokenizer(base)


def causal_lm(base: Path):
    """The base causal LM in fp32 (the trainer autocasts to bf16 where `bf16` says so)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def tensorboard_callbacks(cfg: TrainConfig, log_dir: Path) -> list:
    """[TensorBoardCallback writing into `log_dir`] when `report_to` has tensorboard (main process only)."""
    if TENSORBOARD not in cfg.reporters() or not main_process():
        return []
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboardX only
        from tensorboardX import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))]


def fit(trainer, checkpoints: Path) -> tuple[Any, float, str | None]:
    """`trainer.train()`, resuming from the last checkpoint in `checkpoints`. Returns (result, seconds, resumed)."""
    resume = last_checkpoint(checkpoints)
    t0 = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume)
    return result, time.monotonic() - t0, resume


def fit_stats(trainer, result, seconds: float, resume: str | None, cfg: TrainConfig, unit: str) -> dict[str, Any]:
    """Loss curve, steps, `<unit>_per_second` (examples trained in this run / seconds) and the precision used."""
    steps = trainer.state.global_step
    done = (steps - (trainer_step(resume) or 0)) * cfg.batch_size * cfg.grad_accum * trainer.accelerator.num_processes
    return {
        "train_loss": float(result.training_loss), "steps": steps, "seconds": round(seconds, 1),
        f"{unit}_per_second": round(done / seconds, 3) if seconds > 0 else None, "bf16": cfg.use_bf16(),
        "resumed_from": Path(resume).name if resume else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def save_adapter(trainer, dest: Path, card_name: str | None = None, card: dict | None = None) -> None:
    """Save the trained LoRA adapter (and a model card) to `dest`: written to `dest.partial`, then renamed. Only
    the main process writes (under `accelerate launch`); every process waits for it."""
    if trainer.is_world_process_zero():
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        trainer.model.save_pretrained(staging)
        if card_name:
            write_json(staging / card_name, card or {})
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    trainer.accelerator.wait_for_everyone()
