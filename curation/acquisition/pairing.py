"""Completion choice: which of a prompt's n completions reviewers see, and so which pairs a ranking yields.

With n completions per prompt and m slots per record (m = 2 for a pairwise question), much of a label's value is
decided here: two near-identical answers waste a comparison (the reviewer says "no preference"), and a pair the
reward model already orders with confidence teaches it little. Choosers are small classes on one base, like the
acquisition strategies:

    chooser.choose(rewards, embeddings, m, rng, allowed=None) -> (≤ m,) completion indices, in choice order

- `rewards`: (K, C) member rewards of the C completions (K ensemble members: the champion reward model's heads
  from the `rewards` step, or the fast Bradley–Terry ensemble); None when no reward model exists yet;
- `embeddings`: (C, D) completion embeddings (None: no near-duplicate check);
- `allowed`: optional (C, C) bool matrix of the pairs that may be asked (e.g. comparisons not yet labelled).

Registry names:
- `info_gain` (default): the pair whose label tells the ensemble most — the mutual information between the
  preference label and the ensemble member (BALD: H(p̄) − mean_k H(p_k), p_k = σ(r_k(a) − r_k(b))), i.e. the
  members' disagreement about the reward DIFFERENCE; with one member (K = 1) the predictive entropy H(p)
  (a small |margin|). m > 2: greedy, each next completion adds the most information with those chosen;
- `thompson`: double Thompson sampling over the ensemble (each slot: draw a member, take its best remaining
  completion), as in active exploration for preference learning;
- `maxmin`: the completions the ensemble's mean reward puts highest and lowest (a large predicted quality gap:
  a clear, low-noise label; ActiveUltraFeedback's strongest simple baseline, Melikidze et al. 2026);
- `delta_ucb`: ActiveUltraFeedback's DeltaUCB — the pair maximizing the optimistic gap UCB(a) − LCB(b) =
  (μ_a + β σ_a) − (μ_b − β σ_b) over the ensemble's mean μ and spread σ (β = 1): a large gap the ensemble is
  not yet sure of;
- `diverse`: the farthest-apart completions in embedding space (the cold start: no reward model yet);
- `random`: uniform (the control arm).
Every chooser skips near-duplicates — a completion whose text equals, or whose embedding has cosine ≥
`threshold` with, one already chosen — unless nothing else is left; without rewards `info_gain` and `thompson`
fall back to `diverse`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from preference.plumbing.errors import CurateError


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def pair_information(rewards: np.ndarray) -> np.ndarray:
    """(C, C) information of asking "a or b?" under a (K, C) reward ensemble; symmetric, zero diagonal.

    K > 1: BALD mutual information H(mean_k p_k) − mean_k H(p_k) with p_k = σ(r_k(a) − r_k(b)) (epistemic: the
    members disagree about the difference). K = 1: the predictive entropy H(p) (the model cannot separate them).
    Higher = more informative."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise CurateError(f"rewards have shape {r.shape}; expected (members, completions)")
    diff = r[:, :, None] - r[:, None, :]  # (K, C, C)
    p = 1.0 / (1.0 + np.exp(-diff))
    total = _entropy(p.mean(axis=0))
    info = total if r.shape[0] == 1 else total - _entropy(p).mean(axis=0)
    np.fill_diagonal(info, 0.0)
    return np.maximum(info, 0.0)


