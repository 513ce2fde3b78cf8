"""Preference pairs for training: loading, the held-out split, replay mixing and pre-truncation.

- `load_round_pairs(rnd)`: the pairs a round's `pull` step produced (`pull/pairs.parquet`, PreferencePair rows);
  round 0's are the imported seed labels (`labels/pairs.parquet`, curation/steps/labels.py): `pairs_step(rnd)`.
- `load_round_feedback(rnd)`: the unpaired thumbs up/down a round's `pool` step collected from traffic
  (`pool/feedback.parquet`, Feedback rows; none when the file is absent); round 0's: the imported unpaired labels
  (`labels/feedback.parquet`): `feedback_step(rnd)`; `unroll_pairs` turns pairs into
  Feedback (chosen → desirable, rejected → undesirable) for trainers on unpaired data (KTO).
- `load_hh_pairs(path)`: Anthropic HH transcripts (`{"chosen": "\\n\\nHuman: ...", "rejected": ...}`) as pairs.
- `split_heldout(pairs, n)`: the deterministic held-out split. Pairs are ordered by `heldout_rank` (a hash of the
  pair's prompt and answers, independent of file order and of the machine) and the first `n` are held out. The
  same file and `n` always give the same split; adding pairs to the file never moves a pair from held-out to
  train unless it is pushed past rank `n`. Training drops every pair whose prompt is also a held-out prompt
  (`prompt_key`), so held-out prompts are never trained on, even when they reach the pool.
- `mix_replay(new, earlier, cfg, rng)`: the round's pairs (or feedback) plus a replay buffer of earlier rounds',
  each item repeated by its weight (new data weighted higher, older rounds decayed).
- `encode_pair` / `truncate_conversation`: pre-truncation, because TRL drops (RewardTrainer) or cuts the wrong
  end of over-long pairs: the prompt keeps its end (the last turns matter most), the answer keeps its start.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl, read_rows
from preference.schema import Feedback, PreferencePair, parse_hh_pair, stable_id

FEEDBACK_FILE = "feedback.parquet"  # written by the pool step for `format: traffic` sources
Item = TypeVar("Item", PreferencePair, Feedback)  # what replay mixes: both have `id` and `round`


@dataclass
class ReplayConfig:
    """How earlier rounds' pairs are mixed into a round's training set.

    The training set is the round's new pairs, each repeated `new_weight` times, plus `ratio * len(new)` pairs
    (at most) sampled without replacement from the last `rounds` earlier rounds (all when null), each repeated
    `weight` times. The replay budget is split across earlier rounds in proportion to `decay**(age - 1)` (age 1 =
    the previous round), so newer rounds contribute more. Fractional weights are realized by a seeded coin flip
    for the extra copy, so the expected number of copies equals the weight.
    """

    ratio: float = 1.0  # max replay pairs per new pair; 0 = no replay
    rounds: int | None = None  # how many earlier rounds to draw from; null = all
    new_weight: float = 2.0  # copies of each new pair per epoch
    weight: float = 1.0  # copies of each replayed pair per epoch
    decay: float = 0.5  # share of the replay budget: ∝ decay**(age - 1)

    def __post_init__(self):
        if self.ratio < 0:
            raise ValueError(f"replay.ratio must be ≥ 0, got {self.ratio}")
        if self.rounds is not None and self.rounds < 0:
            raise ValueError(f"replay.rounds must be ≥ 0 or null, got {self.rounds}")
        if self.new_weight <= 0 or self.weight < 0:
            raise ValueError(f"replay weights must be > 0 (new) and ≥ 0 (replay), got {self.new_weight}, {self.weight}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"replay.decay must be in (0, 1], got {self.decay}")


@dataclass
class MixedPairs:
    """A training set: `pairs` (with repeats, shuffled; Feedback items when mixing feedback) and where they came
    from."""

    pairs: list
    counts: dict[str, int]  # new, replay, total (with repeats), unique
    lineage: dict[str, list[str]]  # "round-N" -> ids of the unique pairs used from that round


# ----------------------------------------------------------------------------------------------------- loading
def pairs_step(rnd):
    """The step holding a round's preference pairs: `pull` (reviewers' answers), or `labels` in round 0 (the
    imported seed labels, curation/steps/labels.py)."""
    return rnd.step("labels" if rnd.number == 0 else "pull")


def feedback_step(rnd):
    """The step holding a round's unpaired judgements: `pool` (traffic thumbs), or `labels` in round 0."""
    return rnd.step("labels" if rnd.number == 0 else "pool")


def load_round_pairs(rnd) -> list[PreferencePair]:
    """The preference pairs of a round's finished `pull` step (round 0: its `labels` step)."""
    return [PreferencePair.from_row(r) for r in read_rows(pairs_step(rnd).file("pairs.parquet"))]


def earlier_round_pairs(rnd, rounds: int | None = None) -> list[tuple[int, list[PreferencePair]]]:
    """(age, pairs) for earlier rounds with a finished `pull` step (round 0: `labels`), newest first; age 1 = the
    previous round."""
    return [(age, load_round_pairs(prev)) for age, prev in enumerate(rnd.earlier(rounds), 1) if pairs_step(prev).done]


