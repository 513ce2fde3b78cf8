"""Evaluation of the table's trainers (`training.trainers.TRAINERS`) on held-out preference pairs: one function
per role, `evaluate_reward_dir` (reward models) and `evaluate_policy_dir` (DPO, KTO and any other policy).

Reward model: pairwise accuracy (share of pairs where r(chosen) > r(rejected); ties count half) with a
percentile-bootstrap CI, overall and per slice: category (`slice:<name>`), harm-flagged vs not
(`harm_flagged:yes|no`, from `PreferencePair.rejected_harmful`), long tail by length (`length:long` = the
longest `long_tail_share` of pairs by characters, `length:rest`). A flip check re-scores a subset with chosen
and rejected swapped, one pair at a time, and verifies the accuracy flips to 1 - accuracy and every text keeps
its score (no padding/batching effect).

Policy (DPO, KTO): implicit-reward accuracy and margins on held-out pairs (beta * (log π/π_ref(chosen) − log
π/π_ref(rejected)) > 0, reference = the base with the adapter disabled), win rate against the previous policy
(greedy answers to held-out prompts, judged by the current reward model; ties count half) and held-out
perplexity of the chosen answers (lower = better), prompts and answers truncated as the trainer saw them (its
section's `max_prompt_length` / `max_completion_length`). Log-probs and answers are computed in batches; the previous
policy shares the loaded base when it can (the base itself = the adapter disabled; another adapter on the same
base = a second adapter), so the base is loaded once.

Models are loaded in `evaluation.dtype` (`auto` = bf16 only where the hardware is fast at it, see
`preference.plumbing.hardware`); exact comparisons (tests, the flip check's tolerance) use float32.

The held-out set is `evaluation.heldout` (an HH jsonl file): `training.data.split_heldout` holds out its first
`heldout_size` pairs in hash order, and training never sees those prompts (see `training/data.py`).
Results: `metrics.json` + `metrics.txt` (a table).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from preference.plumbing.hardware import Dtype
from preference.schema import PreferencePair
from training.data import pair_length
from training.trainers import TRAINERS


@dataclass
class EvalConfig:
    """`evaluation:` section."""

    RENAMED: ClassVar[dict[str, str]] = {"dpo_pairs": "policy_pairs"}  # it serves every policy trainer (DPO, KTO)

    heldout: Path = Path("data/hh-harmless-dev.jsonl.gz")  # HH jsonl(.gz) file; never trained on (see split)
    heldout_size: int = 300  # pairs held out from `heldout` (first in hash order)
    bootstrap: int = 1000  # bootstrap resamples for CIs
    confidence: float = 0.95
    seed: int = 0
    long_tail_share: float = 0.1  # the longest share of pairs forms the `length:long` slice
    flip_check_pairs: int = 32  # pairs re-scored swapped (0 = off)
    compare_champion: bool = True  # also score the registry's champion on the same held-out set
    # held-out pairs for each policy's (DPO, KTO, ...) implicit-reward accuracy / perplexity (4 passes per pair)
    policy_pairs: int = 64
    win_rate_prompts: int = 16  # held-out prompts for the win rate vs the previous policy (0 = off)
    max_new_tokens: int = 64
    batch_size: int = 8  # sequences per forward pass (policy log-probs and generation)
    dtype: Dtype = "auto"  # models' precision: auto = bf16 only where fast (hardware.resolve_dtype), else fp32
    threads: int | None = None  # torch threads; null = all usable cores (hardware.resolve_threads)

    def __post_init__(self):
        if self.heldout_size < 1 or self.bootstrap < 0:
            raise ValueError(f"heldout_size must be ≥ 1 and bootstrap ≥ 0, got {self.heldout_size}, {self.bootstrap}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")
        if not 0 < self.long_tail_share < 1:
            raise ValueError(f"long_tail_share must be in (0, 1), got {self.long_tail_share}")
        for name in ("flip_check_pairs", "policy_pairs", "win_rate_prompts", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError(f"batch_size must be ≥ 1 and threads ≥ 1 or null, got {self.batch_size}, {self.threads}")


@dataclass
class EvalContext:
    """What every evaluation function of the table gets besides its model folder and config section."""

    heldout: list[PreferencePair]
    cfg: EvalConfig
    dtype: str = "float32"  # resolved (no "auto")
    judge: Any = None  # the round's reward model: judges policies' win rates (set after the reward model)
    previous_policy: str | Path | None = None  # the policy to beat (the champion's); None = the trainer's base
    progress: bool = False


@dataclass
class Evaluation:
    """An evaluation function's result: metrics (under the trainer's kind in metrics.json); a reward model also
    returns itself as the `judge` of later evaluations and its held-out scores."""

    metrics: dict[str, Any]
    judge: Any = None
    heldout_scores: tuple[np.ndarray, np.ndarray] | None = None


# ------------------------------------------------------------------------------------------------- statistics
def bootstrap_ci(values: np.ndarray, *, n_boot: int, confidence: float, rng: np.random.Generator) -> list[float]:
    """Percentile bootstrap CI of the mean of `values` ([lo, hi]); [mean, mean] when n_boot = 0 or n < 2."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else float("nan")
    if n_boot == 0 or len(values) < 2:
        return [mean, mean]
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]


