"""`curate select`: acquisition strategies pick the next items for humans, beside a random arm, and choose
which of each item's completions reviewers see.

Reads the scoring step's `score/prompt_scores.parquet` (one row per prompt: prompt_id, slice, signal columns,
embedding), `score/completion_scores.parquet` (completion ids and embeddings), the `rewards` step's champion
rewards when it has any, and `generate/completions.parquet` (texts, for exact duplicates) when present. Writes
`select/selected.parquet`, one row per chosen prompt:

    prompt_id, slice, arm ("strategy" | "random"), strategy, score, rank, reason, completion_ids,
    completion_choice, <every signal>, embedding

- `score` is the strategy's score of the item (higher = more informative; also filled for the random arm, so
  arms can be compared), `rank` the 1-based pick order within its arm, `reason` a human-readable why (the
  signal that stands out most, its value and its percentile in the pool, in the direction the strategy states).
- The pipeline is the strategy wrapped by composition (`curation.acquisition.strategies`): `DropNearDuplicates`,
  `SliceQuotas`, then `RandomArm` — `round(k · random_share)` of the k items drawn uniformly from the same
  eligible pool, excluding the strategy's picks, so every round measures the strategy against random honestly —
  inside `ExcludeIds` (items selected in any earlier round, `rnd.earlier()`, unless they came back as failures or
  feedback) and `Budget` (`selection.budget` over all rounds). Earlier rounds' picks count as covered for
  diversity strategies and near-duplicate filtering.
- Error-based signals: pool prompts whose `source` starts with "failure:" or whose metadata names a failure
  (`failure` / `failure_reason`: "harm_flagged", "human_disagreement", "low_ranked", ...), plus an optional
  feedback file (jsonl of {"prompt_id": ..., "reason": ...}) give an `error_score` in [0, 1] (0 = none).
- Reward signals (`reward_margin`, `reward_disagreement`, `reward_mean`; `curation.acquisition.ensemble.prompt_reward_signals`)
  come from the champion reward model's member rewards (the `rewards` step: a TRL LoRA reward model, an ensemble
  when trained with `reward.ensemble: K`), else from the fast Bradley–Terry ensemble (`curation.acquisition.ensemble`)
  fitted on earlier rounds' pairs with their completion embeddings (`selection.reward_source`; `auto` also takes
  the fast ensemble over a single-model champion, whose disagreement is 0 everywhere). In the first round there
  is neither: a plain reward strategy refuses clearly, `S|kcenter` and `hybrid` start with k-center alone.
- `completion_ids`: the completions to show for the prompt (`selection.completions_per_record`, default
  `annotation.completions_per_record`; 2 for a pairwise question), chosen by `selection.completion_choice`
  (`curation.acquisition.pairing`: the uncertainty of the reward difference, with near-duplicates skipped), except for
  round(n · completion_random_share) records drawn at random (`completion_choice` = "random"), in a seeded
  shuffled display order.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.acquisition.ensemble import BTEnsemble, EnsembleConfig, Pairs, prompt_reward_signals
from curation.acquisition.pairing import CHOOSERS, make_chooser
from curation.acquisition.strategies import (
    Budget,
    DropNearDuplicates,
    ExcludeIds,
    Items,
    Random,
    RandomArm,
    SliceQuotas,
    Strategy,
    build_strategy,
    check_finite,
    find_adaptive,
)
from curation.sharded import ShardingConfig, map_shards, session
from preference.plumbing.config import from_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import (
    ROW_GROUP,
    atomic_path,
    iter_batches,
    read_json,
    read_jsonl,
    read_rows,
    read_scores,
    write_json,
)
from preference.schema import stable_id

REWARD_SIGNALS = frozenset({"reward_margin", "reward_disagreement"})
# error_score of a failure reason (max over an item's reasons); unknown failure reasons get "failure".
ERROR_WEIGHTS = {"harm": 1.0, "feedback": 1.0, "disagree": 0.9, "low_rank": 0.7, "failure": 0.5}


@dataclass
class SelectionConfig:
    # a name (entropy, kcenter, ...), "weighted", "hybrid", "A>B" or "S|C" (see strategies.py). The default is the
    # configuration scripts/bench_acquisition.py supports (its CONFIG_DEFAULT, `reward_disagreement|kcenter@0.25`:
    # the reward ensemble's disagreement, k-center until a reward model exists, a 25 % random arm, as every
    # shipped config): ΔAUC above random's with the CI above 0 on all three benchmark datasets (scripts/README.md)
    strategy: str = "reward_disagreement|kcenter"
    k: int = 16  # items per round (strategy arm + random arm)
    random_share: float = 0.25  # share of k drawn at random from the same pool (the control arm)
    weights: dict[str, float] = field(
        default_factory=lambda: {"reward_margin": 1.0, "reward_disagreement": 1.0}
    )  # for "weighted" / "hybrid": strategy name -> weight (scores are rank-normalized before summing)
    candidate_factor: float = 4.0  # "hybrid" / "A>B": A shortlists candidate_factor·k items, B picks k
    slice_quotas: dict[str, int] = field(default_factory=dict)  # slice -> exact number of strategy-arm picks
    budget: int | None = None  # total labelling budget over all rounds (items); null = unlimited
    near_duplicate_threshold: float = 0.98  # cosine similarity of embeddings; 1.0 = only exact duplicates
    feedback_file: Path | None = None  # jsonl of {"prompt_id", "reason"}: user-reported problems (error-based)
    ensemble_members: int = 5  # bootstrap members of the fast reward ensemble (when there is no champion)
    ensemble_c: float = 0.02  # its inverse L2 strength (few pairs, hundreds of embedding dims: strong; as benchmarked)
    # where reward signals come from: auto = the champion reward model (the `rewards` step) when the registry has
    # one trained as an ensemble (reward.ensemble ≥ 2), else the fast Bradley–Terry ensemble on earlier rounds'
    # pairs (a single reward model gives no disagreement), else a single champion; champion = require the
    # champion; ensemble = always the fast ensemble (the rewards step then loads no model)
    reward_source: Literal["auto", "champion", "ensemble"] = "auto"
    # which completions of a picked prompt reviewers see (curation/acquisition/pairing.py): info_gain, thompson, maxmin,
    # delta_ucb, diverse, random
    completion_choice: str = "info_gain"
    completion_random_share: float = 0.15  # share of records whose completions are drawn at random (control arm)
    completions_per_record: int | None = None  # null = annotation.completions_per_record (2 = a pairwise question)
    seed: int | None = None  # null = the round config's seed
    # Ray: reduce the pool shard by shard on workers (the "Ray" part below); the driver gets each shard's
    # candidates, a uniform sample for the random arm and score sketches, never the whole pool
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    shard_candidates: float = 1.5  # with sharding: each shard sends ceil(shard_candidates · k) candidates (≥ 1)

    def __post_init__(self):
        if self.shard_candidates < 1.0:
            raise ValueError(f"shard_candidates must be ≥ 1, got {self.shard_candidates}")
        if self.k < 1:
            raise ValueError(f"k must be ≥ 1, got {self.k}")
        if not 0.0 <= self.random_share < 1.0:
            raise ValueError(f"random_share must be in [0, 1), got {self.random_share}")
        if self.candidate_factor < 1.0:
            raise ValueError(f"candidate_factor must be ≥ 1, got {self.candidate_factor}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be ≥ 1 or null, got {self.budget}")
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise ValueError(f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold}")
        if self.completion_choice not in CHOOSERS:
            raise ValueError(f"completion_choice must be one of {', '.join(CHOOSERS)}, got {self.completion_choice!r}")
        if not 0.0 <= self.completion_random_share <= 1.0:
            raise ValueError(f"completion_random_share must be in [0, 1], got {self.completion_random_share}")
        if self.completions_per_record is not None and not 2 <= self.completions_per_record <= 16:
            raise ValueError(f"completions_per_record must be in 2..16 or null, got {self.completions_per_record}")
        if self.ensemble_c <= 0:
            raise ValueError(f"ensemble_c must be > 0, got {self.ensemble_c}")
        if self.ensemble_members < 1:
            raise ValueError(f"ensemble_members must be ≥ 1, got {self.ensemble_members}")
        for name, w in self.weights.items():
            if w < 0:
                raise ValueError(f"weights.{name} must be ≥ 0, got {w}")
        for name, q in self.slice_quotas.items():
            if q < 0:
                raise ValueError(f"slice_quotas.{name} must be ≥ 0, got {q}")

    def arm_sizes(self, k: int) -> tuple[int, int]:
        """(strategy picks, random picks) for k items: the random arm is round(k · random_share)."""
        return RandomArm(Random(), self.random_share).arm_sizes(k)


# ------------------------------------------------------------------------------------------------ reading
GRID = np.linspace(0.0, 1.0, 513)  # quantile sketch of Ray shards: 513 points (percentiles to ≈ 0.2 %)

def signal_columns(table: pa.Table) -> list[str]:
    skip = {"prompt_id", "completion_id", "slice", "model"}
    return [
        name for name, typ in zip(table.column_names, table.schema.types, strict=True)
        if name not in skip and (pa.types.is_floating(typ) or pa.types.is_integer(typ))
    ]


def load_items(step_dir_file: Path, embeddings: np.ndarray | None = None) -> Items:
    """`prompt_scores.parquet` → Items (ids, slices, every numeric column as a signal, embeddings). `embeddings`:
    the same rows' embeddings from elsewhere (the score step's memory-mapped copy): the column is not read."""
    if embeddings is not None:
        table = pq.read_table(step_dir_file, columns=[c for c in pq.ParquetFile(step_dir_file).schema_arrow.names
                                                      if c != "embedding"])
        if table.num_rows != len(embeddings):
            raise CurateError(f"{step_dir_file}: {table.num_rows} rows but {len(embeddings)} embeddings in its "
                              "memory-mapped copy; redo `curate score --force`")
    else:
        table, embeddings = read_scores(step_dir_file)
    if table.num_rows == 0:
        raise CurateError(
            f"{step_dir_file} holds no scored prompts; nothing to select — check that the pool and the generate "
            "step produced completions, then rerun `curate score`"
        )
    ids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
    if len(set(ids.tolist())) != len(ids):
        raise CurateError(f"{step_dir_file}: repeated prompt_id values; the scoring step must write one row per prompt")
    slices = table.column("slice").to_pylist() if "slice" in table.column_names else None
    signals = {
        name: np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        for name in signal_columns(table)
    }
    return Items(ids=ids, signals=signals, embeddings=embeddings, slices=slices)


def previously_selected(rounds: list) -> tuple[set[str], np.ndarray | None]:
    """Ids selected in earlier rounds and their embeddings (None when none were stored)."""
    ids: set[str] = set()
    embeddings = []
    for r in rounds:
        step = r.step("select")
        if not step.done:
            continue
        table, emb = read_scores(step.file("selected.parquet"))
        ids |= set(map(str, table.column("prompt_id").to_pylist()))
        if emb is not None and emb.size:
            embeddings.append(emb)
    dims = {e.shape[1] for e in embeddings}
    if len(dims) > 1:  # rounds scored with different embedders: keep only the latest dimension
        latest = embeddings[0].shape[1]
        embeddings = [e for e in embeddings if e.shape[1] == latest]
    return ids, (np.concatenate(embeddings) if embeddings else None)


def pool_prompts(rnd) -> list:
    """The round's pool prompts (empty before the pool step): read once for the pool-derived signals below."""
    if not rnd.step("pool").done:
        return []
    from curation.steps.pool import load_prompts

    return load_prompts(rnd)