def load_round_feedback(rnd) -> list[Feedback]:
    """The unpaired judgements (thumbs up/down) a round's `pool` step collected (round 0: the imported ones); []
    when it wrote none."""
    step = feedback_step(rnd)
    path = step.path / FEEDBACK_FILE
    if not step.done or not path.is_file():
        return []
    return [Feedback.from_row(r) for r in read_rows(path)]


def earlier_round_feedback(rnd, rounds: int | None = None) -> list[tuple[int, list[Feedback]]]:
    """(age, feedback) for earlier rounds, newest first; age 1 = the previous round (as `earlier_round_pairs`)."""
    return [(age, load_round_feedback(prev)) for age, prev in enumerate(rnd.earlier(rounds), 1)]


def unroll_pairs(pairs: list[PreferencePair]) -> list[Feedback]:
    """Each pair as two unpaired judgements: its chosen answer desirable, its rejected answer undesirable."""
    out = []
    for p in pairs:
        for answer, label in ((p.chosen, True), (p.rejected, False)):
            source = f"pair:{p.id}"
            out.append(Feedback(id=Feedback.make_id(p.prompt_id, answer_text(answer), source), prompt_id=p.prompt_id,
                                prompt=p.prompt, completion=answer, label=label, source=source, round=p.round))
    return out


def load_hh_pairs(path: str | Path, *, slice_name: str = "harmless", strict: bool = False) -> list[PreferencePair]:
    """Read HH transcripts (jsonl, gz ok) as pairs; rows may carry `slice`/`category` and `rejected_harmful`.

    Rows that are not a comparison of two answers to one prompt (malformed transcripts, identical answers) are
    skipped, or raise with `strict`.
    """
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"held-out file {path} not found; set evaluation.heldout to an HH jsonl(.gz) file")
    pairs = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        try:
            prompt, chosen, rejected = parse_hh_pair(row)
        except ValueError as exc:  # not a comparison of two answers to one prompt
            if not strict:
                continue
            raise CurateError(f"{path}:{lineno}: not an HH pair ({exc}); expected 'chosen' and 'rejected' transcripts") from exc
        prompt_id = prompt_key(prompt)
        chosen_msg = [{"role": "assistant", "content": chosen}]
        rejected_msg = [{"role": "assistant", "content": rejected}]
        pairs.append(
            PreferencePair(
                id=PreferencePair.make_id(prompt_id, stable_id(chosen), stable_id(rejected)),
                prompt_id=prompt_id, prompt=prompt, chosen=chosen_msg, rejected=rejected_msg,
                slice=str(row.get("slice") or row.get("category") or slice_name),
                source=f"hh:{path.name}:{lineno}", rejected_harmful=bool(row.get("rejected_harmful", False)),
            )
        )
    if not pairs:
        raise CurateError(f"{path}: no usable HH pairs (two different answers to the same prompt)")
    return pairs


def prompt_key(messages: list[dict[str, str]]) -> str:
    """Content key of a prompt conversation (whitespace-normalized), to keep held-out prompts out of training."""
    norm = [{"role": m["role"], "content": " ".join(m["content"].split())} for m in messages]
    return stable_id(norm, prefix="q")