def pair_correct(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 where chosen scores higher, 0.5 on ties, 0 where the rejected answer wins."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    return np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))


def summarize(correct: np.ndarray, margins: np.ndarray, cfg: EvalConfig, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "n": int(len(correct)),
        "accuracy": float(np.mean(correct)) if len(correct) else float("nan"),
        "ci": bootstrap_ci(correct, n_boot=cfg.bootstrap, confidence=cfg.confidence, rng=rng),
        "mean_margin": float(np.mean(margins)) if len(margins) else float("nan"),
    }


def slice_masks(pairs: list[PreferencePair], long_tail_share: float) -> dict[str, np.ndarray]:
    """Boolean masks of the evaluation slices (see module docstring)."""
    masks: dict[str, np.ndarray] = {}
    for name in sorted({p.slice for p in pairs}):
        masks[f"slice:{name}"] = np.array([p.slice == name for p in pairs])
    harmful = np.array([bool(p.rejected_harmful) for p in pairs])
    masks["harm_flagged:yes"] = harmful
    masks["harm_flagged:no"] = ~harmful
    lengths = np.array([pair_length(p) for p in pairs])
    if len(pairs):
        cut = np.quantile(lengths, 1 - long_tail_share)
        masks["length:long"] = lengths > cut
        masks["length:rest"] = lengths <= cut
    return {k: v for k, v in masks.items() if v.any()}


def pairwise_report(
    pairs: list[PreferencePair], chosen: np.ndarray, rejected: np.ndarray, cfg: EvalConfig
) -> dict[str, Any]:
    """Accuracy with CI, overall and per slice, from the chosen/rejected scores of `pairs`."""
    rng = np.random.default_rng(cfg.seed)
    correct = pair_correct(chosen, rejected)
    margins = np.asarray(chosen) - np.asarray(rejected)
    out = summarize(correct, margins, cfg, rng)
    out["slices"] = {
        name: summarize(correct[mask], margins[mask], cfg, rng)
        for name, mask in slice_masks(pairs, cfg.long_tail_share).items()
    }
    return out


def format_table(rows: list[tuple[str, dict[str, Any]]], title: str) -> str:
    """A fixed-width text table of (name, summary) rows."""
    lines = [title, f"{'slice':<28} {'n':>5} {'accuracy':>9} {'95% CI':>17} {'margin':>8}"]
    for name, s in rows:
        lo, hi = s["ci"]
        lines.append(f"{name:<28} {s['n']:>5} {s['accuracy']:>9.3f} {f'[{lo:.3f}, {hi:.3f}]':>17} {s['mean_margin']:>8.3f}")
    return "\n".join(lines)


def isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


# --------------------------------------------------------------------------------------------- reward model
def evaluate_reward_model(rm, pairs: list[PreferencePair], cfg: EvalConfig, *, progress: bool = False):
    """(report, (chosen scores, rejected scores)): accuracy + CI per slice, and the flip check."""
    chosen, rejected = rm.score_pairs(pairs, progress=progress)
    report = pairwise_report(pairs, chosen, rejected, cfg)
    if cfg.flip_check_pairs:
        report["flip_check"] = flip_check(rm, pairs[: cfg.flip_check_pairs], chosen, rejected)
    return report, (chosen, rejected)


FLIP_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # max score change from batching/padding alone


def flip_check(rm, pairs: list[PreferencePair], chosen: np.ndarray, rejected: np.ndarray) -> dict[str, Any]:
    """Re-score `pairs` with chosen and rejected swapped, one pair at a time (no padding, other batches).

    The swapped accuracy must be 1 − accuracy, and each text must get the score it got in the padded batches
    (`max_score_diff`, within the rounding of the model's dtype); `ok` is False when a label or batching/padding
    bug breaks either.
    """
    n = len(pairs)
    if n == 0:
        return {"n": 0, "accuracy": float("nan"), "swapped_accuracy": float("nan"), "max_score_diff": 0.0, "ok": True}
    scores = [rm.score_pairs([dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen)]) for p in pairs]
    c2 = np.array([float(c[0]) for c, _ in scores])
    r2 = np.array([float(r[0]) for _, r in scores])
    acc = float(pair_correct(chosen[:n], rejected[:n]).mean())
    flipped = float(pair_correct(c2, r2).mean())
    max_diff = float(max(np.abs(c2 - rejected[:n]).max(), np.abs(r2 - chosen[:n]).max()))
    tolerance = FLIP_TOLERANCE.get(getattr(rm, "dtype", "float32"), FLIP_TOLERANCE["float32"])
    return {"n": n, "accuracy": acc, "swapped_accuracy": flipped, "max_score_diff": max_diff,
            "tolerance": tolerance, "ok": bool(abs(acc + flipped - 1) < 1e-9 and max_diff < tolerance)}