def pool_signals(rnd, feedback_file: Path | None) -> tuple[dict[str, list[str]], int, dict[str, float]]:
    """(failure reasons, unmatched feedback lines, thumbs-down counts) of the round's pool, streamed: only the
    pool's id, source and metadata columns are read, a batch at a time (`failure_reasons`, `thumbs_down_counts`)."""
    from preference.schema import Prompt

    reasons: dict[str, list[str]] = {}
    thumbs: dict[str, float] = {}
    known: set[str] = set()
    if rnd.step("pool").done:
        for batch in iter_batches(rnd.step("pool").file("prompts.parquet"), columns=["id", "source", "metadata"]):
            if feedback_file is not None:
                known.update(batch.column("id").to_pylist())
            # only rows that can carry a signal become prompts (a pool of millions is mostly neither)
            source, meta = batch.column("source"), batch.column("metadata")
            maybe = pc.or_(pc.fill_null(pc.starts_with(source, "failure:"), False),
                           pc.fill_null(pc.or_(pc.match_substring(meta, "failure"),
                                               pc.match_substring(meta, "thumbs_down")), False))
            rows = batch.filter(maybe).to_pylist()
            prompts = [Prompt(id=r["id"], messages=[], source=r["source"] or "",
                              metadata=json.loads(r["metadata"]) if r["metadata"] else {}) for r in rows]
            found, _ = failure_reasons(prompts, None)
            for pid, why in found.items():
                reasons.setdefault(pid, []).extend(why)
            thumbs.update(thumbs_down_counts(prompts))
    unmatched = 0
    if feedback_file is not None:
        found, unmatched = failure_reasons([], feedback_file, known=known)
        for pid, why in found.items():
            reasons.setdefault(pid, []).extend(why)
    return reasons, unmatched, thumbs


def thumbs_down_counts(prompts: list) -> dict[str, float]:
    """prompt id → how many of its served answers users rated down (traffic metadata `thumbs_down`; pool items
    without traffic feedback are absent): the `thumbs_down` signal, higher = more informative."""
    out = {}
    for p in prompts:
        value = (p.metadata or {}).get("thumbs_down")
        if value not in (None, "", "0"):
            try:
                out[p.id] = float(value)
            except (TypeError, ValueError):
                continue  # not a count (a pool source's own metadata field of that name): no signal
    return out


def failure_reasons(prompts: list, feedback_file: Path | None, known: set[str] | None = None
                    ) -> tuple[dict[str, list[str]], int]:
    """prompt id → failure reasons, from the pool's `prompts` (source "failure:..." / metadata) and the feedback
    file. Returns (reasons, number of feedback lines whose prompt id is unknown to the pool: the ids of `prompts`,
    or `known`)."""
    reasons: dict[str, list[str]] = {}
    known = known if known else ({p.id for p in prompts} if prompts else None)
    for p in prompts:
        meta = p.metadata or {}
        tags = [str(meta[key]) for key in ("failure", "failure_reason") if meta.get(key)]
        if p.source.startswith("failure:") or tags:
            reasons.setdefault(p.id, []).extend(tags or [p.source])
    unmatched = 0
    if feedback_file is not None:
        path = Path(feedback_file)
        if not path.is_file():
            raise CurateError(f"selection.feedback_file {path} not found; give a jsonl of {{prompt_id, reason}} rows")
        try:
            rows = read_jsonl(path)
        except ValueError as exc:
            raise CurateError(f"selection.feedback_file: {exc}") from exc
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict) or not row.get("prompt_id"):
                raise CurateError(f"{path}: row {i} has no prompt_id; each line must be {{\"prompt_id\", \"reason\"}}")
            pid = str(row["prompt_id"])
            if known is not None and pid not in known:
                unmatched += 1
            reasons.setdefault(pid, []).append(f"feedback: {row.get('reason', '')}".strip())
    return reasons, unmatched