def similarity(embeddings: np.ndarray | None, texts: list[str] | None, n: int) -> np.ndarray:
    """(C, C) cosine similarity of completion embeddings (0 without), 1 where the texts are identical."""
    sim = np.zeros((n, n))
    if embeddings is not None:
        x = np.asarray(embeddings, dtype=np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
    if texts is not None:
        norm = [t.strip() for t in texts]
        same = np.array([[a == b for b in norm] for a in norm])
        sim = np.where(same, 1.0, sim)
    return sim


class Chooser:
    """Base class: `choose` validates the inputs and handles m and near-duplicates; subclasses rank."""

    name = "chooser"
    needs_rewards = False

    def __init__(self, threshold: float = 0.98):
        if not 0.0 < threshold <= 1.0:
            raise CurateError(f"completion near-duplicate threshold must be in (0, 1] (cosine), got {threshold}")
        self.threshold = threshold

    def choose(
        self,
        rewards: np.ndarray | None,
        embeddings: np.ndarray | None,
        m: int,
        rng: np.random.Generator,
        *,
        allowed: np.ndarray | None = None,
        texts: list[str] | None = None,
    ) -> np.ndarray:
        """Up to m distinct completion indices in choice order (all C when C ≤ m, near-duplicates last)."""
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
            raise CurateError(f"completions per record must be an integer ≥ 2 (a comparison needs two), got {m!r}")
        n = self._count(rewards, embeddings, texts)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if rewards is not None:
            rewards = np.asarray(rewards, dtype=np.float64)
            if not np.isfinite(rewards).all():
                raise CurateError("completion rewards contain NaN/inf; rerun the rewards step (or `curate score`) with --force")
        ok = np.ones((n, n), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
        if ok.shape != (n, n):
            raise CurateError(f"allowed pairs have shape {ok.shape}; expected ({n}, {n})")
        ok = ok & ok.T & ~np.eye(n, dtype=bool)
        dup = similarity(embeddings, texts, n) >= self.threshold
        if self.needs_rewards and rewards is None:
            return Diverse(self.threshold).rank(None, embeddings, min(m, n), rng, ok, dup)
        return self.rank(rewards, embeddings, min(m, n), rng, ok, dup)

    @staticmethod
    def _count(rewards, embeddings, texts) -> int:
        sizes = {len(texts)} if texts is not None else set()
        if rewards is not None:
            sizes.add(np.asarray(rewards).shape[-1])
        if embeddings is not None:
            sizes.add(len(embeddings))
        if len(sizes) > 1:
            raise CurateError(f"rewards, embeddings and texts describe different numbers of completions: {sizes}")
        if not sizes:
            raise CurateError("completion choice needs rewards, embeddings or texts of the completions")
        return sizes.pop()

    def rank(self, rewards, embeddings, m, rng, ok, dup) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def greedy(gain: np.ndarray, m: int, rng: np.random.Generator, ok: np.ndarray, dup: np.ndarray) -> np.ndarray:
        """Greedy set choice on a (C, C) pair gain: the best allowed pair first, then each step the completion
        whose summed gain with those chosen is highest; near-duplicates of a chosen one only when nothing else
        is left. Ties broken by `rng`."""
        n = len(gain)
        jitter = rng.random((n, n)) * 1e-9
        score = np.where(ok, gain + jitter + jitter.T, -np.inf)
        clean = np.where(dup, -np.inf, score)
        first = clean if np.isfinite(clean).any() else score
        if not np.isfinite(first).any():  # no allowed pair at all
            return np.zeros(0, dtype=np.int64)
        a, b = np.unravel_index(int(np.argmax(first)), first.shape)
        chosen = [int(a), int(b)]
        while len(chosen) < m:
            rest = np.setdiff1d(np.arange(n), chosen)
            if len(rest) == 0:
                break
            total = np.where(ok[np.ix_(rest, chosen)], gain[np.ix_(rest, chosen)], 0.0).sum(axis=1)
            total = total + rng.random(len(rest)) * 1e-9
            near = dup[np.ix_(rest, chosen)].any(axis=1)
            pool = rest[~near] if (~near).any() else rest
            chosen.append(int(pool[np.argmax(total[np.isin(rest, pool)])]))
        return np.asarray(chosen, dtype=np.int64)


class InfoGain(Chooser):
    """The pair (set) with the most information about the reward difference (see `pair_information`)."""

    name, needs_rewards = "info_gain", True

    def rank(self, rewards, embeddings, m, rng, ok, dup) -> np.ndarray:
        return self.greedy(pair_information(rewards), m, rng, ok, dup)


class Thompson(Chooser):
    """Double Thompson sampling: each slot draws an ensemble member and takes its highest-reward completion
    among those not chosen (a redraw when that completion is a near-duplicate or not allowed with the chosen)."""

    name, needs_rewards = "thompson", True

    def rank(self, rewards, embeddings, m, rng, ok, dup) -> np.ndarray:
        k, n = rewards.shape
        chosen: list[int] = []
        for _ in range(m):
            candidates = [c for c in range(n) if c not in chosen and all(ok[c, j] for j in chosen) and ok[c].any()]
            if not candidates:
                break
            clean = [c for c in candidates if not any(dup[c, j] for j in chosen)]
            pool = np.asarray(clean or candidates)
            member = rewards[int(rng.integers(k))]
            chosen.append(int(pool[np.argmax(member[pool] + rng.random(len(pool)) * 1e-9)]))
        return np.asarray(chosen if len(chosen) > 1 else [], dtype=np.int64)


class MaxMin(Chooser):
    """The highest- and lowest-rewarded completions under the ensemble's mean reward (m > 2: greedy, each next
    completion the farthest in mean reward from those chosen)."""

    name, needs_rewards = "maxmin", True

    def rank(self, rewards, embeddings, m, rng, ok, dup) -> np.ndarray:
        mean = rewards.mean(axis=0)
        return self.greedy(np.abs(mean[:, None] - mean[None, :]), m, rng, ok, dup)


class DeltaUCB(Chooser):
    """DeltaUCB (ActiveUltraFeedback): the pair (a, b) with the largest UCB(a) − LCB(b), with UCB/LCB = mean ± β·std
    of the ensemble members' rewards; as a symmetric pair gain |μ_a − μ_b| + β (σ_a + σ_b). With one member
    (σ = 0) it is `maxmin`."""

    name, needs_rewards = "delta_ucb", True
    beta = 1.0

    def rank(self, rewards, embeddings, m, rng, ok, dup) -> np.ndarray:
        mean, spread = rewards.mean(axis=0), rewards.std(axis=0)
        gain = np.abs(mean[:, None] - mean[None, :]) + self.beta * (spread[:, None] + spread[None, :])
        return self.greedy(gain, m, rng, ok, dup)


class Diverse(Chooser):
    """The farthest-apart completions (1 − cosine of their embeddings): the cold start, before any reward
    model. Without embeddings: uniform among distinct texts."""

    name = "diverse"

    def rank(self, rewards, embeddings, m, rng, ok, dup) -> np.ndarray:
        n = len(ok)
        if embeddings is None:
            return Random(self.threshold).rank(rewards, embeddings, m, rng, ok, dup)
        gain = 1.0 - similarity(embeddings, None, n)
        return self.greedy(gain, m, rng, ok, dup)


class Random(Chooser):
    """Uniform choice among the allowed pairs (near-duplicates only when nothing else is left): the control."""

    name = "random"

    def rank(self, rewards, embeddings, m, rng, ok, dup) -> np.ndarray:
        return self.greedy(np.zeros(ok.shape), m, rng, ok, dup)


CHOOSERS: dict[str, Callable[..., Chooser]] = {
    "info_gain": InfoGain,
    "thompson": Thompson,
    "maxmin": MaxMin,
    "delta_ucb": DeltaUCB,
    "diverse": Diverse,
    "random": Random,
}


def make_chooser(name: str, threshold: float = 0.98) -> Chooser:
    if name not in CHOOSERS:
        raise CurateError(f"unknown completion choice {name!r}; expected one of {', '.join(CHOOSERS)}")
    return CHOOSERS[name](threshold)