def evaluate_reward_dir(model_dir: str | Path, section, ctx: EvalContext) -> Evaluation:
    """The table's evaluation of a reward model folder: `evaluate_reward_model` on the held-out pairs; the loaded
    model becomes the judge of the policies evaluated after it."""
    from training.reward import RewardModel

    rm = RewardModel.load(model_dir, dtype=ctx.dtype)
    report, scores = evaluate_reward_model(rm, ctx.heldout, ctx.cfg, progress=ctx.progress)
    report["dtype"] = rm.dtype
    return Evaluation(report, judge=rm, heldout_scores=scores)


# --------------------------------------------------------------------------------------------------- policy
def evaluate_policy_dir(model_dir: str | Path, section, ctx: EvalContext) -> Evaluation:
    """The table's evaluation of a policy folder (DPO, KTO): `evaluate_policy` with the section's beta, against
    the previous policy (the champion's, else the section's base model), judged by the round's reward model."""
    previous = ctx.previous_policy or section.base_model
    # read prompts and answers as the trainer saw them (its truncation) where its section sets one
    lengths = {ours: getattr(section, theirs) for ours, theirs in
               (("max_prompt", "max_prompt_length"), ("max_answer", "max_completion_length")) if hasattr(section, theirs)}
    return Evaluation(evaluate_policy(model_dir, previous, ctx.judge, ctx.heldout, ctx.cfg, beta=section.beta,
                                      progress=ctx.progress, dtype=ctx.dtype, **lengths))