def error_score(reasons: list[str]) -> float:
    best = 0.0
    for reason in reasons:
        text = reason.lower().replace("-", "_").replace(" ", "_")
        hits = [w for key, w in ERROR_WEIGHTS.items() if key in text]
        best = max(best, max(hits) if hits else ERROR_WEIGHTS["failure"])
    return best


def earlier_pairs(rounds: list) -> tuple[Pairs | None, int]:
    """Preference pairs of earlier rounds with the embeddings of their answers (from those rounds' scores)."""
    chosen, rejected, missing = [], [], 0
    for r in rounds:
        # a loop round's completions are embedded by its score step; round 0's imported answers by its embed step
        scores = r.step("score") if r.step("score").done else r.step("embed")
        if not scores.done:
            continue
        table, emb = read_scores(scores.file("completion_scores.parquet"))
        if emb is None:
            continue
        index = {cid: i for i, cid in enumerate(table.column("completion_id").to_pylist())}
        for step_dir in sorted(p for p in r.path.iterdir() if p.is_dir()):
            pairs_file = step_dir / "pairs.parquet"
            if not (step_dir / "manifest.json").is_file() or not pairs_file.is_file():
                continue
            for row in read_rows(pairs_file):
                a, b = index.get(row.get("chosen_id")), index.get(row.get("rejected_id"))
                if a is None or b is None:
                    missing += 1
                    continue
                chosen.append(emb[a])
                rejected.append(emb[b])
    if not chosen:
        return None, missing
    return Pairs(np.stack(chosen), np.stack(rejected)), missing


@dataclass
class Completions:
    """The round's completions as selection sees them: ids, prompt ids, models, texts (None when the generate
    step is not there), embeddings (None without), and the (K, C) member rewards once a reward model gave them."""

    ids: list[str]
    prompt_ids: list[str]
    models: list[str]
    texts: list[str] | None
    embeddings: np.ndarray | None
    rewards: np.ndarray | None = None
    reward_info: dict = field(default_factory=dict)


def load_completions(rnd, prompt_ids: set[str] | None = None) -> Completions:
    """`score/completion_scores.parquet` (+ texts from `generate/completions.parquet` when it finished); with
    `prompt_ids`, only those prompts' completions, streamed (a pool's completion embeddings can be gigabytes)."""
    path = rnd.step("score").file("completion_scores.parquet")
    from curation.steps.score import gather_rows

    mapped = _mapped(rnd.step("score"), "completion_scores.parquet")
    if prompt_ids is None and mapped is not None:  # every completion: the memory map itself (paged in on use)
        table = pq.read_table(path, columns=[c for c in pq.ParquetFile(path).schema_arrow.names if c != "embedding"])
        emb = mapped
    elif prompt_ids is None:
        table, emb = read_scores(path)
    elif mapped is not None:
        table = pq.read_table(path, columns=[c for c in pq.ParquetFile(path).schema_arrow.names if c != "embedding"])
        rows = np.flatnonzero(np.asarray(pc.is_in(table.column("prompt_id"),
                                                  value_set=pa.array(sorted(prompt_ids), pa.string()))
                                         .to_numpy(zero_copy_only=False)))
        table, emb = table.take(rows), gather_rows(mapped, rows)  # only the picked prompts' rows leave the disk
    else:
        table, emb = _read_filtered(path, prompt_ids)
    if table.num_rows == 0:
        return Completions([], [], [], None, None)
    ids = [str(x) for x in table.column("completion_id").to_pylist()]
    models = table.column("model").to_pylist() if "model" in table.column_names else [""] * len(ids)
    texts = None
    if rnd.step("generate").done:
        wanted = pa.array(sorted(set(ids)), pa.string())
        by_id = {}
        for batch in iter_batches(rnd.step("generate").file("completions.parquet"), columns=["id", "text"]):
            if prompt_ids is not None:
                batch = batch.filter(pc.is_in(batch.column("id"), value_set=wanted))
            by_id.update(zip(batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True))
        texts = [by_id.get(cid, "") for cid in ids]
    return Completions(ids, [str(x) for x in table.column("prompt_id").to_pylist()], [str(m) for m in models],
                       texts, emb)


def _mapped(step, name: str) -> np.ndarray | None:
    from curation.steps.score import memmap_embeddings

    return memmap_embeddings(step, name)


def _read_filtered(path: Path, prompt_ids: set[str]) -> tuple[pa.Table, np.ndarray | None]:
    """`read_scores` of the rows whose prompt_id is in `prompt_ids`, streamed batch by batch."""
    handle = pq.ParquetFile(path)
    if handle.metadata.num_rows == 0 or "prompt_id" not in handle.schema_arrow.names:
        return read_scores(path)
    wanted = pa.array(sorted(prompt_ids), pa.string())
    tables, vectors = [], []
    for batch in handle.iter_batches(batch_size=ROW_GROUP):
        batch = batch.filter(pc.is_in(batch.column("prompt_id"), value_set=wanted))
        if not batch.num_rows:
            continue
        table = pa.Table.from_batches([batch])
        if "embedding" in table.column_names:
            col = table.column("embedding").combine_chunks()
            vectors.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1))
            table = table.drop_columns(["embedding"])
        tables.append(table)
    if not tables:
        schema = pa.schema([f for f in handle.schema_arrow if f.name != "embedding"])
        return pa.Table.from_pylist([], schema=schema), None
    return pa.concat_tables(tables), (np.concatenate(vectors) if vectors else None)


def rewards_possible(sel: SelectionConfig, rnd, rounds: list) -> bool:
    """Whether `attach_rewards` can find rewards (a champion's in the rewards step, or earlier rounds' pairs),
    looked up without reading any completion: the first round of a large pool never loads them all."""
    if sel.reward_source != "ensemble" and rnd.step("rewards").done and rnd.step("rewards").manifest().get(
            "reward_model"):
        return True
    if sel.reward_source == "champion":
        return True  # attach_rewards explains why there is none
    return any((d / "manifest.json").is_file() and (d / "pairs.parquet").is_file()
               for r in rounds if r.path.is_dir() for d in r.path.iterdir() if d.is_dir())


