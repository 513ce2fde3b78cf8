"""The fast Bradley–Terry reward ensemble used by acquisition."""

import numpy as np
import pytest

from curation.acquisition.ensemble import BTEnsemble, EnsembleConfig, Pairs, RewardModel, prompt_reward_signals
from preference.plumbing.errors import CurateError


def separable_pairs(n=300, dim=10, seed=0):
    """Answers whose true reward is w·x; chosen = the higher of two random answers."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    a_wins = (a @ w > b @ w)[:, None]
    return Pairs(np.where(a_wins, a, b), np.where(a_wins, b, a)), w


def test_learns_a_separable_preference():
    train, w = separable_pairs(seed=0)
    model = BTEnsemble(EnsembleConfig(members=5, seed=0)).fit(train)
    assert isinstance(model, RewardModel)
    assert model.reward(train.chosen[:7]).shape == (5, 7)
    # held-out pairs drawn with the same true reward vector
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(500, 10)), rng.normal(size=(500, 10))
    truth = a @ w > b @ w
    assert np.mean((model.compare(a, b).margin > 0) == truth) > 0.9
    assert model.accuracy(train) > 0.9


def test_disagreement_is_higher_off_distribution():
    train, _ = separable_pairs(n=200, seed=0)
    model = BTEnsemble(EnsembleConfig(members=8, seed=0)).fit(train)
    rng = np.random.default_rng(3)
    near_a, near_b = rng.normal(size=(200, 10)), rng.normal(size=(200, 10))
    far_a, far_b = 8 * rng.normal(size=(200, 10)), 8 * rng.normal(size=(200, 10))
    near = model.compare(near_a, near_b).disagreement.mean()
    far = model.compare(far_a, far_b).disagreement.mean()
    assert far > 3 * near


def test_seeded_and_errors():
    train, _ = separable_pairs(n=50)
    one = BTEnsemble(EnsembleConfig(seed=4)).fit(train).reward(train.chosen)
    two = BTEnsemble(EnsembleConfig(seed=4)).fit(train).reward(train.chosen)
    assert np.array_equal(one, two)
    with pytest.raises(CurateError, match="not been fitted"):
        BTEnsemble().reward(train.chosen)
    with pytest.raises(CurateError, match="at least 2"):
        BTEnsemble().fit(train.subset(np.array([0])))
    with pytest.raises(CurateError, match="dim 10"):
        BTEnsemble().fit(train).reward(np.zeros((2, 3)))


def test_prompt_reward_signals_top2_margin():
    class Fixed:
        def fit(self, pairs):
            return self

        def reward(self, features):
            return np.stack([features[:, 0], features[:, 0] + features[:, 1]])  # 2 members

    # prompt 0: rewards 3, 1, 2.9 (tight top-2); prompt 1: 5, 0 (wide); prompt 2: a single completion
    feats = np.array([[3, 0], [1, 0], [2.9, 0.2], [5, 0], [0, 0], [1, 0]], dtype=float)
    index = np.array([0, 0, 0, 1, 1, 2])
    out = prompt_reward_signals(Fixed().reward(feats), index, 4)
    assert out["reward_margin"][0] == pytest.approx(0.0)  # member means: 3 vs 3.0 → mean gap 0
    assert out["reward_margin"][1] == pytest.approx(5.0)
    assert out["reward_disagreement"][0] == pytest.approx(0.1)  # gaps 0.1 and -0.1
    assert np.isnan(out["reward_margin"][2]) and np.isnan(out["reward_mean"][3])
    assert out["reward_mean"][1] == pytest.approx(2.5)
