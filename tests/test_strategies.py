"""Acquisition strategies: one conformance test every strategy passes, then behaviour per family."""

import numpy as np
import pytest

from curation.acquisition.strategies import (
    STRATEGIES,
    Budget,
    DropNearDuplicates,
    Entropy,
    ErrorBased,
    ExcludeIds,
    Items,
    KCenterGreedy,
    KMeansPlusPlus,
    LowLogprob,
    Random,
    SliceQuotas,
    TopThenDiverse,
    UnderDenseClusters,
    all_strategies,
    build_strategy,
)
from preference.plumbing.errors import CurateError

SIGNALS = (
    "prompt_perplexity", "mean_completion_perplexity", "mean_logprob", "mean_entropy", "committee_disagreement",
    "committee_range", "vote_entropy", "semantic_spread", "reward_margin", "reward_disagreement", "error_score",
    "thumbs_down",
)


def make_items(n: int = 60, dim: int = 8, seed: int = 0, labelled: int = 0) -> Items:
    rng = np.random.default_rng(seed)
    signals = {name: rng.normal(size=n) for name in SIGNALS}
    signals["error_score"] = (rng.random(n) < 0.2).astype(float)
    signals["thumbs_down"] = rng.poisson(0.3, size=n).astype(float)
    return Items(
        ids=[f"p{i}" for i in range(n)],
        signals=signals,
        embeddings=rng.normal(size=(n, dim)),
        slices=rng.choice(["a", "b"], size=n),
        labelled=rng.normal(size=(labelled, dim)) if labelled else None,
    )


STRATEGY_PARAMS = [pytest.param(s, id=s.name) for s in all_strategies()]


def test_every_registered_strategy_is_in_the_conformance_set():
    names = {s.name for s in all_strategies()}
    assert set(STRATEGIES) <= names


@pytest.mark.parametrize("strategy", STRATEGY_PARAMS)
def test_conformance(strategy):
    items = make_items(labelled=5)
    rng = np.random.default_rng
    # shapes: one finite score per item; k distinct in-range indices
    scores = strategy.score(items)
    assert scores.shape == (len(items),) and np.isfinite(scores).all()
    picks = strategy.select(items, 7, rng(1))
    assert picks.dtype == np.int64 and len(picks) == 7 and len(set(picks.tolist())) == 7
    assert picks.min() >= 0 and picks.max() < len(items)
    # determinism under a seed
    assert np.array_equal(picks, strategy.select(items, 7, rng(1)))
    # k > pool: every item once; k = 0 and an empty pool: nothing
    everything = strategy.select(items, 1000, rng(2))
    assert sorted(everything.tolist()) == list(range(len(items)))
    assert len(strategy.select(items, 0, rng(3))) == 0
    empty = items.subset(np.zeros(0, dtype=np.int64))
    assert len(strategy.select(empty, 5, rng(4))) == 0
    with pytest.raises(CurateError, match="non-negative integer"):
        strategy.select(items, -1, rng(5))


@pytest.mark.parametrize("strategy", STRATEGY_PARAMS)
def test_conformance_nan_inputs_give_a_clear_error(strategy):
    items = make_items()
    for values in items.signals.values():
        values[3] = np.nan
    items.embeddings[3, 0] = np.nan
    if not strategy.inputs:  # random reads nothing, so NaN signals do not concern it
        assert len(strategy.select(items, 5, np.random.default_rng(0))) == 5
        return
    with pytest.raises(CurateError, match=r"NaN/inf.*p3"):
        strategy.select(items, 5, np.random.default_rng(0))


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, id=s.name) for s in all_strategies() if s.inputs and s.inputs[0] in SIGNALS]
)
def test_conformance_direction_signal_strategies(strategy):
    """Higher score = more informative: the item made most extreme in each input's informative direction wins."""
    items = make_items()
    for col in strategy.inputs:
        if col in items.signals:
            items.signals[col][11] = -100.0 if col in ("mean_logprob", "reward_margin") else 100.0
    assert strategy.checked_score(items).argmax() == 11
    if "embedding" not in strategy.inputs:  # pure ranking: the top item is picked
        assert 11 in strategy.select(items, 3, np.random.default_rng(0)).tolist()


def test_missing_signal_names_the_columns():
    items = Items(ids=["a", "b"], signals={"mean_entropy": np.ones(2)})
    with pytest.raises(CurateError, match="'vote_entropy'.*mean_entropy"):
        build_strategy("vote_entropy").select(items, 1, np.random.default_rng(0))
    with pytest.raises(CurateError, match="embeddings"):
        KCenterGreedy().select(items, 1, np.random.default_rng(0))


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(CurateError, match="unknown strategy 'entropyy'.*kcenter"):
        build_strategy("entropyy")


# ------------------------------------------------------------------------------------------------ behaviour
def clustered(n_clusters=5, per=40, dim=16, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)) * 10
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) for c in centers])
    labels = np.repeat(np.arange(n_clusters), per)
    return x, labels


def test_kcenter_covers_every_cluster():
    x, labels = clustered()
    items = Items(ids=np.arange(len(x)), embeddings=x)
    picks = KCenterGreedy().select(items, 5, np.random.default_rng(0))
    assert sorted(labels[picks].tolist()) == [0, 1, 2, 3, 4]


def test_kcenter_skips_clusters_already_labelled():
    x, labels = clustered()
    labelled = x[labels < 3][::40]  # one labelled point in each of clusters 0, 1, 2
    items = Items(ids=np.arange(len(x)), embeddings=x, labelled=labelled)
    picks = KCenterGreedy().select(items, 2, np.random.default_rng(0))
    assert sorted(labels[picks].tolist()) == [3, 4]
    assert KCenterGreedy().score(items)[labels == 4].min() > KCenterGreedy().score(items)[labels == 0].max()