def evaluate_policy(
    policy_dir: str | Path, previous: str | Path, rm, pairs: list[PreferencePair], cfg: EvalConfig,
    *, beta: float = 0.1, progress: bool = False, dtype: str = "float32", max_prompt: int = 192,
    max_answer: int = 128,
) -> dict[str, Any]:
    """Policy metrics on held-out pairs: implicit-reward accuracy/margins, perplexity, win rate vs `previous`.

    `previous` is the policy to beat (a policy model folder or a base model name/folder); the judge is `rm`
    (no win rate without one). Prompts keep their last `max_prompt` tokens, answers their first `max_answer`.
    """
    from tqdm.auto import tqdm

    from training.data import answer_text
    from training.policy import Policy

    rng = np.random.default_rng(cfg.seed)
    policy = Policy.load(policy_dir, dtype=dtype, batch_size=cfg.batch_size)
    subset = pairs[: cfg.policy_pairs]
    prompts = [p.prompt for p in subset]
    chosen = [answer_text(p.chosen) for p in subset]
    rejected = [answer_text(p.rejected) for p in subset]
    lengths = {"max_prompt": max_prompt, "max_answer": max_answer}
    bar = tqdm(total=4, disable=not progress, desc="policy log-probs", leave=False)
    pc, nc = policy.logps(prompts, chosen, **lengths)
    bar.update()
    pr, _ = policy.logps(prompts, rejected, **lengths)
    bar.update()
    with policy.reference():
        rc, _ = policy.logps(prompts, chosen, **lengths)
        bar.update()
        rr, _ = policy.logps(prompts, rejected, **lengths)
        bar.update()
    bar.close()
    margins = beta * ((pc - rc) - (pr - rr))
    correct = np.where(margins > 0, 1.0, np.where(margins == 0, 0.5, 0.0))
    out: dict[str, Any] = {"implicit": summarize(correct, margins, cfg, rng)}
    out["implicit_accuracy"] = out["implicit"]["accuracy"]
    out["implicit_margin"] = out["implicit"]["mean_margin"]
    out["slices"] = {
        name: {**summarize(correct[m], margins[m], cfg, rng), "implicit_accuracy": float(correct[m].mean())}
        for name, m in slice_masks(subset, cfg.long_tail_share).items()
    }
    tokens = max(int(nc.sum()), 1)
    out["perplexity"] = float(math.exp(-pc.sum() / tokens))  # lower = better
    out["reference_perplexity"] = float(math.exp(-rc.sum() / tokens))
    out["dtype"] = policy.dtype
    if cfg.win_rate_prompts and rm is not None:
        win_prompts = [p.prompt for p in pairs[: cfg.win_rate_prompts]]
        new = policy.generate(win_prompts, max_new_tokens=cfg.max_new_tokens, max_prompt=max_prompt)
        old = _previous_answers(policy, previous, win_prompts, cfg, dtype, max_prompt)
        r_new = rm.reward([p + [{"role": "assistant", "content": a}] for p, a in zip(win_prompts, new, strict=True)])
        r_old = rm.reward([p + [{"role": "assistant", "content": a}] for p, a in zip(win_prompts, old, strict=True)])
        wins = pair_correct(r_new, r_old)
        out["win_rate"] = float(wins.mean())
        out["win_rate_ci"] = bootstrap_ci(wins, n_boot=cfg.bootstrap, confidence=cfg.confidence, rng=rng)
        out["win_rate_vs"] = str(previous)
        out["win_rate_prompts"] = len(win_prompts)
    return out


def _previous_answers(policy, previous: str | Path, prompts: list, cfg: EvalConfig, dtype: str,
                      max_prompt: int = 192) -> list[str]:
    """Greedy answers of the previous policy, from the already loaded base where possible."""
    from training.policy import MODEL_CARD, Policy, policy_base

    if not Path(previous, MODEL_CARD).is_file() and policy_base(previous) == policy.base:
        with policy.reference():  # the previous policy is this base model: the adapter disabled
            return policy.generate(prompts, max_new_tokens=cfg.max_new_tokens, max_prompt=max_prompt)
    if policy.add_adapter(previous, "previous"):  # another adapter on the same base
        with policy.adapter("previous"):
            return policy.generate(prompts, max_new_tokens=cfg.max_new_tokens, max_prompt=max_prompt)
    other = Policy.load(previous, dtype=dtype, batch_size=cfg.batch_size)
    return other.generate(prompts, max_new_tokens=cfg.max_new_tokens, max_prompt=max_prompt)


def format_report(metrics: dict[str, Any], title: str) -> str:
    """Text tables of a metrics dict: per trainer of the table, by role (reward: slices; policy: summary)."""
    parts = []
    for kind, entry in TRAINERS.items():
        m = metrics.get(kind)
        if not m:
            continue
        if entry.role == "reward_model":
            rows = [("all", m)] + sorted(m.get("slices", {}).items())
            parts.append(format_table(rows, f"{title}: {kind} model pairwise accuracy"))
            flip = m.get("flip_check")
            if flip:
                parts.append(f"flip check: {flip['n']} pairs, accuracy {flip['accuracy']:.3f} → swapped "
                             f"{flip['swapped_accuracy']:.3f}, max score diff {flip['max_score_diff']:.2e}: "
                             f"{'ok' if flip['ok'] else 'FAILED'}")
        else:
            rows = [("all", m["implicit"])] + sorted(m.get("slices", {}).items())
            parts.append(format_table(rows, f"{title}: {kind.upper()} implicit-reward accuracy"))
            line = f"perplexity {m['perplexity']:.2f} (reference {m['reference_perplexity']:.2f})"
            if "win_rate" in m:
                lo, hi = m["win_rate_ci"]
                line += f"; win rate vs {m['win_rate_vs']}: {m['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]"
            parts.append(line)
    return "\n\n".join(parts)
