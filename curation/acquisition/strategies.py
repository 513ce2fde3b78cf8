"""Acquisition strategies: which unlabelled items should humans look at next.

Small classes on one base, small-text style. Every strategy has

    score(items) -> np.ndarray          # (N,) float, HIGHER = MORE INFORMATIVE, never NaN
    select(items, k, rng) -> np.ndarray # (min(k, N),) distinct int64 row indices, in pick order

`items` is an `Items` table (one row per prompt: ids, slices, named signal columns, embeddings, plus the
embeddings of already-labelled items as context). `rng` is an explicit `np.random.Generator`: the same seed
gives the same picks; it breaks ties and drives the sampling strategies.

Families (registry names in brackets):
- uncertainty: high prompt perplexity [perplexity], high mean completion perplexity [completion_perplexity],
  low mean logprob [low_logprob], high mean entropy [entropy], wide spread of the sampled answers
  [semantic_spread], small reward margin between the top-2 completions under the current reward model
  [reward_margin];
- query-by-committee: committee log-likelihood disagreement [committee], vote entropy [vote_entropy],
  disagreement of a reward-model ensemble [reward_disagreement];
- diversity / representativeness: k-center greedy core-set [kcenter], k-means++ seeding [kmeans++],
  sampling from the clusters least covered by labels [under_dense];
- error-based: items from earlier rounds' failures and user feedback [error];
- [random].
Adaptive: `Adaptive` [adaptive] — a portfolio of strategies sharing each batch, the budget moved round by round
towards the arms whose labels paid off on this pool, measured on the random arm's labels (`measure_round`).
Hybrids: `WeightedSum` (rank-normalized weighted sum), `TopThenDiverse` (batch mode: top-M by one strategy's
score, then k-center down to k) and `ColdStart` (`S|C`: C until the pool has S's signals). Constraints compose by wrapping: `SliceQuotas`, `ExcludeIds`,
`DropNearDuplicates`, `Budget`, and `RandomArm` (the control arm beside the strategy; `select_arms` returns the
two arms apart). `build_strategy("hybrid", weights=...)` turns a config spec into a strategy.

Adding a strategy: a class here with `name`, `family`, `inputs` and `score` (plus `directions()` when it reads
signal columns — a `SignalStrategy` states it with `higher_is_informative`; plus `pick` when the top-k scores are
not the right batch), one `STRATEGIES` entry, and tests. `select` checks k once, in the base class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from preference.plumbing.errors import CurateError

EMBEDDING = "embedding"  # pseudo-column name used in `Strategy.inputs`


# --------------------------------------------------------------------------------------------------- items
@dataclass
class Items:
    """The candidate pool as arrays, one row per item (prompt).

    `signals` maps a column name (e.g. "mean_entropy") to a (N,) float array; `embeddings` is (N, D);
    `labelled` is (M, D): embeddings of items already labelled (or already picked), which diversity strategies
    treat as covered. Only `ids` is required; a strategy that needs a missing column raises CurateError.
    """

    ids: np.ndarray
    signals: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: np.ndarray | None = None
    slices: np.ndarray | None = None
    labelled: np.ndarray | None = None
    # (D,) the point diversity strategies measure coverage from while nothing is labelled; None = these items' own
    # mean (a shard of a sharded pool carries the whole pool's mean here)
    center: np.ndarray | None = None
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # derived data (partitions)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=object).reshape(-1)
        n = len(self.ids)
        self.signals = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.signals.items()}
        for name, values in self.signals.items():
            if len(values) != n:
                raise CurateError(f"signal {name!r} has {len(values)} values for {n} items; expected one per item")
        if self.embeddings is not None:
            self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
            if self.embeddings.ndim != 2 or len(self.embeddings) != n:
                raise CurateError(f"embeddings have shape {self.embeddings.shape}; expected ({n}, dim)")
        if self.slices is None:
            self.slices = np.full(n, "default", dtype=object)
        self.slices = np.asarray(self.slices, dtype=object).reshape(-1)
        if len(self.slices) != n:
            raise CurateError(f"{len(self.slices)} slice names for {n} items; expected one per item")
        if self.labelled is not None:
            self.labelled = np.asarray(self.labelled, dtype=np.float32)
            if self.labelled.size == 0:
                self.labelled = None
            elif self.labelled.ndim != 2:
                raise CurateError(f"labelled embeddings have shape {self.labelled.shape}; expected (M, dim)")

    def __len__(self) -> int:
        return len(self.ids)

    def signal(self, name: str) -> np.ndarray:
        """Column `name`, checked to be finite (NaN/inf → CurateError naming the items)."""
        if name not in self.signals:
            have = ", ".join(sorted(self.signals)) or "none"
            raise CurateError(
                f"this strategy needs the signal {name!r}, which the scored pool does not have (columns: {have}); "
                "choose a strategy whose signals the scoring step produced, or rerun `curate score`"
            )
        return check_finite(self.signals[name], f"signal {name!r}", self.ids)

    def embedding_matrix(self) -> np.ndarray:
        if self.embeddings is None:
            raise CurateError(
                "this strategy needs item embeddings, but the pool has none; rerun `curate score` (it writes an "
                "`embedding` column) or choose a signal-based strategy"
            )
        if self.cache.get("finite") is not self.embeddings:  # checked once per array (a pass over gigabytes)
            check_finite(self.embeddings, "embeddings", self.ids)
            self.cache["finite"] = self.embeddings
        return self.embeddings

    def labelled_matrix(self) -> np.ndarray | None:
        if self.labelled is None or len(self.labelled) == 0:
            return None
        return check_finite(self.labelled, "labelled embeddings", None)

    def subset(self, idx: np.ndarray, covered: np.ndarray | None = None) -> Items:
        """Rows `idx`; the embeddings of rows `covered` (if any) are added to the labelled context. All rows in
        order share this table's arrays (no copy: a pool's embeddings can be gigabytes)."""
        idx = np.asarray(idx, dtype=np.int64)
        labelled = self.labelled
        if covered is not None and len(covered) and self.embeddings is not None:
            extra = self.embeddings[np.asarray(covered, dtype=np.int64)]
            labelled = extra if labelled is None else np.concatenate([labelled, extra])
        if len(idx) == len(self) and (len(idx) == 0 or (idx[0] == 0 and (np.diff(idx) == 1).all())):
            same = Items(ids=self.ids, signals=self.signals, embeddings=self.embeddings, slices=self.slices,
                         labelled=labelled, center=self.center)
            if labelled is self.labelled:
                same.cache = self.cache  # same rows, same context: derived data (partitions) carries over
            return same
        return Items(
            ids=self.ids[idx],
            signals={k: v[idx] for k, v in self.signals.items()},
            embeddings=None if self.embeddings is None else self.embeddings[idx],
            slices=self.slices[idx],
            labelled=labelled,
            center=self.center,
        )


def check_finite(values: np.ndarray, what: str, ids: np.ndarray | None) -> np.ndarray:
    """Return `values`, or raise CurateError naming the first items whose values are NaN/inf. (Checked in
    blocks of rows: no boolean copy of a pool's whole embedding matrix.)"""
    if values.ndim > 1:
        bad = np.zeros(len(values), dtype=bool)
        for r0 in range(0, len(values), 1 << 16):
            block = values[r0 : r0 + (1 << 16)]
            bad[r0 : r0 + len(block)] = ~np.isfinite(block).all(axis=tuple(range(1, values.ndim)))
    else:
        bad = ~np.isfinite(values)
    if bad.any():
        where = ""
        if ids is not None:
            first = ", ".join(map(str, ids[bad][:3]))
            where = f" (e.g. items {first})"
        raise CurateError(
            f"{what} has {int(bad.sum())} NaN/inf value(s){where}; the scoring step left them empty — fix or "
            "rerun `curate score`, or choose a strategy that does not use this signal"
        )
    return values


def check_k(items: Items, k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise CurateError(f"k must be a non-negative integer (number of items to pick), got {k!r}")
    return min(int(k), len(items))


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the k highest scores, best first; exact ties are broken by `rng`."""
    if k <= 0 or len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    tie = rng.random(len(scores))
    if k < len(scores):
        # argpartition first (O(N)), then sort the shortlist; include every item tied with the k-th score.
        kth = np.partition(-scores, k - 1)[k - 1]
        cand = np.flatnonzero(-scores <= kth)
    else:
        cand = np.arange(len(scores))
    order = np.lexsort((tie[cand], -scores[cand]))
    return cand[order[:k]].astype(np.int64)


def rank_normalize(scores: np.ndarray) -> np.ndarray:
    """Scores → percentiles in (0, 1] (ties share their average rank); makes signals of any scale summable."""
    from scipy.stats import rankdata  # here, not at import: scipy.stats costs ~1 s, every CLI command imports this

    if len(scores) == 0:
        return scores.astype(np.float64)
    return rankdata(scores, method="average") / len(scores)


# ---------------------------------------------------------------------------------------------------- base
class Strategy:
    """Base class. Subclasses implement `score` (higher = more informative) and, when the top-k scores are not
    the right batch, `pick`. `select` validates k once for every strategy and handles k = 0 / an empty pool."""

    name: str = "strategy"
    family: str = ""
    inputs: tuple[str, ...] = ()  # signal columns (and EMBEDDING) this strategy reads

    def score(self, items: Items) -> np.ndarray:
        raise NotImplementedError

    def directions(self) -> dict[str, bool]:
        """Signal column → True when a HIGHER value is more informative (False: lower is). The one place a
        signal's direction is stated; explanations and reports read it from here."""
        return {}

    def usable_without(self, columns: set[str]) -> bool:
        """True when this strategy still works if signal `columns` are absent (e.g. reward signals before any
        reward model exists): it reads none of them, or it has a cold start of its own."""
        return not (set(self.inputs) & set(columns))

    def checked_score(self, items: Items) -> np.ndarray:
        scores = np.asarray(self.score(items), dtype=np.float64)
        if scores.shape != (len(items),):
            raise RuntimeError(f"{self.name}.score returned shape {scores.shape}, expected ({len(items)},)")
        return check_finite(scores, f"{self.name} scores", items.ids)

    def select(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        """(min(k, N),) distinct row indices in pick order. k is checked here, once, for every strategy."""
        k = check_k(items, k)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.pick(items, k, rng), dtype=np.int64)

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        """The batch for a valid k (1 ≤ k ≤ len(items)); default: the top-k scores, ties broken by `rng`."""
        return top_k(self.checked_score(items), k, rng)

    def select_arms(self, items: Items, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(strategy picks, control-arm picks), k checked as in `select`. Only `RandomArm` has a control arm;
        the other wrappers pass it through."""
        k = check_k(items, k)
        if k == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        picks, control = self.pick_arms(items, k, rng)
        return np.asarray(picks, dtype=np.int64), np.asarray(control, dtype=np.int64)

    def pick_arms(self, items: Items, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.pick(items, k, rng), np.zeros(0, dtype=np.int64)

    def candidates(self, items: Items, m: int, rng: np.random.Generator) -> np.ndarray:
        """Rows of `items` — one shard of a pool, reduced on its worker — to send to the driver, which runs this
        strategy on the union of every shard's candidates (`curation.steps.select`, its "Ray" part); `m` ≥ the picks the driver
        will ask for. Default: the strategy's own m picks in the shard — exact for a score strategy (the pool's
        top k lie in the union of the shards' top k), and for k-center the composable core-set (k-center over
        the union of the parts' k-center picks stays a constant-factor approximation for any partition:
        Malkomes et al. 2015). Samplers (k-means++, under_dense) and rank-normalized sums are approximated."""
        return self.select(items, m, rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SignalStrategy(Strategy):
    """Score = one signal column, signed so that higher = more informative."""

    column: str = ""
    higher_is_informative: bool = True

    def __init__(self, column: str | None = None):
        self.column = column or self.column
        self.inputs = (self.column,)

    def score(self, items: Items) -> np.ndarray:
        values = items.signal(self.column)
        return values if self.higher_is_informative else -values

    def directions(self) -> dict[str, bool]:
        return {self.column: self.higher_is_informative}


# ---------------------------------------------------------------------------------------------- uncertainty
class Perplexity(SignalStrategy):
    """High perplexity of the prompt under the generator (column `prompt_perplexity`): unfamiliar inputs."""

    name, family, column = "perplexity", "uncertainty", "prompt_perplexity"


class CompletionPerplexity(SignalStrategy):
    """High mean perplexity of the sampled completions (`mean_completion_perplexity`)."""

    name, family, column = "completion_perplexity", "uncertainty", "mean_completion_perplexity"


class LowLogprob(SignalStrategy):
    """Low mean token logprob of the completions (`mean_logprob`; LOWER logprob = more uncertain)."""

    name, family, column, higher_is_informative = "low_logprob", "uncertainty", "mean_logprob", False


class Entropy(SignalStrategy):
    """High mean per-token entropy of the completions (`mean_entropy`)."""

    name, family, column = "entropy", "uncertainty", "mean_entropy"


class SemanticSpread(SignalStrategy):
    """Wide spread of the sampled answers in embedding space (`semantic_spread`): the model is undecided."""

    name, family, column = "semantic_spread", "uncertainty", "semantic_spread"


class RewardMargin(SignalStrategy):
    """Small reward margin between the top-2 completions under the current reward model (`reward_margin`,
    from `curation.acquisition.ensemble.prompt_reward_signals`): the reward model cannot tell the best two apart."""

    name, family, column, higher_is_informative = "reward_margin", "uncertainty", "reward_margin", False


# -------------------------------------------------------------------------------------- query-by-committee
class CommitteeDisagreement(SignalStrategy):
    """Committee log-likelihood disagreement (`committee_disagreement`): the generator models disagree."""

    name, family, column = "committee", "committee", "committee_disagreement"


class VoteEntropy(SignalStrategy):
    """Entropy of the committee's votes for the best completion (`vote_entropy`)."""

    name, family, column = "vote_entropy", "committee", "vote_entropy"


class RewardDisagreement(SignalStrategy):
    """Disagreement of a reward-model ensemble on the top-2 completions (`reward_disagreement`)."""

    name, family, column = "reward_disagreement", "committee", "reward_disagreement"


# ------------------------------------------------------------------------------------------------- errors
class ErrorBased(SignalStrategy):
    """Items from earlier rounds' failures (`error_score`: harm-flagged, low-ranked policy outputs, human
    disagreement with the model's suggestion, feedback files; 0 = no known error). Ties are broken at random."""

    name, family, column = "error", "error", "error_score"


class ThumbsDown(SignalStrategy):
    """Served prompts users rated down (`thumbs_down`: how many of their served answers got a thumbs-down; 0 for
    items without traffic feedback), apart from other failures, so `weighted` / `hybrid` can weight user
    complaints on their own (e.g. `weights: {thumbs_down: 2, reward_disagreement: 1}`)."""

    name, family, column = "thumbs_down", "error", "thumbs_down"


# ----------------------------------------------------------------------------------------------- random
class Random(Strategy):
    """Uniform sample without replacement. Scores are all 0 (no item is more informative than another)."""

    name, family, inputs = "random", "random", ()

    def score(self, items: Items) -> np.ndarray:
        return np.zeros(len(items))

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(len(items), size=k, replace=False)


# ------------------------------------------------------------------------------------------------ diversity
def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def min_sq_dist(x: np.ndarray, centers: np.ndarray, block: int = 1 << 22) -> np.ndarray:
    """(N,) squared Euclidean distance of each row of `x` to its nearest row of `centers`.

    Blocked BLAS: |x|² − 2·x·c + |c|², computed over tiles of at most `block` entries so memory stays small."""
    x_sq = _sq_norms(x)
    c_sq = _sq_norms(centers)
    out = np.full(len(x), np.inf, dtype=np.float32)
    c_step = max(1, min(len(centers), block // 1024))
    r_step = max(1, block // c_step)
    for c0 in range(0, len(centers), c_step):
        c = centers[c0 : c0 + c_step]
        for r0 in range(0, len(x), r_step):
            tile = c_sq[None, c0 : c0 + c_step] - 2.0 * (x[r0 : r0 + r_step] @ c.T)
            np.minimum(out[r0 : r0 + r_step], tile.min(axis=1), out=out[r0 : r0 + r_step])
    return np.maximum(out + x_sq, 0.0)


# Diversity at scale. Exact k-center / k-means++ cost items × picks × dims multiply-adds (1M × 15k × 384 = 6e12:
# minutes on 2 cores), and distances to a large labelled set items × labelled × dims. Above EXACT_BUDGET the pool
# is partitioned by k-means (fitted on a sample) into spatially coherent parts, each part picks its share, and
# distances to the labelled set are taken within an item's part and its nearest parts (an inverted-file search
# done with BLAS blocks). Below it everything is exact, as the conformance tests check.
EXACT_BUDGET = 4e10  # multiply-adds
FIT_SAMPLE = 50_000  # k-means for partitions is fitted on at most this many items
NPROBE = 3  # parts searched for an item's nearest labelled item (its own and the nearest others)
SEQUENTIAL_PART = 4096  # k-means++ at scale: items per part (one pick = one pass over its part)
UNION_FACTOR = 2.0  # k-center at scale: the parts pick UNION_FACTOR × k candidates, then k-center picks k of them


def coverage_sq_dist(items: Items) -> np.ndarray:
    """Squared distance of each item to what is already covered: the nearest labelled item, or, when nothing
    is labelled yet, the pool centroid (so the first pick is the most atypical item)."""
    x = items.embedding_matrix()
    labelled = items.labelled_matrix()
    if labelled is None:
        labelled = x.mean(axis=0, keepdims=True) if items.center is None else \
            np.asarray(items.center, dtype=np.float32).reshape(1, -1)
    if labelled.shape[1] != x.shape[1]:
        raise CurateError(f"labelled embeddings have dim {labelled.shape[1]}, pool embeddings {x.shape[1]}")
    if float(len(x)) * len(labelled) * x.shape[1] <= EXACT_BUDGET or len(labelled) <= 64 or len(x) < 128:
        return min_sq_dist(x, labelled)
    labels, centers = items_partition(items, n_parts_for(len(x), len(labelled), x.shape[1]))
    return nearest_sq_dist_by_parts(x, labelled, labels, centers)


def n_parts_for(n: int, m: int, dims: int, budget: float = EXACT_BUDGET) -> int:
    """Parts that bring n items × m comparisons each × dims within `budget` (at least 2, at most n / 64)."""
    return int(min(max(2, math.ceil(float(n) * m * dims / budget)), max(2, n // 64)))


def assign(x: np.ndarray, centers: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """(N,) index of each row's nearest center (BLAS blocks)."""
    c_sq = _sq_norms(centers)
    out = np.empty(len(x), dtype=np.int64)
    for r0 in range(0, len(x), block):
        out[r0 : r0 + block] = (c_sq[None, :] - 2.0 * (x[r0 : r0 + block] @ centers.T)).argmin(axis=1)
    return out


def items_partition(items: Items, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centers) of a k-means partition of the items' embeddings (fitted on a sample, seed 0), computed
    once per Items and number of parts."""
    key = ("partition", parts)
    if key not in items.cache:
        x = items.embedding_matrix()
        rng = np.random.default_rng(0)
        size = min(FIT_SAMPLE, max(64 * parts, 2000))  # enough items per part to place its center
        sample = x if len(x) <= size else x[np.sort(rng.choice(len(x), size, replace=False))]
        fit = kmeans(sample, parts, seed=0)
        centers = np.stack([sample[fit == c].mean(axis=0) if (fit == c).any() else sample[0]
                            for c in range(parts)]).astype(np.float32)
        items.cache[key] = (assign(x, centers), centers)
    return items.cache[key]


def nearest_sq_dist_by_parts(x: np.ndarray, refs: np.ndarray, labels: np.ndarray, centers: np.ndarray,
                             nprobe: int = NPROBE) -> np.ndarray:
    """Approximate (N,) squared distance of each row of `x` to its nearest row of `refs`: each reference is
    filed under its nearest center, each item searches the references filed under its own part's `nprobe`
    nearest centers (an inverted-file search; exact within those parts, an overestimate when the true nearest
    reference lies in a part not searched)."""
    ref_part = assign(refs, centers)
    near = np.argsort(_sq_norms(centers)[None, :] - 2.0 * (centers @ centers.T), axis=1)[:, :nprobe]
    out = np.full(len(x), np.inf, dtype=np.float32)
    for p in range(len(centers)):
        rows = np.flatnonzero(labels == p)
        mine = np.flatnonzero(np.isin(ref_part, near[p]))
        if len(rows) and len(mine):
            out[rows] = min_sq_dist(x[rows], refs[mine])
    missing = ~np.isfinite(out)
    if missing.any():  # no reference in the searched parts: fall back to every reference (exact)
        out[missing] = min_sq_dist(x[missing], refs)
    return out


def _update_min_sq(min_d: np.ndarray, x: np.ndarray, x_sq: np.ndarray, centers: np.ndarray,
                   block: int = 1 << 15) -> None:
    """min_d ← min(min_d, squared distance to the nearest of `centers` (row indices)), in BLAS blocks."""
    c = x[centers]
    c_sq = x_sq[centers]
    for r0 in range(0, len(x), block):
        d = x[r0 : r0 + block] @ c.T
        d *= -2.0
        d += c_sq[None, :]
        np.minimum(min_d[r0 : r0 + block], d.min(axis=1) + x_sq[r0 : r0 + block], out=min_d[r0 : r0 + block])


def kcenter_greedy(x: np.ndarray, min_d: np.ndarray, k: int, candidates: int = 512) -> np.ndarray:
    """Exact k-center greedy (farthest first; exact ties to the lowest index), in batches: the `candidates`
    farthest items are picked among themselves for as long as the next pick is provably the global farthest (its
    distance exceeds every item outside the batch), then every item is updated against the batch's picks with
    one matrix multiply. Same picks as one pick at a time, a fraction of the memory traffic. `min_d` (squared
    distances to what is covered) is updated in place."""
    n = len(x)
    x_sq = _sq_norms(x)
    min_d = min_d.astype(np.float32, copy=False)
    picks: list[int] = []
    while len(picks) < k:
        t = min(n, candidates, max(32, 2 * (k - len(picks))))
        if t < n:
            cand = np.argpartition(-min_d, t)[: t + 1]
            order = np.lexsort((cand, -min_d[cand]))
            cand, outside = cand[order[:t]], min_d[cand[order[t]]]
        else:
            cand, outside = np.lexsort((np.arange(n), -min_d)), -np.inf
        local = min_d[cand].copy()
        cx = x[cand]
        gram = cx @ cx.T
        new: list[int] = []
        while len(picks) + len(new) < k:
            best = local.max()
            if not best > outside or best == -np.inf:
                break
            ties = np.flatnonzero(local == best)
            j = int(ties[np.argmin(cand[ties])])
            new.append(int(cand[j]))
            np.minimum(local, x_sq[cand] - 2.0 * gram[:, j] + x_sq[cand[j]], out=local)
            local[j] = -np.inf
        if not new:  # the batch cannot prove its farthest item: one plain step (global argmax)
            new = [int(np.argmax(min_d))]
            if min_d[new[0]] == -np.inf:
                break
        _update_min_sq(min_d, x, x_sq, np.asarray(new))
        min_d[new] = -np.inf
        picks += new
    return np.asarray(picks, dtype=np.int64)


def _shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """Integer shares of `total` proportional to `sizes` (largest remainders), each ≤ its size."""
    quota = total * sizes / max(1, sizes.sum())
    out = np.minimum(np.floor(quota).astype(np.int64), sizes)
    rest = total - out.sum()
    for p in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if rest <= 0:
            break
        if out[p] < sizes[p]:
            out[p] += 1
            rest -= 1
    return out


class KCenterGreedy(Strategy):
    """Core-set by k-center greedy (Sener & Savarese 2018): repeatedly pick the item farthest (Euclidean, in
    embedding space) from everything labelled or picked so far. Score = distance to the nearest labelled item
    (or the pool centroid when nothing is labelled): higher = less covered = more informative.

    Exact (batched, `kcenter_greedy`) while items × k × dims ≤ EXACT_BUDGET; above, a composable core-set: random
    parts of the pool each pick their share of UNION_FACTOR × k by k-center, then k-center picks k from that union
    (Mirrokni & Zadimoghaddam 2015, randomized composable core-sets: k-center over the union of the parts'
    k-center picks keeps a constant approximation factor)."""

    name, family, inputs = "kcenter", "diversity", (EMBEDDING,)

    def score(self, items: Items) -> np.ndarray:
        if len(items) == 0:
            return np.zeros(0)
        return np.sqrt(coverage_sq_dist(items)).astype(np.float64)

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        x = items.embedding_matrix()
        min_d = coverage_sq_dist(items).astype(np.float32)
        if float(len(x)) * k * x.shape[1] <= EXACT_BUDGET or k * UNION_FACTOR >= len(x):
            return kcenter_greedy(x, min_d, k)
        # random parts (no clustering pass over the pool): k-center over the union of the parts' k-center picks
        # keeps its approximation guarantee for a random partition (randomized composable core-sets)
        parts = n_parts_for(len(x), int(UNION_FACTOR * k), x.shape[1])
        labels = np.random.default_rng(0).permutation(len(x)) % parts
        sizes = np.bincount(labels, minlength=parts)
        union = []
        for p, share in enumerate(_shares(sizes, int(UNION_FACTOR * k))):
            rows = np.flatnonzero(labels == p)
            if share > 0:
                union.append(rows[kcenter_greedy(x[rows], min_d[rows].copy(), int(share))])
        union = np.sort(np.concatenate(union))
        return union[kcenter_greedy(x[union], min_d[union].copy(), k)]


def kmeanspp_sample(x: np.ndarray, min_d: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D² sampling) from `min_d` (squared distances to what is covered), exact."""
    x_sq = _sq_norms(x)
    min_d = min_d.astype(np.float64)
    taken = np.zeros(len(x), dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    for t in range(k):
        w = np.where(taken, 0.0, np.maximum(min_d, 0.0))
        total = w.sum()
        p = w / total if total > 0 else (~taken) / (~taken).sum()
        i = int(rng.choice(len(x), p=p))
        picks[t], taken[i] = i, True
        np.minimum(min_d, x_sq - 2.0 * (x @ x[i]) + x_sq[i], out=min_d)
    return picks


class KMeansPlusPlus(Strategy):
    """k-means++ seeding as a sampler: each pick is drawn with probability ∝ squared distance to the nearest
    labelled-or-picked item (diverse, but drawn in proportion to coverage gaps rather than outliers first).
    Score = distance to the nearest labelled item (or the centroid): higher = less covered.

    Exact while items × k × dims ≤ EXACT_BUDGET; above, stratified: each of the pool's k-means parts draws its
    share of k (proportional to its size) by D² sampling within the part."""

    name, family, inputs = "kmeans++", "diversity", (EMBEDDING,)

    def score(self, items: Items) -> np.ndarray:
        if len(items) == 0:
            return np.zeros(0)
        return np.sqrt(coverage_sq_dist(items)).astype(np.float64)

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        x = items.embedding_matrix()
        min_d = coverage_sq_dist(items)
        if float(len(x)) * k * x.shape[1] <= EXACT_BUDGET or 2 * k >= len(x):
            return kmeanspp_sample(x, min_d, k, rng)
        # D² sampling is one matrix-vector product per pick: parts small enough to stay in the CPU's cache
        parts = max(n_parts_for(len(x), k, x.shape[1]), math.ceil(len(x) / SEQUENTIAL_PART))
        labels, _ = items_partition(items, min(parts, max(2, len(x) // 64)))
        sizes = np.bincount(labels, minlength=labels.max() + 1)
        picks = []
        for p, share in enumerate(_shares(sizes, k)):
            rows = np.flatnonzero(labels == p)
            if share > 0:
                picks.append(rows[kmeanspp_sample(x[rows], min_d[rows], int(share), rng)])
        picks = np.concatenate(picks)
        return picks[rng.permutation(len(picks))]


def kmeans(x: np.ndarray, n_clusters: int, *, seed: int = 0, iterations: int = 10) -> np.ndarray:
    """Plain Lloyd k-means (k-means++ init, fixed seed) → (N,) cluster labels. Vectorized; for grouping only.
    Pools larger than FIT_SAMPLE are fitted on a seeded sample, then every item goes to its nearest center."""
    n_clusters = max(1, min(n_clusters, len(x)))
    rng = np.random.default_rng(seed)
    full = x
    if len(x) > FIT_SAMPLE:
        x = x[np.sort(rng.choice(len(x), FIT_SAMPLE, replace=False))]
    init = kmeanspp_sample(x, min_sq_dist(x, x.mean(axis=0, keepdims=True)), n_clusters, rng)  # exact, always
    centers = x[init].copy()
    labels = np.zeros(len(x), dtype=np.int64)
    x_sq = _sq_norms(x)
    for _ in range(iterations):
        labels = (x_sq[:, None] - 2.0 * (x @ centers.T) + _sq_norms(centers)[None, :]).argmin(axis=1)
        counts = np.bincount(labels, minlength=n_clusters)
        onehot = np.zeros((n_clusters, len(x)), dtype=x.dtype)
        onehot[labels, np.arange(len(x))] = 1.0
        sums = onehot @ x  # per-cluster sums as one matrix multiply
        nonempty = counts > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty, None]
    return labels if full is x else assign(full, centers)


class UnderDenseClusters(Strategy):
    """Sample from the clusters (k-means in embedding space) whose labelled density — labelled items per pool
    item — is lowest. Picks go one at a time to the least-covered cluster (ties by `rng`), a random member each,
    so a batch spreads over regions in proportion to how little they have been labelled.
    Score = −(labelled items near the cluster) / (cluster size): higher = less covered region."""

    name, family, inputs = "under_dense", "diversity", (EMBEDDING,)

    def __init__(self, n_clusters: int = 16, seed: int = 0):
        self.n_clusters = n_clusters
        self.seed = seed

    def _clusters(self, items: Items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = items.embedding_matrix()
        labels = kmeans(x, self.n_clusters, seed=self.seed)
        n_c = labels.max() + 1
        size = np.bincount(labels, minlength=n_c).astype(np.float64)
        covered = np.zeros(n_c)
        labelled = items.labelled_matrix()
        if labelled is not None:
            centers = np.stack([x[labels == c].mean(axis=0) if size[c] else x[0] for c in range(n_c)])
            nearest = (_sq_norms(labelled)[:, None] - 2.0 * (labelled @ centers.T) + _sq_norms(centers)).argmin(1)
            covered = np.bincount(nearest, minlength=n_c).astype(np.float64)
        return labels, size, covered

    def score(self, items: Items) -> np.ndarray:
        if len(items) == 0:
            return np.zeros(0)
        labels, size, covered = self._clusters(items)
        return -(covered / np.maximum(size, 1.0))[labels]

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        labels, size, covered = self._clusters(items)
        members = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(len(size))]
        picks = []
        for _ in range(k):
            density = np.array([(covered[c] + 1.0) / size[c] if members[c] else np.inf for c in range(len(size))])
            best = np.flatnonzero(density == density.min())
            c = int(rng.choice(best))
            picks.append(members[c].pop())
            covered[c] += 1.0
        return np.asarray(picks, dtype=np.int64)


# -------------------------------------------------------------------------------------------------- hybrids
class WeightedSum(Strategy):
    """Normalized weighted sum: each part's score is turned into percentiles (rank-normalized, so scales do not
    matter), multiplied by its weight and summed. Higher = more informative."""

    family = "hybrid"

    def __init__(self, parts: Iterable[tuple[Strategy, float]]):
        self.parts = [(s, float(w)) for s, w in parts]
        if not self.parts:
            raise CurateError("a weighted strategy needs at least one part, e.g. weights: {entropy: 1.0}")
        for s, w in self.parts:
            if not math.isfinite(w) or w < 0:
                raise CurateError(f"weight of {s.name!r} must be a finite number ≥ 0, got {w}")
        self.name = "weighted(" + ",".join(f"{s.name}={w:g}" for s, w in self.parts) + ")"
        self.inputs = tuple(dict.fromkeys(i for s, _ in self.parts for i in s.inputs))

    def part_scores(self, items: Items) -> dict[str, np.ndarray]:
        """Each part's rank-normalized score (percentile in (0, 1]), by part name."""
        return {s.name: rank_normalize(s.checked_score(items)) for s, _ in self.parts}

    def directions(self) -> dict[str, bool]:
        return {col: up for s, _ in self.parts for col, up in s.directions().items()}

    def score(self, items: Items) -> np.ndarray:
        total = np.zeros(len(items))
        for (_, w), normed in zip(self.parts, self.part_scores(items).values(), strict=True):
            total += w * normed
        return total


class TopThenDiverse(Strategy):
    """Batch mode "uncertainty then diversity": the top M = ceil(factor·k) items by `first`, then `diverse`
    (k-center greedy by default) picks k of them, so a batch is informative and not redundant.

    `cold_start=True`: while the pool lacks a signal `first` reads (e.g. reward signals before any reward model
    exists), `diverse` alone picks from the whole pool and scores (an uninformed shortlist is everything)."""

    family = "hybrid"

    def __init__(self, first: Strategy, factor: float = 4.0, diverse: Strategy | None = None, *,
                 cold_start: bool = False):
        if not factor >= 1.0:
            raise CurateError(f"candidate factor must be ≥ 1 (top M = factor·k candidates), got {factor}")
        self.first = first
        self.factor = factor
        self.diverse = diverse or KCenterGreedy()
        self.cold_start = cold_start
        self.name = f"{first.name}>{self.diverse.name}"
        self.inputs = tuple(dict.fromkeys((*first.inputs, *self.diverse.inputs)))

    def cold(self, items: Items) -> bool:
        return self.cold_start and any(c != EMBEDDING and c not in items.signals for c in self.first.inputs)

    def usable_without(self, columns: set[str]) -> bool:
        return super().usable_without(columns) or (self.cold_start and self.diverse.usable_without(columns))

    def score(self, items: Items) -> np.ndarray:
        return self.diverse.score(items) if self.cold(items) else self.first.score(items)

    def directions(self) -> dict[str, bool]:
        return {**self.diverse.directions(), **self.first.directions()}

    def candidates(self, items: Items, m: int, rng: np.random.Generator) -> np.ndarray:
        if self.cold(items):
            return self.diverse.candidates(items, m, rng)
        return self.first.candidates(items, max(m, math.ceil(self.factor * m)), rng)  # ⊇ the shard's shortlist

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        if self.cold(items):
            return self.diverse.select(items, k, rng)
        m = min(len(items), max(k, math.ceil(self.factor * k)))
        candidates = self.first.select(items, m, rng)
        picks = self.diverse.select(items.subset(candidates), k, rng)
        return candidates[picks]


class ColdStart(Strategy):
    """`first` while the pool has the signals it reads, else `fallback` — e.g. `reward_disagreement|kcenter`:
    diversity until a reward model exists (the first round), then the reward ensemble's disagreement."""

    family = "hybrid"

    def __init__(self, first: Strategy, fallback: Strategy):
        self.first, self.fallback = first, fallback
        self.name = f"{first.name}|{fallback.name}"
        self.inputs = tuple(dict.fromkeys((*first.inputs, *fallback.inputs)))

    def active(self, items: Items) -> Strategy:
        ready = all(c == EMBEDDING or c in items.signals for c in self.first.inputs)
        return self.first if ready else self.fallback

    def usable_without(self, columns: set[str]) -> bool:
        return self.fallback.usable_without(columns)

    def directions(self) -> dict[str, bool]:
        return {**self.fallback.directions(), **self.first.directions()}

    def score(self, items: Items) -> np.ndarray:
        return self.active(items).score(items)

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        return self.active(items).select(items, k, rng)

    def candidates(self, items: Items, m: int, rng: np.random.Generator) -> np.ndarray:
        return self.active(items).candidates(items, m, rng)


# ------------------------------------------------------------------------------------------------- wrappers
class Wrapper(Strategy):
    """A strategy around another one: same scores, constrained selection."""

    def __init__(self, base: Strategy):
        self.base = base
        self.name = base.name
        self.family = base.family
        self.inputs = base.inputs

    def score(self, items: Items) -> np.ndarray:
        return self.base.score(items)

    def directions(self) -> dict[str, bool]:
        return self.base.directions()

    def usable_without(self, columns: set[str]) -> bool:
        return self.base.usable_without(columns)

    def candidates(self, items: Items, m: int, rng: np.random.Generator) -> np.ndarray:
        return self.base.candidates(items, m, rng)

    def _select_within(self, items: Items, allowed: np.ndarray, k: int, rng, covered=None) -> np.ndarray:
        """Let the base pick k among rows `allowed` (int indices) and map the picks back to `items` rows."""
        if k <= 0 or len(allowed) == 0:
            return np.zeros(0, dtype=np.int64)
        return allowed[self.base.select(items.subset(allowed, covered), k, rng)]


class ExcludeIds(Wrapper):
    """Never pick items whose id is in `ids` (e.g. labelled in earlier rounds)."""

    def __init__(self, base: Strategy, ids: Iterable[str]):
        super().__init__(base)
        self.ids = set(map(str, ids))

    def allowed(self, items: Items) -> np.ndarray:
        """Rows of `items` whose id is not excluded."""
        return np.flatnonzero([str(i) not in self.ids for i in items.ids]).astype(np.int64)

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        return self._select_within(items, self.allowed(items), k, rng)

    def pick_arms(self, items: Items, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        allowed = self.allowed(items)
        if len(allowed) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        picks, control = self.base.select_arms(items.subset(allowed), k, rng)
        return allowed[picks], allowed[control]


class SliceQuotas(Wrapper):
    """Pick exactly `quotas[slice]` items from each named slice (or all it has), then fill the rest of k from
    any slice (unless `fill=False`). Earlier slices' picks count as covered for diversity strategies."""

    def __init__(self, base: Strategy, quotas: dict[str, int], fill: bool = True):
        super().__init__(base)
        for name, q in quotas.items():
            if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 0:
                raise CurateError(f"slice quota for {name!r} must be an integer ≥ 0, got {q!r}")
        self.quotas = dict(quotas)
        self.fill = fill

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        if sum(self.quotas.values()) > k:
            raise CurateError(
                f"slice quotas add up to {sum(self.quotas.values())} ({self.quotas}) but only {k} items are picked "
                "by the strategy arm; lower the quotas or raise selection.k"
            )
        picks: list[np.ndarray] = []
        for name in sorted(self.quotas):
            allowed = np.flatnonzero(items.slices == name).astype(np.int64)
            done = np.concatenate(picks) if picks else None
            picks.append(self._select_within(items, allowed, self.quotas[name], rng, covered=done))
        chosen = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        if self.fill and len(chosen) < k:
            rest = np.setdiff1d(np.arange(len(items)), chosen)
            chosen = np.concatenate([chosen, self._select_within(items, rest, k - len(chosen), rng, chosen)])
        return chosen.astype(np.int64)

    def candidates(self, items: Items, m: int, rng: np.random.Generator) -> np.ndarray:
        """Each quota slice's candidates (up to m) and the whole shard's (the fill)."""
        found = [self.base.candidates(items, m, rng)] if self.fill else []
        for name in sorted(self.quotas):
            rows = np.flatnonzero(items.slices == name).astype(np.int64)
            if len(rows) and self.quotas[name] > 0:
                found.append(rows[self.base.candidates(items.subset(rows), min(m, len(rows)), rng)])
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


class DropNearDuplicates(Wrapper):
    """Skip items whose embedding has cosine similarity ≥ `threshold` with a labelled item or with an item
    already picked in this batch; the base strategy is asked again until k items are found or none are left."""

    BLOCK = 2048  # proposals checked together

    def __init__(self, base: Strategy, threshold: float = 0.98):
        super().__init__(base)
        if not 0.0 < threshold <= 1.0:
            raise CurateError(f"near-duplicate threshold must be in (0, 1] (cosine similarity), got {threshold}")
        self.threshold = threshold

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        x = items.embedding_matrix()
        labelled = items.labelled_matrix()
        reference = self._unit(labelled) if labelled is not None else np.zeros((0, x.shape[1]), np.float32)
        # Lazy: only the items the base strategy proposes are checked (against labelled + accepted), so the
        # cost is O(proposals × (M + k)), not O(N × M); proposals are checked in blocks with matrix multiplies.
        checked = np.zeros(len(items), dtype=bool)
        chosen: list[int] = []
        while len(chosen) < k:
            allowed = np.flatnonzero(~checked).astype(np.int64)
            batch = self._select_within(items, allowed, k - len(chosen), rng, np.asarray(chosen, dtype=np.int64))
            if len(batch) == 0:
                break
            checked[batch] = True
            for start in range(0, len(batch), self.BLOCK):
                block = np.asarray(batch[start : start + self.BLOCK], dtype=np.int64)
                units = self._unit(x[block])
                near_ref = (units @ reference.T).max(axis=1) >= self.threshold if len(reference) else \
                    np.zeros(len(block), dtype=bool)
                within = units @ units.T
                accepted: list[int] = []
                for j in range(len(block)):
                    if near_ref[j] or (accepted and float(within[j, accepted].max()) >= self.threshold):
                        continue  # a near-duplicate of a labelled item or of an item accepted in this batch
                    accepted.append(j)
                chosen += block[accepted].tolist()
                reference = np.concatenate([reference, units[accepted]])
        return np.asarray(chosen, dtype=np.int64)

    def candidates(self, items: Items, m: int, rng: np.random.Generator) -> np.ndarray:
        """The base's candidates, in its order, without near-duplicates of labelled items or of each other."""
        rows = np.asarray(self.base.candidates(items, m, rng), dtype=np.int64)
        if len(rows) == 0:
            return rows
        units = self._unit(items.embedding_matrix()[rows])
        labelled = items.labelled_matrix()
        near_ref = (units @ self._unit(labelled).T).max(axis=1) >= self.threshold if labelled is not None else \
            np.zeros(len(rows), dtype=bool)
        accepted: list[int] = []
        for start in range(0, len(rows), self.BLOCK):  # against the accepted rows, a block at a time
            block = np.arange(start, min(start + self.BLOCK, len(rows)))
            before = len(accepted)
            sims = units[block] @ units[accepted + block.tolist()].T
            cols = list(range(before))  # columns of `sims` holding accepted rows
            for j, row in enumerate(block):
                if near_ref[row] or (cols and float(sims[j, cols].max()) >= self.threshold):
                    continue
                accepted.append(int(row))
                cols.append(before + j)
        return rows[accepted]


class Budget(Wrapper):
    """Never pick more than `budget - used` items (a labelling budget across rounds)."""

    def __init__(self, base: Strategy, budget: int, used: int = 0):
        super().__init__(base)
        self.budget, self.used = int(budget), int(used)

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.used)

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        return self.base.select(items, min(k, self.remaining), rng)

    def pick_arms(self, items: Items, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.base.select_arms(items, min(k, self.remaining), rng)


class RandomArm(Wrapper):
    """The control arm beside a strategy: of k picks, round(k · share) are drawn uniformly (`Random`) from the
    items the strategy did not pick, the rest come from the strategy — so every batch measures the strategy
    against random on the same pool. `select_arms` returns the two arms apart; `select` strategy picks first.
    The two arms draw from independent child generators of `rng`."""

    def __init__(self, base: Strategy, share: float):
        super().__init__(base)
        if not 0.0 <= share < 1.0:
            raise CurateError(f"random share must be in [0, 1) (the control arm's share of k), got {share}")
        self.share = float(share)

    def arm_sizes(self, k: int) -> tuple[int, int]:
        """(strategy picks, random picks) for k items: the random arm is round(k · share), halves rounded up."""
        n_random = int(math.floor(k * self.share + 0.5))
        return k - n_random, n_random

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        return np.concatenate(self.pick_arms(items, k, rng))

    def pick_arms(self, items: Items, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n_strategy, n_random = self.arm_sizes(k)
        strategy_rng, random_rng = rng.spawn(2)
        picks = self.base.select(items, n_strategy, strategy_rng)
        rest = np.setdiff1d(np.arange(len(items)), picks)
        # `Random().select` over the rest needs only its size (no subset: no copy of the embeddings)
        control = rest[random_rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)] \
            if len(rest) and n_random > 0 else rest[:0]
        return picks, control.astype(np.int64)


# ------------------------------------------------------------------------------------------------- adaptive
PORTFOLIO = ("reward_disagreement", "low_logprob", "entropy", "kcenter")  # `adaptive`'s arms unless named
CONTROL = "random"  # the control arm's name in a LabelLog: the random arm's labels (and random initial labels)


@dataclass
class LabelLog:
    """The labels that came back so far, as the adaptive strategy measures them.

    One row per label unit (a preference pair, or a labelled item): `arm[u]` is the arm whose pick produced it (a
    portfolio arm's name, `CONTROL` for the random arm and random initial labels, anything else for labels that
    only train) and `round[u]` the round it was picked in. `spent[(round, arm)]` counts the labels that arm spent
    in that round (items asked: ties and unanswered items included, so an arm whose labels come back as ties
    pays for them); when absent, the arm's units are counted."""

    arm: np.ndarray
    round: np.ndarray
    spent: dict[tuple[int, str], int] = field(default_factory=dict)

    def __post_init__(self):
        self.arm = np.asarray(self.arm, dtype=object).reshape(-1)
        self.round = np.asarray(self.round, dtype=np.int64).reshape(-1)
        if len(self.arm) != len(self.round):
            raise CurateError(f"label log: {len(self.arm)} arms for {len(self.round)} rounds; expected one per unit")

    def __len__(self) -> int:
        return len(self.arm)

    def labels(self, rnd: int, arm: str) -> int:
        return int(self.spent.get((rnd, arm), int(np.sum((self.round == rnd) & (self.arm == arm)))))


# score(train unit indices, test unit indices) -> held-out quality of a learner fitted on `train`, measured on
# `test` (higher = better, e.g. mean log-likelihood of the test labels); NaN when it cannot be measured.
Heldout = Callable[[np.ndarray, np.ndarray], float]


def measure_round(log: LabelLog, rnd: int, arms: Iterable[str], heldout: Heldout, rng: np.random.Generator,
                  folds: int = 3) -> list[dict]:
    """The value of each arm's batch of round `rnd`, measured on labels that arm did not choose.

    Test labels: the control arm's units of every OTHER round (an unbiased sample of the pool; the control arm's
    own batch of `rnd` is measured, so it is never tested on). They are split into `folds` folds; per fold the
    learner is fitted on every unit of rounds ≤ `rnd` except the fold ("with"), and again without the arm's batch
    ("without"); the arm's gain is the fold-size-weighted mean of score(with) − score(without). Value per label =
    gain / labels the arm spent in the round. Returns one dict per arm that spent labels in the round (the
    control arm included, as the yardstick): {round, arm, labels, gain, value, test}; [] when fewer than 4 test
    units exist (nothing can be measured yet)."""
    test_pool = np.flatnonzero((log.arm == CONTROL) & (log.round != rnd))
    names = [a for a in dict.fromkeys([*arms, CONTROL]) if log.labels(rnd, a) > 0]
    if len(test_pool) < 4 or not names:
        return []
    n_folds = max(2, min(folds, len(test_pool) // 2))
    fold_of = rng.permutation(len(test_pool)) % n_folds
    context = log.round <= rnd
    gains = {a: 0.0 for a in names}
    weight = 0
    for f in range(n_folds):
        test = test_pool[fold_of == f]
        train = context.copy()
        train[test] = False
        with_all = heldout(np.flatnonzero(train), test)
        if not np.isfinite(with_all):
            continue
        weight += len(test)
        for a in names:
            batch = (log.round == rnd) & (log.arm == a)
            if not (train & batch).any():  # the batch holds no usable unit (all ties): no gain, nothing to fit
                continue
            without = heldout(np.flatnonzero(train & ~batch), test)
            if np.isfinite(without):
                gains[a] += len(test) * (with_all - without)
    if weight == 0:
        return []
    out = []
    for a in names:
        labels = log.labels(rnd, a)
        gain = gains[a] / weight
        out.append({"round": int(rnd), "arm": a, "labels": labels, "gain": float(gain),
                    "value": float(gain / labels), "test": int(weight)})
    return out


def arm_values(measurements: list[dict], arms: Iterable[str]) -> dict[str, dict]:
    """Per arm: labels measured, the mean value per label over its measured rounds with a 95 % interval, and the
    same centred on each round's mean over the arms measured in it (`relative`: removes the round's effect — a
    label is worth less as labels accumulate — so arms compare on the same rounds). The spread is pooled over
    arms (each round's measurements around their arm's mean), so an arm measured once still has an interval."""
    from scipy.stats import t as student_t

    rows = [m for m in measurements if m["arm"] in set(arms) | {CONTROL}]
    by_round: dict[int, list[float]] = {}
    for m in rows:
        if m["arm"] != CONTROL:
            by_round.setdefault(m["round"], []).append(m["value"])
    out: dict[str, dict] = {}
    residuals, rel_residuals = [], []
    for a in dict.fromkeys([*arms, CONTROL]):
        mine = [m for m in rows if m["arm"] == a]
        values = np.array([m["value"] for m in mine])
        rel = np.array([m["value"] - np.mean(by_round[m["round"]]) for m in mine if m["round"] in by_round])
        out[a] = {"measured_rounds": len(mine), "labels_measured": int(sum(m["labels"] for m in mine)),
                  "value": float(values.mean()) if len(values) else None,
                  "relative": float(rel.mean()) if len(rel) else None, "n_relative": len(rel)}
        residuals += (values - values.mean()).tolist() if len(values) else []
        rel_residuals += (rel - rel.mean()).tolist() if len(rel) else []
    n_arms = sum(1 for v in out.values() if v["measured_rounds"])
    for key, res, n_key in (("value", residuals, "measured_rounds"), ("relative", rel_residuals, "n_relative")):
        df = len(res) - n_arms
        sd = float(np.sqrt(np.sum(np.square(res)) / df)) if df > 0 else None
        t = float(student_t.ppf(0.975, df)) if df > 0 else None
        for v in out.values():
            n = v[n_key]
            v[f"{key}_ci"] = None if sd is None or not n or v[key] is None else float(t * sd / np.sqrt(n))
            v[f"{key}_se"] = None if sd is None or not n or v[key] is None else float(sd / np.sqrt(n))
    return out


class Adaptive(Strategy):
    """A portfolio of strategies (`arms`, default `PORTFOLIO`) sharing each batch, with the budget moved round by
    round towards the arms whose labels have paid off on this pool.

    Each item of a batch is picked by one arm (`attribution`: item id → arm). After labels come back, `update`
    measures every arm's latest batch on labels it did not choose (`measure_round`: the control arm's labels are
    the test set; the learner's held-out score with vs without the batch, per label spent) and `plan` splits the
    next batch: while an arm has fewer than `explore_rounds` measurements every available arm gets an equal share
    (exploration); then each arm's share is the probability that its value per label is the highest (Thompson
    draws from its round-centred value ± standard error, seeded by the `rng` given), and every available arm
    keeps at least `floor` picks, so no arm is dropped before (or after) it is measured. An arm whose signals the
    pool lacks (e.g. `reward_disagreement` before any reward model) sits the round out. The random arm is not
    part of the portfolio: it stays the `RandomArm` beside this strategy and is never taken away.

    The state (`measurements`, the last `allocation` and its `reason`) is plain JSON (`state()` /
    `load_state`): rounds store it in `select/adaptive.json`; the benchmark keeps it in memory."""

    family = "hybrid"

    def __init__(self, arms: Iterable[Strategy | str] | None = None, *, floor: int = 1, explore_rounds: int = 2,
                 folds: int = 3, draws: int = 4000):
        built = [make(a) if isinstance(a, str) else a for a in (PORTFOLIO if arms is None else arms)]
        names = [a.name for a in built]
        if len(built) < 2 or len(set(names)) != len(names):
            raise CurateError(f"adaptive needs at least two different strategies, got {names}")
        if CONTROL in names:
            raise CurateError("adaptive: 'random' is the control arm beside the strategy (selection.random_share), "
                              "not a portfolio arm; leave it out of the list")
        if floor < 0 or explore_rounds < 1 or folds < 2 or draws < 100:
            raise CurateError(f"adaptive: floor ≥ 0, explore_rounds ≥ 1, folds ≥ 2, draws ≥ 100 expected, got "
                              f"{floor}, {explore_rounds}, {folds}, {draws}")
        self.arms = {a.name: a for a in built}
        self.floor, self.explore_rounds, self.folds, self.draws = floor, explore_rounds, folds, draws
        self.name = "adaptive" if arms is None else f"adaptive[{'+'.join(names)}]"
        self.inputs = tuple(dict.fromkeys(c for a in built for c in a.inputs))
        self.measurements: list[dict] = []
        self.allocation: dict[str, int] = {}
        self.share: dict[str, float] = {}
        self.reason = ""
        self.attribution: dict[str, str] = {}

    # ---- state
    def state(self) -> dict:
        values = arm_values(self.measurements, self.arms)
        return {"strategy": self.name, "arms": list(self.arms), "allocation": dict(self.allocation),
                "share": dict(self.share), "reason": self.reason, "values": values, "measurements": list(self.measurements)}

    def load_state(self, state: dict | None) -> None:
        """Carry the measurements of an earlier state (rounds already measured are not measured again)."""
        if state:
            self.measurements = [dict(m) for m in state.get("measurements") or []]

    def update(self, log: LabelLog, heldout: Heldout, rng: np.random.Generator) -> list[dict]:
        """Measure every round of `log` that has portfolio-arm labels and no measurement yet (see
        `measure_round`); returns the new measurements (also appended to `measurements`)."""
        done = {m["round"] for m in self.measurements}
        new = []
        for rnd in sorted(set(log.round.tolist()) - done):
            if any(log.labels(rnd, a) for a in self.arms):
                new += measure_round(log, rnd, self.arms, heldout, rng, self.folds)
        self.measurements += new
        return new

    # ---- allocation
    def available(self, items: Items) -> list[str]:
        return [n for n, a in self.arms.items()
                if all(c == EMBEDDING and items.embeddings is not None or c in items.signals for c in a.inputs)]

    def plan(self, items: Items, k: int, rng: np.random.Generator) -> dict[str, int]:
        """Picks per arm for a batch of k (also kept in `allocation`, with the why in `reason`)."""
        names = self.available(items)
        if not names:
            raise CurateError(f"adaptive: none of its strategies ({', '.join(self.arms)}) has the signals it needs "
                              f"in this pool (columns: {', '.join(sorted(items.signals)) or 'none'})")
        values = arm_values(self.measurements, names)
        unmeasured = [n for n in names if values[n]["n_relative"] < self.explore_rounds]
        sitting = [n for n in self.arms if n not in names]
        if unmeasured or len(names) == 1:
            share = {n: 1.0 / len(names) for n in names}
            why = ("exploring: equal shares while " + ", ".join(unmeasured)
                   + f" {'has' if len(unmeasured) == 1 else 'have'} fewer than {self.explore_rounds} measured rounds"
                   ) if unmeasured else "one arm available"
        else:
            mean = np.array([values[n]["relative"] for n in names])
            se = np.array([values[n]["relative_se"] or 0.0 for n in names])
            draws = mean + se * rng.standard_normal((self.draws, len(names)))
            best = np.bincount(np.argmax(draws, axis=1), minlength=len(names)) / self.draws
            share = dict(zip(names, best.tolist(), strict=True))
            why = ("by the probability that each arm's labels are worth most per label (Thompson draws from its value "
                   "on the control arm's labels, round-centred, ± standard error): "
                   + ", ".join(f"{n} {share[n]:.2f}" for n in names))
        alloc = apportion(share, k, self.floor, rng)
        if self.floor and k >= self.floor * len(names):
            why += f"; every arm keeps ≥ {self.floor} pick(s) so it stays measured"
        if sitting:
            why += "; sitting out (signals missing in this pool): " + ", ".join(sitting)
        if not self.allocation:  # the batch's plan; a refill (near-duplicates skipped) keeps it
            self.allocation = {n: alloc.get(n, 0) for n in self.arms}
            self.share = {n: float(share.get(n, 0.0)) for n in self.arms}
            self.reason = why
        return alloc

    def new_batch(self) -> None:
        """Forget the last batch's plan and attribution (the measurements stay)."""
        self.allocation, self.share, self.reason, self.attribution = {}, {}, "", {}

    # ---- strategy
    def score(self, items: Items) -> np.ndarray:
        """The allocation-weighted sum of the available arms' rank-normalized scores (for explanations)."""
        names = self.available(items)
        weights = {n: self.allocation.get(n, 0) for n in names}
        if not sum(weights.values()):
            weights = {n: 1 for n in names}
        total = np.zeros(len(items))
        for n in names:
            if weights[n]:
                total += weights[n] * rank_normalize(self.arms[n].checked_score(items))
        return total / sum(weights.values())

    def directions(self) -> dict[str, bool]:
        return {col: up for a in self.arms.values() for col, up in a.directions().items()}

    def usable_without(self, columns: set[str]) -> bool:
        return any(a.usable_without(columns) for a in self.arms.values())

    def pick(self, items: Items, k: int, rng: np.random.Generator) -> np.ndarray:
        """Each arm picks its share in turn (largest share first) from what earlier arms left; earlier arms'
        picks count as covered for the diversity arms."""
        alloc = self.plan(items, k, rng)
        chosen: list[int] = []
        for name in sorted(alloc, key=lambda n: (-alloc[n], list(self.arms).index(n))):
            if alloc[name] <= 0:
                continue
            done = np.asarray(chosen, dtype=np.int64)
            rest = np.setdiff1d(np.arange(len(items)), done)
            if len(rest) == 0:
                break
            sub = items.subset(rest, covered=done if len(done) else None)
            picks = rest[self.arms[name].select(sub, alloc[name], rng)]
            for i in picks:
                self.attribution[str(items.ids[i])] = name
            chosen += picks.tolist()
        return np.asarray(chosen, dtype=np.int64)


def apportion(share: dict[str, float], k: int, floor: int, rng: np.random.Generator) -> dict[str, int]:
    """k picks split by `share` (largest remainders), every arm first getting `floor` when k allows; when it does
    not, one pick each to the arms with the largest shares (ties broken by `rng`)."""
    names = list(share)
    weights = np.array([share[n] for n in names], dtype=np.float64)
    order = np.lexsort((rng.random(len(names)), -weights))
    if k < floor * len(names):
        return {names[i]: int(j < k) for j, i in enumerate(order)}
    base = np.full(len(names), floor, dtype=np.int64)
    rest = k - int(base.sum())
    total = weights.sum()
    exact = rest * (weights / total if total > 0 else np.full(len(names), 1.0 / len(names)))
    base += np.floor(exact).astype(np.int64)
    left = k - int(base.sum())
    remainder = exact - np.floor(exact)
    for i in np.lexsort((rng.random(len(names)), -remainder))[:left]:
        base[i] += 1
    return {n: int(v) for n, v in zip(names, base, strict=True)}


def find_adaptive(strategy: Strategy) -> Adaptive | None:
    """The `Adaptive` inside a chain of wrappers / cold starts (None when there is none)."""
    while True:
        if isinstance(strategy, Adaptive):
            return strategy
        inner = getattr(strategy, "base", None) or getattr(strategy, "first", None)
        if inner is None:
            return None
        strategy = inner


# ------------------------------------------------------------------------------------------------- registry
STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "random": Random,
    "perplexity": Perplexity,
    "completion_perplexity": CompletionPerplexity,
    "low_logprob": LowLogprob,
    "entropy": Entropy,
    "semantic_spread": SemanticSpread,
    "reward_margin": RewardMargin,
    "committee": CommitteeDisagreement,
    "vote_entropy": VoteEntropy,
    "reward_disagreement": RewardDisagreement,
    "kcenter": KCenterGreedy,
    "kmeans++": KMeansPlusPlus,
    "under_dense": UnderDenseClusters,
    "error": ErrorBased,
    "thumbs_down": ThumbsDown,
}
COMPOSITES = ("weighted", "hybrid", "adaptive", "adaptive[<a>+<b>+...]", "<first>><diverse>",
              "<strategy>|<cold start>")


def make(name: str) -> Strategy:
    """One registered strategy by name."""
    name = name.strip()
    if name not in STRATEGIES:
        raise CurateError(
            f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)} or a composite "
            f"({', '.join(COMPOSITES)})"
        )
    return STRATEGIES[name]()


def weighted(weights: dict[str, float]) -> WeightedSum:
    if not weights:
        raise CurateError("the weighted/hybrid strategy needs selection.weights, e.g. {entropy: 1, committee: 1}")
    return WeightedSum([(make(name), w) for name, w in weights.items()])


def build_strategy(spec: str, *, weights: dict[str, float] | None = None, candidate_factor: float = 4.0) -> Strategy:
    """Config spec → strategy.

    - a registered name: `entropy`, `kcenter`, `random`, ... (see STRATEGIES);
    - `weighted`: normalized weighted sum of the strategies named in `weights`;
    - `hybrid`: `weighted` then k-center (top candidate_factor·k by the weighted score, k-center down to k);
      while the weighted signals are missing (no reward model yet), k-center alone (the cold start);
    - `A>B`: top candidate_factor·k by A, then B picks k of them (e.g. `entropy>kcenter`, `weighted>kmeans++`);
    - `S|C`: strategy S while the pool has its signals, else C (`reward_disagreement|kcenter`: a cold start);
    - `adaptive`: the portfolio `PORTFOLIO` (reward_disagreement, low_logprob, entropy, kcenter) sharing each
      batch, the budget moved towards the arms whose labels paid off (`Adaptive`); `adaptive[a+b+...]` names the
      arms (each any spec above).
    """
    spec = spec.strip()
    if spec == "adaptive":
        return Adaptive()
    if spec.startswith("adaptive[") and spec.endswith("]"):
        arms = [a for a in spec[len("adaptive["):-1].split("+") if a.strip()]
        return Adaptive([build_strategy(a, weights=weights, candidate_factor=candidate_factor) for a in arms])
    if "|" in spec:
        first, _, fallback = spec.partition("|")
        return ColdStart(build_strategy(first, weights=weights, candidate_factor=candidate_factor),
                         build_strategy(fallback, weights=weights, candidate_factor=candidate_factor))

    def one(name: str) -> Strategy:
        return weighted(weights or {}) if name.strip() == "weighted" else make(name)

    if spec == "hybrid":
        return TopThenDiverse(weighted(weights or {}), candidate_factor, KCenterGreedy(), cold_start=True)
    if ">" in spec:
        first, _, second = spec.partition(">")
        return TopThenDiverse(one(first), candidate_factor, one(second))
    return one(spec)


def all_strategies() -> list[Strategy]:
    """One instance of every registered strategy and of each composite kind (for conformance tests)."""
    out = [factory() for factory in STRATEGIES.values()]
    out.append(build_strategy("weighted", weights={"entropy": 1.0, "committee": 0.5}))
    out.append(build_strategy("hybrid", weights={"entropy": 1.0, "low_logprob": 1.0}))
    out.append(build_strategy("reward_disagreement|kcenter"))
    out.append(build_strategy("adaptive"))
    return out