def test_kmeanspp_and_under_dense_spread_over_clusters():
    x, labels = clustered(n_clusters=4, per=50)
    items = Items(ids=np.arange(len(x)), embeddings=x)
    assert len(set(labels[KMeansPlusPlus().select(items, 4, np.random.default_rng(0))])) == 4
    under = UnderDenseClusters(n_clusters=4)
    assert sorted(labels[under.select(items, 8, np.random.default_rng(0))].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # clusters 0-2 are labelled: their score is lower and the picks go to cluster 3
    covered = Items(ids=np.arange(len(x)), embeddings=x, labelled=x[labels < 3])
    assert set(labels[under.select(covered, 3, np.random.default_rng(0))]) == {3}
    s = under.score(covered)
    assert s[labels == 3].min() > s[labels == 0].max()


def test_uncertainty_picks_the_known_uncertain_items():
    rng = np.random.default_rng(0)
    n = 200
    entropy = rng.uniform(0.5, 1.0, n)
    logprob = rng.uniform(-1.0, -0.5, n)
    uncertain = np.array([7, 42, 99, 150])
    entropy[uncertain] = 3.0
    logprob[uncertain] = -4.0
    items = Items(ids=np.arange(n), signals={"mean_entropy": entropy, "mean_logprob": logprob})
    for strategy in (Entropy(), LowLogprob(), build_strategy("weighted", weights={"entropy": 1, "low_logprob": 1})):
        picks = strategy.select(items, 4, np.random.default_rng(1))
        assert sorted(picks.tolist()) == uncertain.tolist(), strategy.name


def test_hybrid_takes_top_candidates_then_diversifies():
    x, labels = clustered(n_clusters=4, per=25)
    score = np.zeros(len(x))
    score[labels == 0] = 10.0 + np.arange(25)  # cluster 0 is the most uncertain...
    score[labels == 1] = 5.0  # ...then cluster 1
    items = Items(ids=np.arange(len(x)), signals={"mean_entropy": score}, embeddings=x)
    plain = Entropy().select(items, 4, np.random.default_rng(0))
    assert set(labels[plain]) == {0}  # top-k alone is redundant
    hybrid = TopThenDiverse(Entropy(), factor=50 / 4)
    picks = hybrid.select(items, 4, np.random.default_rng(0))
    assert set(labels[picks]) == {0, 1}  # shortlist = clusters 0 and 1, k-center spreads over both


def test_error_based_prefers_failures():
    items = make_items(n=50)
    items.signals["error_score"][:] = 0.0
    items.signals["error_score"][[3, 9]] = [1.0, 0.7]
    picks = ErrorBased().select(items, 2, np.random.default_rng(0))
    assert picks.tolist() == [3, 9]


def test_random_is_uniform_and_seeded():
    items = make_items(n=10)
    counts = np.zeros(10)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        counts[Random().select(items, 3, rng)] += 1
    assert np.allclose(counts / 2000, 0.3, atol=0.05)


def test_slice_quotas_are_exact_and_fill_the_rest():
    items = make_items(n=80)
    quotas = SliceQuotas(Entropy(), {"a": 2, "b": 5})
    picks = quotas.select(items, 10, np.random.default_rng(0))
    assert len(picks) == 10 and len(set(picks.tolist())) == 10
    first = items.slices[picks[:7]].tolist()
    assert first.count("a") == 2 and first.count("b") == 5
    # within a slice the strategy's order holds: the quota takes that slice's top entropies
    b_rows = np.flatnonzero(items.slices == "b")
    top_b = b_rows[np.argsort(-items.signals["mean_entropy"][b_rows])[:5]]
    assert set(picks[2:7].tolist()) == set(top_b.tolist())
    with pytest.raises(CurateError, match="quotas add up to 7"):
        quotas.select(items, 6, np.random.default_rng(0))


def test_exclusion_budget_and_near_duplicates():
    items = make_items(n=30)
    excluded = {f"p{i}" for i in range(0, 30, 2)}
    picks = ExcludeIds(Random(), excluded).select(items, 100, np.random.default_rng(0))
    assert len(picks) == 15 and not set(items.ids[picks]) & excluded
    assert len(Budget(Entropy(), budget=10, used=7).select(items, 5, np.random.default_rng(0))) == 3
    # near duplicates: item 1 ≈ item 0 (both top by entropy); item 2 ≈ a labelled item
    x = np.eye(30, 8, dtype=np.float32) + 0.01
    x[1] = x[0] * 1.001
    entropy = np.linspace(0, 1, 30)[::-1].copy()
    dup = Items(ids=np.arange(30), signals={"mean_entropy": entropy}, embeddings=x, labelled=x[2:3])
    picks = DropNearDuplicates(Entropy(), 0.99).select(dup, 3, np.random.default_rng(0))
    assert picks.tolist() == [0, 3, 4]


def test_cold_start_uses_the_fallback_until_the_signals_exist():
    x, labels = clustered(n_clusters=4, per=10)
    items = Items(ids=np.arange(len(x)), embeddings=x)
    strategy = build_strategy("reward_disagreement|kcenter")
    assert strategy.usable_without({"reward_disagreement"})
    assert not build_strategy("reward_disagreement").usable_without({"reward_disagreement"})
    assert sorted(labels[strategy.select(items, 4, np.random.default_rng(0))].tolist()) == [0, 1, 2, 3]
    disagreement = np.zeros(len(x))
    disagreement[[3, 17]] = [2.0, 1.0]
    items.signals["reward_disagreement"] = disagreement
    assert strategy.select(items, 2, np.random.default_rng(0)).tolist() == [3, 17]
    assert strategy.directions() == {"reward_disagreement": True}
