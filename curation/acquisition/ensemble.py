"""A fast reward-model ensemble for acquisition: Bradley–Terry logistic models on embedding differences.

Training the real reward model (TRL RewardTrainer + LoRA, `training/reward.py`) takes minutes per round; an
acquisition strategy needs rewards for thousands of completions in milliseconds. `BTEnsemble` fits K
Bradley–Terry models on bootstrap resamples of the labelled pairs:

    P(chosen ≻ rejected) = σ(r(chosen) − r(rejected)),   r(x) = w_k · standardize(x)

i.e. a logistic regression without intercept on feature differences (scikit-learn). It gives per item the
mean reward, and per pair the margin and the ensemble disagreement (spread across members), which the
`reward_margin` / `reward_disagreement` strategies read.

Plugging in another reward model: anything with the two methods of `RewardModel` works in the same place —
`fit(pairs) -> self` and `reward(features) -> (K, N) array` (K = 1 for a single model, so its disagreement is
0). The TRL reward model (`training.reward.RewardModel.member_rewards`) gives the same (K, N) array of rewards
for conversations; `prompt_reward_signals` takes such an array, whatever produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from preference.plumbing.errors import CurateError


@dataclass
class Pairs:
    """Features of labelled pairs: row i of `chosen` was preferred over row i of `rejected`."""

    chosen: np.ndarray  # (N, D) features (embeddings) of the preferred answers
    rejected: np.ndarray  # (N, D)

    def __post_init__(self):
        self.chosen = np.asarray(self.chosen)
        self.rejected = np.asarray(self.rejected)
        if self.chosen.shape != self.rejected.shape:
            raise CurateError(f"chosen features {self.chosen.shape} and rejected {self.rejected.shape} differ")

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, idx: np.ndarray) -> Pairs:
        return Pairs(self.chosen[idx], self.rejected[idx])


@runtime_checkable
class RewardModel(Protocol):
    """What acquisition needs from a reward model (the fast ensemble, or an adapter around TRL's)."""

    def fit(self, pairs: Pairs) -> RewardModel: ...

    def reward(self, features: np.ndarray) -> np.ndarray:
        """(K, N) rewards, one row per ensemble member; higher = better answer."""
        ...


@dataclass
class EnsembleConfig:
    members: int = 5  # K bootstrap models
    c: float = 1.0  # inverse L2 strength of each logistic regression (sklearn's C)
    bootstrap: bool = True  # resample pairs with replacement per member (else all members see all pairs)
    feature_fraction: float = 1.0  # random subspace per member (1.0 = all features)
    max_iter: int = 300
    seed: int = 0

    def __post_init__(self):
        if self.members < 1:
            raise ValueError(f"members must be ≥ 1, got {self.members}")
        if self.c <= 0:
            raise ValueError(f"c must be > 0, got {self.c}")
        if not 0.0 < self.feature_fraction <= 1.0:
            raise ValueError(f"feature_fraction must be in (0, 1], got {self.feature_fraction}")


@dataclass
class PairStats:
    """Per pair (a_i, b_i): how much the ensemble prefers a and how much its members disagree."""

    margin: np.ndarray  # (N,) mean over members of r(a) − r(b); > 0 = a preferred
    prob: np.ndarray  # (N,) mean over members of σ(r(a) − r(b))
    disagreement: np.ndarray  # (N,) std over members of r(a) − r(b); higher = less agreement


class BTEnsemble:
    """Bootstrap ensemble of Bradley–Terry logistic models on feature differences. Fit in milliseconds on a few
    thousand 576-dim pairs; `reward` is one matrix product."""

    def __init__(self, config: EnsembleConfig | None = None):
        self.config = config or EnsembleConfig()
        self.weights: np.ndarray | None = None  # (K, D) in standardized space, zero outside a member's subspace
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def fit(self, pairs: Pairs) -> BTEnsemble:
        from sklearn.linear_model import LogisticRegression

        cfg = self.config
        if len(pairs) < 2:
            raise CurateError(f"the reward ensemble needs at least 2 labelled pairs to fit, got {len(pairs)}")
        chosen = np.asarray(pairs.chosen, dtype=np.float64)
        rejected = np.asarray(pairs.rejected, dtype=np.float64)
        if not (np.isfinite(chosen).all() and np.isfinite(rejected).all()):
            raise CurateError("pair features contain NaN/inf; recompute the embeddings of the labelled pairs")
        both = np.concatenate([chosen, rejected])
        self.mean = both.mean(axis=0)
        self.scale = both.std(axis=0) + 1e-6
        diff = (chosen - rejected) / self.scale
        rng = np.random.default_rng(cfg.seed)
        n, d = diff.shape
        n_feat = max(1, int(round(cfg.feature_fraction * d)))
        weights = np.zeros((cfg.members, d))
        for k in range(cfg.members):
            rows = rng.integers(0, n, n) if cfg.bootstrap else np.arange(n)
            cols = np.sort(rng.choice(d, n_feat, replace=False)) if n_feat < d else np.arange(d)
            x = diff[np.ix_(rows, cols)]
            # Mirror each pair (a−b → 1, b−a → 0): both classes present, and no intercept means r is a pure
            # per-answer score, as Bradley–Terry requires.
            x = np.concatenate([x, -x])
            y = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))])
            model = LogisticRegression(C=cfg.c, fit_intercept=False, max_iter=cfg.max_iter)
            model.fit(x, y)
            weights[k, cols] = model.coef_[0]
        self.weights = weights
        return self

    def _check_fitted(self) -> None:
        if self.weights is None:
            raise CurateError("the reward ensemble has not been fitted; call fit(pairs) with labelled pairs first")

    def reward(self, features: np.ndarray) -> np.ndarray:
        """(K, N) member rewards of N answers (higher = better)."""
        self._check_fitted()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.weights.shape[1]:
            raise CurateError(f"features have shape {x.shape}; the ensemble was fitted on dim {self.weights.shape[1]}")
        return self.weights @ ((x - self.mean) / self.scale).T

    def compare(self, a: np.ndarray, b: np.ndarray) -> PairStats:
        diff = self.reward(a) - self.reward(b)
        return PairStats(
            margin=diff.mean(axis=0),
            prob=(1.0 / (1.0 + np.exp(-diff))).mean(axis=0),
            disagreement=diff.std(axis=0),
        )

    def accuracy(self, pairs: Pairs) -> float:
        """Share of pairs whose chosen answer gets the higher mean reward (ties count half)."""
        margin = self.compare(pairs.chosen, pairs.rejected).margin
        return float(np.mean((margin > 0) + 0.5 * (margin == 0))) if len(margin) else float("nan")