def attach_rewards(comps: Completions, sel: SelectionConfig, rnd, rounds: list, seed: int) -> bool:
    """Fill `comps.rewards` (K, C) from the champion (the `rewards` step) or, when there is none, the fast
    Bradley–Terry ensemble fitted on earlier rounds' pairs (`selection.reward_source` decides). False when
    neither is available (the first round)."""
    from curation.steps.rewards import load_completion_rewards

    champion = load_completion_rewards(rnd) if sel.reward_source != "ensemble" else None
    single = None  # a one-model champion set aside for the ensemble (auto)
    earlier = None  # earlier rounds' pairs, read once
    if champion is not None and sel.reward_source == "auto" and champion[2].shape[0] < 2:
        # one reward model has no disagreement (reward_disagreement 0 everywhere, info_gain no heads to ask):
        # auto takes the fast ensemble, which has, when earlier rounds have pairs to fit it on
        earlier = earlier_pairs(rounds)
        pairs = earlier[0]
        if pairs is not None and len(pairs) >= 2 and comps.embeddings is not None:
            single = rnd.step("rewards").manifest()["reward_model"]["version"]
            champion = None
    if champion is not None:
        ids, _, rewards = champion
        column = {cid: j for j, cid in enumerate(ids)}
        missing = [cid for cid in comps.ids if cid not in column]
        if missing:
            raise CurateError(
                f"rewards/{'completion_rewards.parquet'} has no reward for completion {missing[0]!r} (and "
                f"{len(missing) - 1} more); the rewards step is stale: redo it with --force"
            )
        comps.rewards = rewards[:, [column[cid] for cid in comps.ids]]
        model = rnd.step("rewards").manifest()["reward_model"]
        comps.reward_info = {"source": "champion", **model}
        return True
    if sel.reward_source == "champion":
        raise CurateError(
            "selection.reward_source is 'champion' but the rewards step scored nothing (no champion reward model); "
            "run the rewards step after a promoted round, or set selection.reward_source: auto"
        )
    pairs, missing = earlier if earlier is not None else earlier_pairs(rounds)
    if pairs is None or len(pairs) < 2:
        return False
    if comps.embeddings is None:
        raise CurateError("score/completion_scores.parquet has no embedding column; rerun `curate score`")
    model = BTEnsemble(EnsembleConfig(members=sel.ensemble_members, c=sel.ensemble_c, seed=seed)).fit(pairs)
    step = 65_536  # in chunks: the ensemble works in float64 (a copy of the pool's completion embeddings otherwise)
    comps.rewards = np.concatenate([model.reward(comps.embeddings[a : a + step])
                                    for a in range(0, len(comps.embeddings), step)], axis=1) \
        if len(comps.embeddings) else model.reward(comps.embeddings)
    comps.reward_info = {"source": "ensemble", "pairs": len(pairs), "pairs_without_embeddings": missing,
                         "members": sel.ensemble_members}
    if single is not None:
        comps.reward_info["instead_of"] = (f"champion {single}: a single reward model gives no disagreement "
                                           "(train it with reward.ensemble ≥ 2 to use it here)")
    return True


def add_reward_signals(items: Items, comps: Completions) -> None:
    """Per-prompt `reward_margin`, `reward_disagreement`, `reward_mean` from the completions' member rewards."""
    row_of = {pid: i for i, pid in enumerate(items.ids.tolist())}
    keep = np.array([pid in row_of for pid in comps.prompt_ids], dtype=bool)
    index = np.array([row_of[pid] for pid, k in zip(comps.prompt_ids, keep, strict=True) if k], dtype=np.int64)
    items.signals.update(prompt_reward_signals(comps.rewards[:, keep], index, len(items)))


def choose_completions(comps: Completions, prompt_ids: list[str], sel: SelectionConfig, m: int, models: list[str],
                       seed: int) -> tuple[list[list[str]], list[str]]:
    """Per selected prompt: the completion ids to show (display order: a seeded shuffle) and the chooser used.

    round(n · completion_random_share) of the prompts (a seeded draw) get the `random` chooser — the control arm
    of completion choice — and the rest `selection.completion_choice`."""
    by_prompt: dict[str, list[int]] = {}
    for j, (pid, model) in enumerate(zip(comps.prompt_ids, comps.models, strict=True)):
        if not models or model in models:
            by_prompt.setdefault(pid, []).append(j)
    rng = np.random.default_rng([seed, 7])
    n_random = int(math.floor(len(prompt_ids) * sel.completion_random_share + 0.5))
    random_rows = set(rng.choice(len(prompt_ids), size=n_random, replace=False).tolist()) if prompt_ids else set()
    chooser = make_chooser(sel.completion_choice, sel.near_duplicate_threshold)
    control = make_chooser("random", sel.near_duplicate_threshold)
    out, used = [], []
    for row, pid in enumerate(prompt_ids):
        rows = np.asarray(by_prompt.get(pid, []), dtype=np.int64)
        which = control if row in random_rows else chooser
        if len(rows) == 0:
            out.append([])
            used.append(which.name)
            continue
        prompt_rng = np.random.default_rng([seed, int(stable_id(pid, length=12), 16)])
        picked = which.choose(
            None if comps.rewards is None else comps.rewards[:, rows],
            None if comps.embeddings is None else comps.embeddings[rows],
            m, prompt_rng, texts=None if comps.texts is None else [comps.texts[j] for j in rows],
        )
        shown = rows[picked][prompt_rng.permutation(len(picked))]
        out.append([comps.ids[j] for j in shown])
        used.append(which.name if (comps.rewards is not None or not which.needs_rewards) else "diverse")
    return out, used


# ----------------------------------------------------------------------------------------------- explaining
def percentile(values: np.ndarray, value: float) -> float:
    return 100.0 * float(np.mean(values <= value)) if len(values) else float("nan")