def heldout_rank(pair: PreferencePair) -> str:
    """Sort key of the held-out split: sha256 of the prompt and both answers (order- and machine-independent)."""
    blob = json.dumps([pair.prompt, pair.chosen, pair.rejected], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def split_heldout(pairs: list[PreferencePair], n: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, heldout): the `n` pairs of lowest `heldout_rank` are held out; train drops their prompts too."""
    if n < 0 or n >= len(pairs):
        raise CurateError(f"held-out size {n} must be in [0, {len(pairs) - 1}] for {len(pairs)} pairs")
    ordered = sorted(pairs, key=heldout_rank)
    heldout = ordered[:n]
    held = {prompt_key(p.prompt) for p in heldout}
    train = [p for p in pairs if prompt_key(p.prompt) not in held]
    return train, heldout


def drop_heldout_prompts(items: list[Item], heldout: list[PreferencePair]) -> list[Item]:
    """`items` (pairs or feedback) minus those whose prompt is a held-out prompt."""
    held = {prompt_key(p.prompt) for p in heldout}
    return [p for p in items if prompt_key(p.prompt) not in held]


# ------------------------------------------------------------------------------------------------------ mixing
def _copies(weight: float, rng: np.random.Generator) -> int:
    whole = math.floor(weight)
    return whole + int(rng.random() < weight - whole)


def mix_replay(
    new: list[Item],
    earlier: list[tuple[int, list[Item]]],
    cfg: ReplayConfig,
    rng: np.random.Generator,
    *,
    round_number: int = 0,
) -> MixedPairs:
    """The round's pairs plus a weighted replay sample of earlier rounds' pairs (see `ReplayConfig`); the same
    for Feedback items.

    Pairs already in the new set (same id) are not replayed; a round with fewer pairs than its share gives what
    it has.
    """
    new_ids = {p.id for p in new}
    pools = [(age, [p for p in pairs if p.id not in new_ids]) for age, pairs in earlier]
    pools = [(age, pairs) for age, pairs in pools if pairs]
    budget = int(round(cfg.ratio * len(new))) if cfg.ratio > 0 and cfg.weight > 0 else 0
    weights = {age: cfg.decay ** (age - 1) for age, _ in pools}
    total_w = sum(weights.values())
    out: list[Item] = []
    lineage: dict[str, list[str]] = {}
    n_new = n_replay = 0
    for p in new:
        k = _copies(cfg.new_weight, rng)
        out += [p] * k
        n_new += k
    if new:
        lineage[f"round-{round_number}"] = [p.id for p in new]
    remaining = budget
    for i, (age, pairs) in enumerate(pools):
        if remaining <= 0:
            break
        share = remaining if i == len(pools) - 1 else int(round(budget * weights[age] / total_w))
        take = min(len(pairs), share, remaining)
        if take <= 0:
            continue
        picked = [pairs[j] for j in sorted(rng.choice(len(pairs), size=take, replace=False))]
        remaining -= take
        rnd_no = picked[0].round if picked[0].round else round_number - age
        lineage.setdefault(f"round-{rnd_no}", []).extend(p.id for p in picked)
        for p in picked:
            k = _copies(cfg.weight, rng)
            out += [p] * k
            n_replay += k
    order = rng.permutation(len(out))
    out = [out[i] for i in order]
    unique = len({p.id for p in out})
    return MixedPairs(out, {"new": n_new, "replay": n_replay, "total": len(out), "unique": unique}, lineage)


# -------------------------------------------------------------------------------------------------- truncation
def _ids(encoding) -> list[int]:
    return list(encoding["input_ids"] if not isinstance(encoding, list) else encoding)


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """Chat-template token ids of a prompt, ending with the assistant-turn opener (what generation continues)."""
    return _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))


def chat_ids(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of prompt + answer as the chat template renders them: the prompt ends with the
    assistant-turn opener, the answer carries the template's end-of-turn tokens. The one prompt/answer split
    (reward-model inputs, DPO log-probs). Templates that rewrite earlier turns once an answer is added fall back
    to the answer's own tokens after the generation prompt."""
    prefix = prompt_ids(tokenizer, prompt)
    full = _ids(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True))
    if full[: len(prefix)] == prefix:
        return prefix, full[len(prefix):]
    return prefix, _ids(tokenizer(answer, add_special_tokens=False))


def encode_pair(tokenizer, prompt: list[dict], answer: str, max_length: int) -> list[int]:
    """Chat-template token ids of prompt + answer, at most `max_length` long.

    The answer keeps its first tokens (at least half the budget when it is long), the prompt keeps its last
    tokens (the latest turns). No pair is dropped.
    """
    prefix, answer_ids = chat_ids(tokenizer, prompt, answer)
    if len(prefix) + len(answer_ids) <= max_length:
        return prefix + answer_ids
    answer_budget = max(max_length - len(prefix), max_length // 2)
    answer_ids = answer_ids[:answer_budget]
    prompt_budget = max_length - len(answer_ids)
    return prefix[len(prefix) - prompt_budget:] + answer_ids if prompt_budget > 0 else answer_ids


def truncate_conversation(tokenizer, prompt: list[dict], max_tokens: int) -> list[dict]:
    """Drop the oldest turns (then cut the start of the oldest kept message) until the prompt fits `max_tokens`.

    The result still ends with the user turn. Used for DPO, whose trainer tokenizes conversations itself.
    """
    def length(msgs):
        return len(prompt_ids(tokenizer, msgs))

    msgs = [dict(m) for m in prompt]
    while len(msgs) > 1 and length(msgs) > max_tokens:
        msgs = msgs[1:]
        while msgs and msgs[0]["role"] == "assistant" and len(msgs) > 1:
            msgs = msgs[1:]
    if length(msgs) > max_tokens:
        ids = _ids(tokenizer(msgs[0]["content"], add_special_tokens=False))
        overhead = length(msgs) - len(ids)
        keep = max(1, max_tokens - overhead)
        msgs[0]["content"] = tokenizer.decode(ids[-keep:])
    return msgs


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    """The first `max_tokens` tokens of `text` (decoded back to a string)."""
    ids = _ids(tokenizer(text, add_special_tokens=False))
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def answer_text(messages: list[dict[str, str]]) -> str:
    """The text of a single-turn assistant answer in TRL message format."""
    return "\n".join(m["content"] for m in messages)


def pair_length(pair: PreferencePair) -> int:
    """Characters of prompt + both answers (for the long-tail slice)."""
    return sum(len(m["content"]) for m in pair.prompt) + len(answer_text(pair.chosen)) + len(answer_text(pair.rejected))
