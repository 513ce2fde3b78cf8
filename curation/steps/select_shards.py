"""`curate select` over a pool reduced shard by shard (`selection.sharding: {backend: ray, num_shards: N}`): the
driver never holds the whole pool's signals or embeddings.

Two passes over contiguous row ranges of `score/prompt_scores.parquet` (and the score step's raw float32 copy of
its embeddings), each shard read by its worker from shared storage:

1. statistics: per shard its rows, the rows still eligible (not labelled in an earlier round) and the sum of their
   embeddings (the pool's mean, from which diversity strategies measure coverage while nothing is labelled);
2. reduction: per shard the strategy's candidates (`Strategy.candidates`: for a score strategy its top
   ceil(shard_candidates · k) rows, for k-center its k-center picks, ...), a uniform sample of the size the
   driver drew for it, and a quantile sketch of the strategy's score and of the signals its explanations read.

The random arm is exactly uniform over the eligible pool without the strategy's picks: the driver draws how many
of a uniform sample of L = k rows fall in each shard (multivariate hypergeometric on the shards' eligible sizes,
from the step's seed), each worker draws that many rows uniformly, the driver shuffles the union (a uniform
ordered L-sample of the pool) and keeps its first round(k · random_share) rows that the strategy did not pick.
The strategy then runs on the driver over the union of the candidates, and the step writes the artifacts the
unsharded step writes (`select/selected.parquet`, manifest last), so annotate/push are unchanged.

What comes back per shard is O(candidates + sample) rows, whatever the shard's size. Exact for score strategies
(the pool's top k lie in the union of the shards' top k; exact ties are broken per shard); k-center is the
composable core-set; k-means++, under_dense and rank-normalized sums (`weighted`, `hybrid`) are approximations,
and explanation percentiles come from the sketches (to ≈ 0.2 %). Not sharded (the step runs on the driver, and
says so in its manifest): the adaptive strategy, and rounds whose strategy or completion chooser reads reward
signals when rewards exist (a champion or earlier rounds' pairs).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.acquisition.strategies import (
    Budget,
    DropNearDuplicates,
    Items,
    RandomArm,
    SliceQuotas,
    Strategy,
    build_strategy,
    check_finite,
)
from curation.sharded import ShardingConfig, map_shards, session
from preference.plumbing.config import from_dict
from preference.plumbing.errors import CurateError

GRID = np.linspace(0.0, 1.0, 513)  # quantile sketch: 513 points (percentiles to ≈ 0.2 %)


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
    from curation.steps.select import error_score, signal_columns

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
    from curation.steps.select import SelectionConfig

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
        from curation.steps.select import Percentiles

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
    from curation.steps.select import choose_completions, explain, load_completions, write_selected
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
    from curation.steps.select import REWARD_SIGNALS

    return bool(REWARD_SIGNALS & set(strategy.inputs)) and not (REWARD_SIGNALS & set(items.signals))
