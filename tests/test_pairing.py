"""Completion choice: which completions of a prompt reviewers see (curation/acquisition/pairing.py)."""

import numpy as np
import pytest

from curation.acquisition.pairing import CHOOSERS, make_chooser, pair_information
from preference.plumbing.errors import CurateError


def rng(seed=0):
    return np.random.default_rng(seed)


def test_information_is_the_members_disagreement_about_the_difference():
    # completions 0/1: every member agrees on a large gap; 2/3: members disagree about which is better
    rewards = np.array([[3.0, 0.0, 1.0, -1.0],
                        [3.1, 0.0, -1.0, 1.0]])
    info = pair_information(rewards)
    assert info.shape == (4, 4) and np.allclose(info, info.T) and np.allclose(np.diag(info), 0)
    assert info[2, 3] > 0.2 > 0.01 > info[0, 1]
    one = pair_information(rewards[:1])  # one model: predictive entropy, highest for the closest rewards
    assert np.unravel_index(np.argmax(one), one.shape) in {(1, 2), (2, 1)}  # |0 − 1| is the smallest gap


def test_info_gain_picks_the_uncertain_pair_and_skips_near_duplicates():
    rewards = np.array([[3.0, 0.0, 1.0, -1.0, 1.0], [3.1, 0.0, -1.0, 1.0, -1.0]])
    emb = np.eye(5)
    assert sorted(make_chooser("info_gain").choose(rewards, emb, 2, rng()).tolist()) in ([2, 3], [3, 4])
    # completion 4 is a near-copy of 3 (and 2 of 4 has the same rewards as 2/3): with 3 chosen, 4 is skipped
    emb[4] = emb[3] + 0.01
    picks = make_chooser("info_gain").choose(rewards, emb, 3, rng()).tolist()
    assert 2 in picks and not {3, 4} <= set(picks)
    # identical texts count as duplicates even without embeddings
    texts = ["a", "b", "same", "same ", "c"]
    picks = make_chooser("info_gain").choose(rewards, None, 2, rng(), texts=texts).tolist()
    assert sorted(picks) != [2, 3]


def test_allowed_pairs_and_random_control():
    rewards = np.array([[0.0, 0.1, 5.0, 9.0], [0.0, -0.1, 5.0, 9.0]])
    allowed = np.ones((4, 4), bool)
    allowed[0, 1] = allowed[1, 0] = False  # the most uncertain pair was already asked
    picks = make_chooser("info_gain").choose(rewards, None, 2, rng(), allowed=allowed)
    assert sorted(picks.tolist()) != [0, 1] and len(picks) == 2
    counts = np.zeros((4, 4))
    for seed in range(600):
        a, b = make_chooser("random").choose(rewards, None, 2, rng(seed))
        counts[min(a, b), max(a, b)] += 1
    upper = counts[np.triu_indices(4, 1)]
    assert np.all(np.abs(upper / 600 - 1 / 6) < 0.06)  # every pair about equally often


def test_thompson_diverse_and_cold_start():
    rewards = np.array([[5.0, 4.9, 0.0, -3.0], [0.0, 5.0, 4.9, -3.0]])
    picks = make_chooser("thompson").choose(rewards, None, 2, rng(1))
    assert len(set(picks.tolist())) == 2 and 3 not in picks  # never the answer every member ranks last
    emb = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.7, 0.7]])
    assert sorted(make_chooser("diverse").choose(None, emb, 2, rng()).tolist()) in ([0, 2], [1, 2])
    # no reward model yet: the reward-based choosers fall back to the diverse choice
    assert sorted(make_chooser("info_gain").choose(None, emb, 2, rng()).tolist()) in ([0, 2], [1, 2])


def test_maxmin_and_delta_ucb():
    # means 1.0, 0.0, 0.4, 0.45; completion 2's members disagree widely (σ 2)
    rewards = np.array([[1.0, 0.0, -1.6, 0.45], [1.0, 0.0, 2.4, 0.45]])
    assert sorted(make_chooser("maxmin").choose(rewards, None, 2, rng()).tolist()) == [0, 1]  # highest, lowest
    # DeltaUCB: max UCB(a) − LCB(b) = (μ_a + σ_a) − (μ_b − σ_b) = 0.6 + 2 for the uncertain 2 against 0 (1 vs 2:
    # 0.4 + 2; maxmin's 0 vs 1: 1.0)
    assert sorted(make_chooser("delta_ucb").choose(rewards, None, 2, rng()).tolist()) == [0, 2]
    # with one member (σ = 0) it is maxmin
    single = rewards[1:]
    assert sorted(make_chooser("delta_ucb").choose(single, None, 2, rng()).tolist()) == \
        sorted(make_chooser("maxmin").choose(single, None, 2, rng()).tolist())
    # a near-duplicate of the top answer is not shown beside it (three slots: the next-farthest instead)
    emb = np.eye(4)
    emb[3] = emb[0] + 0.01
    assert 3 not in make_chooser("maxmin").choose(rewards, emb, 3, rng()).tolist()[:2]


@pytest.mark.parametrize("name", list(CHOOSERS))
def test_conformance(name):
    r = rng(3)
    rewards, emb = r.normal(size=(3, 7)), r.normal(size=(7, 4))
    chooser = make_chooser(name)
    for m in (2, 4, 7, 10):
        picks = chooser.choose(rewards, emb, m, rng(m))
        assert picks.dtype == np.int64 and len(picks) == min(m, 7) and len(set(picks.tolist())) == len(picks)
        assert np.array_equal(picks, chooser.choose(rewards, emb, m, rng(m)))  # seeded
    with pytest.raises(CurateError, match="≥ 2"):
        chooser.choose(rewards, emb, 1, rng())
    with pytest.raises(CurateError, match="different numbers of completions"):
        chooser.choose(rewards, emb[:3], 2, rng())
    bad = rewards.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CurateError, match="NaN"):
        chooser.choose(bad, emb, 2, rng())
    with pytest.raises(CurateError, match="unknown completion choice"):
        make_chooser("best")