class Percentiles:
    """`percentile` (and its mirror, the share of values ≥ a value) by binary search in sorted copies, for
    explaining thousands of picks in a pool of millions (the same numbers as `np.mean(values <= value)`)."""

    def __init__(self):
        self._sorted: dict[int, tuple[np.ndarray, int]] = {}

    def _of(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        key = id(values)
        if key not in self._sorted:
            finite = np.sort(values[~np.isnan(values)])
            self._sorted[key] = (finite, len(values))
        return self._sorted[key]

    def at_most(self, values: np.ndarray, value: float) -> float:
        """100 × share of values ≤ value."""
        ordered, n = self._of(values)
        if not n:
            return float("nan")
        return 0.0 if np.isnan(value) else 100.0 * np.searchsorted(ordered, value, side="right") / n

    def at_least(self, values: np.ndarray, value: float) -> float:
        """100 × share of values ≥ value."""
        ordered, n = self._of(values)
        if not n:
            return float("nan")
        return 0.0 if np.isnan(value) else 100.0 * (len(ordered) - np.searchsorted(ordered, value, side="left")) / n


def explain(strategy: Strategy, items: Items, scores: np.ndarray, i: int, arm: str, errors: dict,
            pct: Percentiles | None = None) -> str:
    """Human-readable reason for item i: the arm, its score percentile and its most extreme input signal (in
    the direction the strategy states: `Strategy.directions`). `pct`: share one across the calls of a step."""
    pct = pct or Percentiles()
    parts = []
    if arm == "random":
        parts.append("random arm: uniform draw from the pool left after the strategy's picks")
    value = scores[i] + 0.0  # no "-0"
    parts.append(f"{strategy.name} score {value:.4g} (p{pct.at_most(scores, scores[i]):.0f} of pool)")
    best = None
    for col, higher in strategy.directions().items():
        if col not in items.signals:
            continue
        values = items.signals[col]
        share = pct.at_most(values, values[i]) if higher else pct.at_least(values, values[i])
        if best is None or share > best[2]:
            best = (col, values[i], share, higher)
    if best is not None:
        col, value, share, higher = best
        parts.append(f"{col}={value:.4g} ({'high' if higher else 'low'}: p{share:.0f} in the informative direction)")
    if errors.get(items.ids[i]):
        parts.append("error-based: " + "; ".join(errors[items.ids[i]])[:200])
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- step
def file_digest(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_select(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    sel: SelectionConfig = cfg.selection
    seed = cfg.seed if sel.seed is None else sel.seed
    score_step = rnd.step("score")
    rounds = list(rnd.earlier())
    inputs = (score_step,) + tuple(rnd.step(n) for n in ("pool", "generate", "rewards") if rnd.step(n).done)
    if rounds and rounds[0].step("select").done:
        inputs += (rounds[0].step("select"),)
    strategy = build_strategy(sel.strategy, weights=sel.weights, candidate_factor=sel.candidate_factor)
    adaptive = find_adaptive(strategy)
    if adaptive is not None:  # its allocation reads every earlier round's picks and the pairs that came back
        have = {s.path for s in inputs}
        inputs += tuple(r.step(n) for r in rounds for n in ("select", "pull") if r.step(n).done and
                        r.step(n).path not in have)
    m = sel.completions_per_record or cfg.annotation.completions_per_record
    key = {"selection": sel, "seed": seed, "feedback_sha256": file_digest(sel.feedback_file),
           "completions_per_record": m, "annotation_models": list(cfg.annotation.models)}
    run = rnd.start_step("select", key, inputs=inputs, seeds={"seed": seed}, force=force)
    if run is None:
        return rnd.step("select").manifest()
    if sel.sharding.backend != "none":
        needs_rewards = bool(REWARD_SIGNALS & set(strategy.inputs)) or make_chooser(sel.completion_choice).needs_rewards
        why_not = ("the adaptive strategy" if adaptive is not None else
                   "reward signals (computed on the driver)" if needs_rewards and rewards_possible(sel, rnd, rounds)
                   else None)
        if why_not is None:
            with run:
                labelled_ids, labelled_emb = previously_selected(rounds)
                reasons, unmatched, thumbs = pool_signals(rnd, sel.feedback_file)
                select_sharded(run, cfg, rnd, strategy=strategy, seed=seed, m_shown=m, rounds=rounds,
                               labelled_ids=labelled_ids, labelled_emb=labelled_emb, reasons=reasons,
                               unmatched=unmatched, thumbs=thumbs, progress=progress)
            return rnd.step("select").manifest()
        run.extra["sharding"] = {"backend": "none", "why": f"not sharded: {why_not}"}
    with run:
        labels_so_far = adaptive_update(adaptive, rounds, sel, seed) if adaptive is not None else {}
        pool = load_items(score_step.file("prompt_scores.parquet"), _mapped(score_step, "prompt_scores.parquet"))
        labelled_ids, labelled_emb = previously_selected(rounds)
        if labelled_emb is not None and pool.embeddings is not None and labelled_emb.shape[1] != pool.embeddings.shape[1]:
            labelled_emb = None  # a different embedder than this round's: cannot compare distances
        pool.labelled = labelled_emb
        reasons, unmatched, thumbs = pool_signals(rnd, sel.feedback_file)
        pool.signals["error_score"] = np.array([error_score(reasons[pid]) if pid in reasons else 0.0
                                                for pid in pool.ids])
        pool.signals["thumbs_down"] = np.array([thumbs.get(pid, 0.0) for pid in pool.ids])
        needs_rewards = bool(REWARD_SIGNALS & set(strategy.inputs))
        have_rewards = False
        comps = None  # every completion only when rewards can be had; else the picked prompts', after the picks
        if (needs_rewards or make_chooser(sel.completion_choice).needs_rewards) and rewards_possible(sel, rnd, rounds):
            comps = load_completions(rnd)
            have_rewards = attach_rewards(comps, sel, rnd, rounds, seed)
        if have_rewards:
            add_reward_signals(pool, comps)
            info = dict(comps.reward_info)
            run.extra["reward_signals"] = info.pop("source")  # "champion" or "ensemble"
            run.extra["reward_model" if run.extra["reward_signals"] == "champion" else "reward_ensemble"] = info
        elif needs_rewards and not strategy.usable_without(REWARD_SIGNALS):
            raise CurateError(
                "reward-based strategies (reward_margin, reward_disagreement) need preference pairs from an earlier "
                "round or a champion reward model (the `rewards` step); found neither: use an uncertainty or "
                "diversity strategy in the first round, or give it a cold start "
                "(e.g. strategy: reward_disagreement|kcenter)"
            )
        # Labelled items leave the pool, except those sent back as failures / feedback (error-based candidates);
        # the strategy arm (quotas, near-duplicates) and the random arm pick within the labelling budget.
        arms: Strategy = strategy
        if sel.near_duplicate_threshold < 1.0 and pool.embeddings is not None:
            arms = DropNearDuplicates(arms, sel.near_duplicate_threshold)
        if sel.slice_quotas:
            arms = SliceQuotas(arms, sel.slice_quotas)
        random_arm = RandomArm(arms, sel.random_share)
        eligible_only = ExcludeIds(random_arm, labelled_ids - set(reasons))
        chain: Strategy = eligible_only
        if sel.budget is not None:
            chain = Budget(chain, sel.budget, used=len(labelled_ids))
            if chain.remaining <= 0:
                raise CurateError(
                    f"labelling budget exhausted: {len(labelled_ids)} items selected in earlier rounds, "
                    f"selection.budget={sel.budget}; raise the budget or stop the loop"
                )
        eligible = eligible_only.allowed(pool)
        if len(eligible) == 0:
            raise CurateError(
                f"round {rnd.number}: no unlabelled prompts left ({len(pool)} scored, all selected in earlier "
                "rounds); add prompts to the pool"
            )
        picks, random_picks = chain.select_arms(pool, sel.k, np.random.default_rng(seed))
        items = pool.subset(eligible)
        scores = strategy.checked_score(items)
        row_of = {int(i): r for r, i in enumerate(eligible)}
        arm_name = (lambda i: adaptive.attribution.get(str(pool.ids[i]), strategy.name)) if adaptive is not None \
            else (lambda i: strategy.name)
        chosen = [("strategy", arm_name(i), i) for i in picks] + [("random", "random", i) for i in random_picks]
        if comps is None:
            comps = load_completions(rnd, {str(pool.ids[i]) for _, _, i in chosen})
        shown, choosers = choose_completions(comps, [str(pool.ids[i]) for _, _, i in chosen], sel, m,
                                             list(cfg.annotation.models), seed)
        pct = Percentiles()
        rows, rank = [], {"strategy": 0, "random": 0}
        for (arm, name, i), completion_ids, chooser in zip(chosen, shown, choosers, strict=True):
            rank[arm] += 1
            r = row_of[int(i)]
            row = {
                "prompt_id": str(items.ids[r]),
                "slice": str(items.slices[r]),
                "arm": arm,
                "strategy": name,
                "score": float(scores[r]),
                "rank": rank[arm],
                "reason": (f"adaptive's {name} arm; " if adaptive is not None and arm == "strategy" else "")
                          + explain(strategy, items, scores, r, arm, reasons, pct),
                "completion_ids": completion_ids,
                "completion_choice": chooser,
            }
            row.update({col: float(v[r]) for col, v in items.signals.items()})
            if items.embeddings is not None:
                row["embedding"] = items.embeddings[r]  # a vector: `write_selected` stores it without Python floats
            rows.append(row)
        write_selected(run.path / "selected.parquet", rows, list(items.signals), items.embeddings is not None)
        run.counts.update(
            scored=len(pool),
            excluded_labelled=len(pool) - len(items),
            selected=len(rows),
            strategy_arm=len(picks),
            random_arm=len(random_picks),
            error_items=int((items.signals["error_score"] > 0).sum()),
        )
        if unmatched:
            run.counts["feedback_unmatched"] = unmatched
        run.extra["strategy"] = strategy.name
        run.extra["completion_choice"] = {"method": sel.completion_choice, "per_record": m,
                                          "random_share": sel.completion_random_share}
        if adaptive is not None:
            run.extra["adaptive"] = write_adaptive_state(run.path / "adaptive.json", adaptive, rows, labels_so_far)
        notes = []
        if needs_rewards and not have_rewards and adaptive is None:
            notes.append("cold start: no reward model yet (no champion, no earlier pairs), the strategy's diversity "
                         "part picked from the whole pool")
        if "error_score" in strategy.inputs and not (items.signals["error_score"] > 0).any():
            notes.append("error-based strategy, but no failure or feedback items in the pool: picks are random")
        k_used = min(sel.k, len(eligible), chain.remaining if isinstance(chain, Budget) else sel.k)
        n_strategy = random_arm.arm_sizes(k_used)[0]
        if len(picks) < n_strategy:
            notes.append(f"the strategy arm found {len(picks)} of {n_strategy} items (near-duplicates or quotas "
                         "left too few)")
        if notes:
            run.extra["note"] = "; ".join(notes)
    return rnd.step("select").manifest()


# ----------------------------------------------------------------------------------------------- adaptive
def adaptive_update(adaptive, rounds: list, sel: SelectionConfig, seed: int) -> dict[str, int]:
    """Carry the measurements of the newest earlier `select/adaptive.json`, then measure every earlier round's
    arms not measured yet on the pairs that came back (`curation.acquisition.arms.round_label_log`: each pair's arm from its
    round's `strategy` column; the learner is one Bradley–Terry model on the answers' embeddings, C =
    selection.ensemble_c). Returns the labels (items asked) each arm got in earlier rounds."""
    from curation.acquisition.arms import pair_heldout, round_label_log

    for r in rounds:  # newest first
        path = r.step("select").path / "adaptive.json"
        if r.step("select").done and path.is_file():
            adaptive.load_state(read_json(path))
            break
    log, pairs = round_label_log(rounds)
    adaptive.update(log, pair_heldout(pairs, sel.ensemble_c), np.random.default_rng([seed, 3]))
    labels: dict[str, int] = {}
    for (_, arm), n in log.spent.items():
        labels[arm] = labels.get(arm, 0) + n
    return labels


def write_adaptive_state(path: Path, adaptive, rows: list[dict], labels_so_far: dict[str, int]) -> dict:
    """`select/adaptive.json` (written before the manifest): the portfolio, every measurement so far, each arm's
    value with its interval, this round's allocation (planned and picked) and the reason. Returns the manifest's
    summary of it."""
    state = adaptive.state()
    picked = {arm: 0 for arm in adaptive.arms}
    for row in rows:
        if row["arm"] == "strategy" and row["strategy"] in picked:
            picked[row["strategy"]] += 1
    state["picked"] = picked
    state["labels_before"] = {arm: labels_so_far.get(arm, 0) for arm in [*adaptive.arms, "random"]}
    write_json(path, state)
    values = {arm: {k: v[k] for k in ("measured_rounds", "value", "value_ci", "relative", "relative_ci")}
              for arm, v in state["values"].items()}
    return {"arms": list(adaptive.arms), "picked": picked, "reason": state["reason"], "values": values,
            "labels_before": state["labels_before"]}


def write_selected(path: Path, rows: list[dict], signals: list[str], with_embedding: bool) -> None:
    fields = [
        pa.field("prompt_id", pa.string()), pa.field("slice", pa.string()), pa.field("arm", pa.string()),
        pa.field("strategy", pa.string()), pa.field("score", pa.float64()), pa.field("rank", pa.int64()),
        pa.field("reason", pa.string()),
    ]
    fields += [pa.field("completion_ids", pa.list_(pa.string())), pa.field("completion_choice", pa.string())]
    fields += [pa.field(name, pa.float64()) for name in signals]
    vectors = None
    if with_embedding:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
        if rows and isinstance(rows[0].get("embedding"), np.ndarray):
            vectors = np.stack([row.pop("embedding") for row in rows]).astype(np.float32)
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields[:-1] if vectors is not None else fields))
    if vectors is not None:
        offsets = pa.array(np.arange(len(vectors) + 1, dtype=np.int32) * vectors.shape[1])
        table = table.append_column(fields[-1], pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ------------------------------------------------------------------------------------ Ray
# `curate select` over a pool reduced shard by shard (`selection.sharding: {backend: ray, num_shards: N}`): the
# driver never holds the whole pool's signals or embeddings.
#
# Two passes over contiguous row ranges of `score/prompt_scores.parquet` (and the score step's raw float32 copy of
# its embeddings), each shard read by its worker from shared storage:
#
# 1. statistics: per shard its rows, the rows still eligible (not labelled in an earlier round) and the sum of their
#    embeddings (the pool's mean, from which diversity strategies measure coverage while nothing is labelled);
# 2. reduction: per shard the strategy's candidates (`Strategy.candidates`: for a score strategy its top
#    ceil(shard_candidates · k) rows, for k-center its k-center picks, ...), a uniform sample of the size the
#    driver drew for it, and a quantile sketch of the strategy's score and of the signals its explanations read.
#
# The random arm is exactly uniform over the eligible pool without the strategy's picks: the driver draws how many
# of a uniform sample of L = k rows fall in each shard (multivariate hypergeometric on the shards' eligible sizes,
# from the step's seed), each worker draws that many rows uniformly, the driver shuffles the union (a uniform
# ordered L-sample of the pool) and keeps its first round(k · random_share) rows that the strategy did not pick.
# The strategy then runs on the driver over the union of the candidates, and the step writes the artifacts the
# unsharded step writes (`select/selected.parquet`, manifest last), so annotate/push are unchanged.
#
# What comes back per shard is O(candidates + sample) rows, whatever the shard's size. Exact for score strategies
# (the pool's top k lie in the union of the shards' top k; exact ties are broken per shard); k-center is the
# composable core-set; k-means++, under_dense and rank-normalized sums (`weighted`, `hybrid`) are approximations,
# and explanation percentiles come from the sketches (to ≈ 0.2 %). Not sharded (the step runs on the driver, and
# says so in its manifest): the adaptive strategy, and rounds whose strategy or completion chooser reads reward
# signals when rewards exist (a champion or earlier rounds' pairs).

# ------------------------------------------------------------------------------------------------- shards
def shard_ranges(n: int, num_shards: int) -> list[dict]:
    """Contiguous, balanced row ranges (no list of n indices: a pool can have 10M rows)."""
    bounds = [round(i * n / num_shards) for i in range(num_shards + 1)]
    return [{"index": i, "start": a, "stop": b} for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
            if b > a]


def read_shard(scores_file: str, embeddings: tuple[str, int] | None, start: int, stop: int
               ) -> tuple[pa.Table, np.ndarray | None]:
    """Rows [start, stop) of `prompt_scores.parquet` without its embedding column (only the row groups holding
    them), and their embeddings from the raw float32 file `(path, dims)` (else from the parquet column)."""
    handle = pq.ParquetFile(scores_file)
    names = handle.schema_arrow.names
    columns = [c for c in names if c != "embedding" or embeddings is None]
    tables, first = [], 0
    for g in range(handle.metadata.num_row_groups):
        rows = handle.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + rows)
        if lo < hi:
            tables.append(handle.read_row_group(g, columns=columns).slice(lo - first, hi - lo))
        first += rows
        if first >= stop:
            break
    table = pa.concat_tables(tables)
    if embeddings is not None:
        path, dims = embeddings
        mapped = np.memmap(path, dtype=np.float32, mode="r", offset=start * dims * 4, shape=(stop - start, dims))
        return table, np.array(mapped)
    if "embedding" not in names:
        return table, None
    col = table.column("embedding").combine_chunks()
    emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    return table.drop_columns(["embedding"]), emb


def shard_items(table: pa.Table, emb: np.ndarray | None, reasons: dict[str, list[str]], thumbs: dict[str, float]
                ) -> Items:
    """A shard's rows as Items, with the pool-derived signals (`error_score`, `thumbs_down`) like `load_items`."""

    ids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
    signals = {name: np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
               for name in signal_columns(table)}
    signals["error_score"] = np.array([error_score(reasons[p]) if p in reasons else 0.0 for p in ids])
    signals["thumbs_down"] = np.array([thumbs.get(p, 0.0) for p in ids])
    slices = table.column("slice").to_pylist() if "slice" in table.column_names else None
    return Items(ids=ids, signals=signals, embeddings=emb, slices=slices)


def eligible_rows(items: Items, excluded: set[str]) -> np.ndarray:
    return np.flatnonzero([str(i) not in excluded for i in items.ids]).astype(np.int64)


def shard_stats(ranges: list[dict], *, scores_file: str, embeddings: tuple[str, int] | None,
                excluded: list[str]) -> dict:
    """Pass 1 on a worker: the shard's rows, eligible rows and the sum of their embeddings."""
    ((shard,),) = (ranges,)
    table, emb = read_shard(scores_file, embeddings, shard["start"], shard["stop"])
    ids = table.column("prompt_id").to_pylist()
    gone = set(excluded)
    keep = np.asarray([str(i) not in gone for i in ids], dtype=bool)
    total = None if emb is None else emb[keep].astype(np.float64).sum(axis=0)
    return {"index": shard["index"], "rows": len(ids), "eligible": int(keep.sum()), "embedding_sum": total}


def sketch(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    return {"n": len(values), "finite": len(finite),
            "q": np.quantile(finite, GRID) if len(finite) else np.zeros(0)}


def reduce_shard(ranges: list[dict], *, scores_file: str, embeddings: tuple[str, int] | None, selection: dict,
                 seed: int, excluded: list[str], reasons: dict[str, list[str]], thumbs: dict[str, float],
                 labelled: np.ndarray | None, center: np.ndarray | None, m: int, sample: list[int]) -> dict:
    """Pass 2 on a worker: the shard's candidates, its part of the uniform sample and its sketches. What comes
    back is the chosen rows (ids, slices, signals, embeddings) and a few hundred numbers per sketched column."""

    ((shard,),) = (ranges,)
    sel = from_dict(SelectionConfig, selection)
    table, emb = read_shard(scores_file, embeddings, shard["start"], shard["stop"])
    whole = shard_items(table, emb, reasons, thumbs)
    items = whole.subset(eligible_rows(whole, set(excluded)))
    items.labelled, items.center = labelled, center
    strategy = build_strategy(sel.strategy, weights=sel.weights, candidate_factor=sel.candidate_factor)
    rng_candidates, rng_sample = np.random.default_rng([seed, 11, shard["index"]]).spawn(2)
    cand = np.asarray(arm_chain(strategy, sel, items).candidates(items, m, rng_candidates), dtype=np.int64) \
        if m > 0 and len(items) else np.zeros(0, dtype=np.int64)
    (count,) = [c for i, c in sample if i == shard["index"]] or [0]
    drawn = np.sort(rng_sample.choice(len(items), size=count, replace=False)) if count else np.zeros(0, np.int64)
    scores = strategy.checked_score(items) if len(items) else np.zeros(0)
    sketches = {"score": sketch(scores)}
    for col in strategy.directions():
        if col in items.signals:
            sketches[col] = sketch(items.signals[col])

    def rows(idx: np.ndarray) -> dict:
        return {"ids": [str(i) for i in items.ids[idx]], "slices": [str(s) for s in items.slices[idx]],
                "signals": {k: v[idx] for k, v in items.signals.items()},
                "embeddings": None if items.embeddings is None else items.embeddings[idx]}

    return {"index": shard["index"], "eligible": len(items), "candidates": rows(cand), "sample": rows(drawn),
            "sketches": sketches, "error_items": int((items.signals["error_score"] > 0).sum())}


def arm_chain(strategy: Strategy, sel, items: Items) -> Strategy:
    """The strategy arm as `run_select` composes it: near-duplicates dropped, slice quotas."""
    arms = strategy
    if sel.near_duplicate_threshold < 1.0 and items.embeddings is not None:
        arms = DropNearDuplicates(arms, sel.near_duplicate_threshold)
    if sel.slice_quotas:
        arms = SliceQuotas(arms, sel.slice_quotas)
    return arms


# ------------------------------------------------------------------------------------------------- driver
def sample_counts(eligible: list[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """How many rows of a uniform `size`-sample of the pool fall in each shard (multivariate hypergeometric)."""
    if size <= 0 or not eligible:
        return np.zeros(len(eligible), dtype=np.int64)
    return rng.multivariate_hypergeometric(np.asarray(eligible, dtype=np.int64), size)


def random_arm(sample_ids: list[str], picked: set[str], n_random: int, rng: np.random.Generator) -> list[int]:
    """Positions in `sample_ids` (a uniform sample of the pool, in shard order) of the random arm: a seeded
    shuffle of the sample, its first `n_random` rows the strategy did not pick."""
    out = []
    for j in rng.permutation(len(sample_ids)):
        if len(out) == n_random:
            break
        if sample_ids[j] not in picked:
            out.append(int(j))
    return out


class SketchPercentiles:
    """`select.Percentiles`' interface over the shards' quantile sketches, for the arrays registered by name."""

    def __init__(self, sketches: list[dict[str, dict]]):
        self.sketches = sketches
        self.names: dict[int, str] = {}

        self.exact = Percentiles()

    def register(self, values: np.ndarray, name: str) -> None:
        self.names[id(values)] = name

    def _share(self, values: np.ndarray, value: float, side: str) -> float:
        name = self.names.get(id(values))
        if name is None:
            return (self.exact.at_most if side == "right" else self.exact.at_least)(values, value)
        if np.isnan(value):
            return 0.0
        total, hit = 0, 0.0
        for shard in self.sketches:
            s = shard.get(name)
            if s is None:
                continue
            total += s["n"]
            if s["finite"]:
                at = np.searchsorted(s["q"], value, side=side) / len(s["q"])
                hit += s["finite"] * (at if side == "right" else 1.0 - at)
        return 100.0 * hit / total if total else float("nan")

    def at_most(self, values: np.ndarray, value: float) -> float:
        return self._share(values, value, "right")

    def at_least(self, values: np.ndarray, value: float) -> float:
        return self._share(values, value, "left")


def _union(parts: list[dict]) -> Items | None:
    """One Items of the rows the shards sent (first occurrence of each id kept)."""
    ids, slices, signals, emb = [], [], {}, []
    for p in parts:
        ids += p["ids"]
        slices += p["slices"]
        for k, v in p["signals"].items():
            signals.setdefault(k, []).append(v)
        if p["embeddings"] is not None:
            emb.append(p["embeddings"])
    if not ids:
        return None
    _, first = np.unique(np.asarray(ids, dtype=object), return_index=True)
    keep = np.sort(first)
    return Items(ids=np.asarray(ids, dtype=object)[keep], slices=np.asarray(slices, dtype=object)[keep],
                 signals={k: np.concatenate(v)[keep] for k, v in signals.items()},
                 embeddings=np.concatenate(emb)[keep] if emb else None)


def select_sharded(run, cfg, rnd, *, strategy: Strategy, seed: int, m_shown: int, rounds: list,
                   labelled_ids: set[str], labelled_emb: np.ndarray | None, reasons: dict, unmatched: int,
                   thumbs: dict, progress: bool = True) -> None:
    """The select step's work with the pool reduced on its shards (see the module doc); writes
    `selected.parquet` into `run` and fills its counts and extras as `run_select` does."""
    from curation.steps.score import embedding_file
    from preference.plumbing.config import to_dict

    sel = cfg.selection
    shards_cfg: ShardingConfig = sel.sharding
    score_step = rnd.step("score")
    scores_file = score_step.file("prompt_scores.parquet")
    n = pq.ParquetFile(scores_file).metadata.num_rows
    if n == 0:
        raise CurateError(f"{scores_file} holds no scored prompts; nothing to select — rerun `curate score`")
    found = embedding_file(score_step, "prompt_scores.parquet")
    embeddings = (str(found[0]), found[2]) if found is not None and found[1] == n else None
    excluded = sorted(labelled_ids - set(reasons))
    ranges = shard_ranges(n, shards_cfg.num_shards)
    cfg_shards = ShardingConfig(**{**vars(shards_cfg), "num_shards": len(ranges)})

    with session(cfg_shards):
        stats = map_shards(shard_stats, ranges, cfg_shards, scores_file=str(scores_file), embeddings=embeddings,
                           excluded=excluded)
        eligible = [s["eligible"] for s in stats]
        total = sum(eligible)
        if total == 0:
            raise CurateError(f"round {rnd.number}: no unlabelled prompts left ({n} scored, all selected in earlier "
                              "rounds); add prompts to the pool")
        remaining = sel.k
        if sel.budget is not None:
            remaining = Budget(strategy, sel.budget, used=len(labelled_ids)).remaining
            if remaining <= 0:
                raise CurateError(f"labelling budget exhausted: {len(labelled_ids)} items selected in earlier rounds, "
                                  f"selection.budget={sel.budget}; raise the budget or stop the loop")
        k_used = min(sel.k, total, remaining)
        n_strategy, n_random = RandomArm(strategy, sel.random_share).arm_sizes(k_used)
        rng_driver = np.random.default_rng([seed, 12])
        counts = sample_counts(eligible, k_used if n_random else 0, rng_driver)
        dims = None if stats[0]["embedding_sum"] is None else len(stats[0]["embedding_sum"])
        if labelled_emb is not None and labelled_emb.shape[1] != dims:
            labelled_emb = None  # a different embedder than this round's: cannot compare distances
        center = None
        if labelled_emb is None and stats[0]["embedding_sum"] is not None:
            center = (np.sum([s["embedding_sum"] for s in stats], axis=0) / total).astype(np.float32)
        m = math.ceil(sel.shard_candidates * n_strategy)
        reduced = map_shards(reduce_shard, ranges, cfg_shards, scores_file=str(scores_file), embeddings=embeddings,
                             selection=to_dict(sel), seed=seed, excluded=excluded, reasons=reasons, thumbs=thumbs,
                             labelled=labelled_emb, center=center, m=m,
                             sample=[(s["index"], int(c)) for s, c in zip(stats, counts, strict=True)])
    cands = _union([r["candidates"] for r in reduced])
    if cands is None:
        cands = _union([r["sample"] for r in reduced])
    cands.labelled, cands.center = labelled_emb, center
    rng_strategy, rng_random = np.random.default_rng([seed, 13]).spawn(2)
    picks = arm_chain(strategy, sel, cands).select(cands, n_strategy, rng_strategy)
    picked = {str(cands.ids[i]) for i in picks}
    sample = _union([r["sample"] for r in reduced])
    sample_ids = [] if sample is None else [str(i) for i in sample.ids]
    control = random_arm(sample_ids, picked, n_random, rng_random)
    # one table of the chosen rows: the strategy's picks, then the random arm's
    parts = [{"ids": [str(cands.ids[i]) for i in picks], "slices": [str(cands.slices[i]) for i in picks],
              "signals": {k: v[picks] for k, v in cands.signals.items()},
              "embeddings": None if cands.embeddings is None else cands.embeddings[picks]}]
    if control:
        idx = np.asarray(control, dtype=np.int64)
        parts.append({"ids": [sample_ids[j] for j in control], "slices": [str(s) for s in sample.slices[idx]],
                      "signals": {k: v[idx] for k, v in sample.signals.items()},
                      "embeddings": None if sample.embeddings is None else sample.embeddings[idx]})
    chosen_items = _union(parts)
    chosen_items.labelled, chosen_items.center = labelled_emb, center
    arms = ["strategy"] * len(picks) + ["random"] * len(control)
    # the strategy's score of the chosen rows, in the context of the candidates (exact for score strategies;
    # coverage distances measured from the labelled items or the pool's mean, as unsharded)
    scores = check_finite(np.asarray(strategy.score(chosen_items), dtype=np.float64), f"{strategy.name} scores",
                          chosen_items.ids)
    pct = SketchPercentiles([r["sketches"] for r in reduced])
    pct.register(scores, "score")
    for col in strategy.directions():
        if col in chosen_items.signals:
            pct.register(chosen_items.signals[col], col)
    pids = [str(i) for i in chosen_items.ids]
    comps = load_completions(rnd, set(pids))
    shown, choosers = choose_completions(comps, pids, sel, m_shown, list(cfg.annotation.models), seed)
    rows, rank = [], {"strategy": 0, "random": 0}
    for r, (arm, completion_ids, chooser) in enumerate(zip(arms, shown, choosers, strict=True)):
        rank[arm] += 1
        row = {"prompt_id": pids[r], "slice": str(chosen_items.slices[r]), "arm": arm,
               "strategy": strategy.name if arm == "strategy" else "random", "score": float(scores[r]),
               "rank": rank[arm], "reason": explain(strategy, chosen_items, scores, r, arm, reasons, pct),
               "completion_ids": completion_ids, "completion_choice": chooser}
        row.update({col: float(v[r]) for col, v in chosen_items.signals.items()})
        if chosen_items.embeddings is not None:
            row["embedding"] = chosen_items.embeddings[r]
        rows.append(row)
    write_selected(run.path / "selected.parquet", rows, list(chosen_items.signals),
                   chosen_items.embeddings is not None)
    run.counts.update(scored=n, excluded_labelled=n - total, selected=len(rows), strategy_arm=len(picks),
                      random_arm=len(control), error_items=sum(r["error_items"] for r in reduced),
                      shards=len(ranges))
    if unmatched:
        run.counts["feedback_unmatched"] = unmatched
    run.extra["strategy"] = strategy.name
    run.extra["completion_choice"] = {"method": sel.completion_choice, "per_record": m_shown,
                                      "random_share": sel.completion_random_share}
    run.extra["sharding"] = {"backend": shards_cfg.backend, "shards": len(ranges),
                             "candidates_per_shard": m, "candidates": len(cands),
                             "random_sample": int(counts.sum()),
                             "rows_returned": sum(len(r["candidates"]["ids"]) + len(r["sample"]["ids"])
                                                  for r in reduced)}
    notes = []
    if cold_start(strategy, cands):
        notes.append("cold start: no reward model yet (no champion, no earlier pairs), the strategy's diversity "
                     "part picked from the shards' candidates")
    if len(picks) < n_strategy:
        notes.append(f"the strategy arm found {len(picks)} of {n_strategy} items (near-duplicates or quotas left "
                     "too few; raise selection.shard_candidates)")
    if notes:
        run.extra["note"] = "; ".join(notes)


def cold_start(strategy: Strategy, items: Items) -> bool:
    """The strategy reads reward signals and there are none (the first round)."""

    return bool(REWARD_SIGNALS & set(strategy.inputs)) and not (REWARD_SIGNALS & set(items.signals))