def prompt_reward_signals(rewards: np.ndarray, prompt_index: np.ndarray, n_prompts: int) -> dict[str, np.ndarray]:
    """Per-prompt reward signals from the rewards of its completions.

    `rewards` is (K, C): member k's reward of completion j (higher = better; K = 1 for a single model), e.g.
    `model.reward(features)` of any `RewardModel`; `prompt_index[j]` is the prompt row (0..n_prompts-1) of
    completion j. Returns (n_prompts,) arrays:
    - `reward_margin`: mean-reward gap between the prompt's top-2 completions (small = the model cannot tell
      them apart = informative);
    - `reward_disagreement`: std across members of that top-2 gap (high = members disagree);
    - `reward_mean`: mean reward of the prompt's completions.
    Prompts with fewer than two completions get NaN margin/disagreement (strategies then refuse them clearly).
    """
    prompt_index = np.asarray(prompt_index, dtype=np.int64)
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] != len(prompt_index):
        raise CurateError(f"rewards have shape {rewards.shape}; expected (members, {len(prompt_index)} completions)")
    mean = rewards.mean(axis=0)
    order = np.lexsort((-mean, prompt_index))  # by prompt, best completion first
    sorted_prompts = prompt_index[order]
    starts = np.flatnonzero(np.r_[True, sorted_prompts[1:] != sorted_prompts[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    out = {name: np.full(n_prompts, np.nan) for name in ("reward_margin", "reward_disagreement", "reward_mean")}
    sums = np.bincount(prompt_index, weights=mean, minlength=n_prompts)
    have = np.bincount(prompt_index, minlength=n_prompts)
    out["reward_mean"] = np.where(have > 0, sums / np.maximum(have, 1), np.nan)
    two = starts[counts >= 2]
    first, second = order[two], order[two + 1]
    gap = rewards[:, first] - rewards[:, second]  # (K, P2)
    rows = sorted_prompts[two]
    out["reward_margin"][rows] = gap.mean(axis=0)
    out["reward_disagreement"][rows] = gap.std(axis=0)
    return out


def heldout_loglik(train: Pairs, test: Pairs, c: float) -> float:
    """Mean log-likelihood of the `test` pairs' preferences under ONE Bradley–Terry model (no bootstrap: the same
    data give the same number) fitted on `train`: the held-out score `curation.acquisition.strategies.measure_round` compares
    with and without an arm's batch. NaN when either side has fewer than 2 pairs (resp. 1)."""
    if len(train) < 2 or len(test) < 1:
        return float("nan")
    model = BTEnsemble(EnsembleConfig(members=1, c=c, bootstrap=False)).fit(train)
    margin = model.compare(test.chosen, test.rejected).margin
    return float(np.mean(-np.logaddexp(0.0, -margin)))  # log σ(margin), stable
