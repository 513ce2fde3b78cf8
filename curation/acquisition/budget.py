"""Budgeting: how much will more labels help? A learning curve over the project's rounds.

    curve = learning_curve(rnd)      # this round and the earlier ones
    curve["expected_gain_next_round"]  # {"labels": +8, "accuracy": 0.012, "low": -0.004, "high": 0.031}
    curve["labels_to_reach"]           # [{"target": 0.62, "labels": 410, "low": 260, "high": None}, ...]
    curve["warning"]                   # "flat curve: ..." or None

Points: for every round up to `rnd` whose `evaluate` step finished on the same held-out set as the latest one,
x = labels used so far (the records reviewers answered, summed over the `pull` steps of that round and the
earlier ones; round 0, the bootstrap, counts the prompts its imported labels cover) and y = the round's held-out reward-model accuracy (`evaluate/metrics.json`: `reward.accuracy`, with
its bootstrap CI).

Fit: the inverse power law of learning curves, acc(n) = a − b·n^(−c) with a ≤ 1, b ≥ 0 (accuracy does not fall
with more labels), c in (0, 2], weighted by each point's standard error (scipy `curve_fit`). With two points the
exponent is fixed at c = 0.5 (a common empirical value) and only a, b are fitted; with one point there is no fit.
Intervals are a parametric bootstrap: every point's accuracy is redrawn from its CI (normal, se = CI width / 2z),
the curve refitted, and forecasts read as 2.5/97.5 percentiles (`confidence`).

Forecasts: the accuracy after N more labels; "labels to reach X" (None when the fitted ceiling a is below X, or
no resample reaches it for the interval); the expected gain of the next round (the latest round's label count
again). `warning` says when the curve is flat — the next round's gain is forecast below `min_gain` even at the
interval's upper end — so more labels will hardly help the current model (change the model, features or data).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from preference.plumbing.io import read_json

FORM = "a - b * n^(-c)"
FIXED_EXPONENT = 0.5


def round_points(rnd) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """[{"round", "labels", "new_labels", "accuracy", "ci", "n"}] oldest first, and the held-out set they share."""
    rounds = [*reversed(list(rnd.earlier())), rnd]
    labels, points = 0, []
    heldout = None
    from training.data import pairs_step

    for r in rounds:
        pull = pairs_step(r)  # round 0: the imported labels (their prompts count as its records)
        new = int((pull.manifest().get("counts") or {}).get("records", 0)) if pull.done else 0
        labels += new
        evaluate = r.step("evaluate")
        if not evaluate.done or not (evaluate.path / "metrics.json").is_file():
            continue
        metrics = read_json(evaluate.path / "metrics.json")
        reward = metrics.get("reward") or {}
        if not isinstance(reward.get("accuracy"), (int, float)):
            continue
        ci = reward.get("ci") or [None, None]
        points.append({"round": r.number, "labels": labels, "new_labels": new, "accuracy": float(reward["accuracy"]),
                       "ci": ci, "n": reward.get("n"), "heldout": metrics.get("heldout"),
                       "confidence": (evaluate.manifest().get("config") or {}).get("confidence", 0.95)})
    if points:
        heldout = points[-1]["heldout"]
        points = [p for p in points if p["heldout"] == heldout]  # accuracies on another held-out set do not compare
    return points, heldout


def _se(point: dict, z: float) -> float:
    lo, hi = point["ci"]
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and hi > lo:
        return (hi - lo) / (2 * z)
    n = point.get("n") or 100
    p = min(max(point["accuracy"], 0.05), 0.95)
    return math.sqrt(p * (1 - p) / n)


def power_law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * np.power(np.asarray(n, dtype=np.float64), -c)


def fit_curve(labels, accuracy, se) -> tuple[float, float, float, bool]:
    """(a, b, c, exponent fixed?) of acc(n) = a − b·n^(−c), weighted least squares. ≥ 3 points: all three
    parameters; 2 points: c = 0.5. Needs ≥ 2 distinct label counts (ValueError otherwise)."""
    from scipy.optimize import curve_fit

    x = np.asarray(labels, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    w = np.asarray(se, dtype=np.float64)
    if len(np.unique(x)) < 2 or (x <= 0).any():
        raise ValueError("a learning curve needs accuracies at two or more different positive label counts")
    if len(np.unique(x)) == 2:
        return (*_fit_fixed(x, y, w), FIXED_EXPONENT, True)
    a0, b0 = _fit_fixed(x, y, w)
    try:
        (a, b, c), _ = curve_fit(power_law, x, y, p0=(a0, max(b0, 1e-3), FIXED_EXPONENT), sigma=w,
                                 bounds=([0.0, 0.0, 1e-3], [1.0, np.inf, 2.0]), maxfev=5000)
    except (RuntimeError, ValueError):  # no convergence: keep the fixed-exponent fit
        return a0, b0, FIXED_EXPONENT, True
    return float(a), float(b), float(c), False


def _fit_fixed(x, y, w) -> tuple[float, float]:
    """a, b with c = 0.5: weighted linear least squares in x^(−c), then b ≥ 0 and a ≤ 1 enforced."""
    t = np.power(x, -FIXED_EXPONENT)
    design = np.stack([np.ones_like(t), -t], axis=1) / w[:, None]
    (a, b), *_ = np.linalg.lstsq(design, y / w, rcond=None)
    if b < 0:  # accuracy fell with more labels: a flat curve at the weighted mean
        return float(np.average(y, weights=1 / w**2)), 0.0
    if a > 1.0:
        a = 1.0
        b = float(np.average((a - y) / t, weights=(t / w) ** 2))
    return float(a), float(b)


def labels_for(target: float, a: float, b: float, c: float) -> float | None:
    """Labels at which the curve reaches `target` (None when the ceiling a does not exceed it)."""
    if b <= 0 or target >= a:
        return None
    return float((b / (a - target)) ** (1.0 / c))


def learning_curve(rnd, **options) -> dict[str, Any]:
    """The project's learning curve up to round `rnd` with forecasts (see the module docstring). Returns

        {"metric", "form", "heldout", "points": [{"round", "labels", "new_labels", "accuracy", "ci"}],
         "fit": {"a", "b", "c", "exponent_fixed", "points", "confidence"} | None,
         "forecast": [{"labels", "accuracy", "low", "high"}], "expected_gain_next_round": {"labels", "accuracy",
         "low", "high"} | None, "labels_to_reach": [{"target", "labels", "more_labels", "low", "high"}],
         "warning": str | None (the flat-curve warning, or too few rounds), "note": str | None}

    Options (see `curve_from_points`): targets, horizon, resamples, min_gain, seed."""
    points, heldout = round_points(rnd)
    return curve_from_points(points, heldout, **options)


def curve_from_points(points: list[dict], heldout: dict | None = None, *, targets: list[float] | None = None,
                      horizon: int = 4, resamples: int = 200, min_gain: float = 0.005, seed: int = 0) -> dict:
    """`learning_curve` on `round_points` output. `targets`: accuracies for "labels to reach X" (default: the
    latest accuracy + 0.01, + 0.02, + 0.05); `horizon`: forecast this many more rounds of the latest round's
    label count; `min_gain`: a next-round gain whose upper interval end is below this is a flat curve."""
    from scipy.stats import norm

    out: dict[str, Any] = {"metric": "reward.accuracy", "form": FORM, "heldout": heldout,
                           "points": [{k: p[k] for k in ("round", "labels", "new_labels", "accuracy", "ci")}
                                      for p in points],
                           "fit": None, "forecast": [], "labels_to_reach": [], "expected_gain_next_round": None,
                           "warning": None, "note": None}
    usable = [p for p in points if p["labels"] > 0]
    if len({p["labels"] for p in usable}) < 2:
        out["warning"] = (f"{len(usable)} evaluated round(s) with labels: a learning curve needs two or more "
                          "(run another round)")
        return out
    confidence = float(usable[-1].get("confidence", 0.95))
    z = float(norm.ppf(0.5 + confidence / 2))
    x = np.array([p["labels"] for p in usable], dtype=np.float64)
    y = np.array([p["accuracy"] for p in usable])
    se = np.array([max(_se(p, z), 1e-3) for p in usable])
    a, b, c, fixed = fit_curve(x, y, se)
    out["fit"] = {"a": a, "b": b, "c": c, "exponent_fixed": fixed, "points": len(usable), "confidence": confidence}
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        try:
            boot.append(fit_curve(x, np.clip(y + rng.normal(0.0, se), 0.0, 1.0), se)[:3])
        except ValueError:
            continue
    boot_arr = np.array(boot)
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    now = float(x[-1])
    step = int(usable[-1]["new_labels"]) or int(round(float(np.diff(x).mean())))
    current = float(power_law(now, a, b, c))
    for j in range(1, horizon + 1):
        n = now + j * step
        draws = power_law(n, boot_arr[:, 0], boot_arr[:, 1], boot_arr[:, 2])
        out["forecast"].append({"labels": int(n), "accuracy": float(power_law(n, a, b, c)),
                                "low": float(np.percentile(draws, lo_q)), "high": float(np.percentile(draws, hi_q))})
    gains = (power_law(now + step, boot_arr[:, 0], boot_arr[:, 1], boot_arr[:, 2])
             - power_law(now, boot_arr[:, 0], boot_arr[:, 1], boot_arr[:, 2]))
    gain = {"labels": step, "accuracy": float(power_law(now + step, a, b, c)) - current,
            "low": float(np.percentile(gains, lo_q)), "high": float(np.percentile(gains, hi_q))}
    out["expected_gain_next_round"] = gain
    for target in targets if targets is not None else [y[-1] + d for d in (0.01, 0.02, 0.05)]:
        need = labels_for(target, a, b, c)
        draws = np.array([labels_for(target, *p) or np.inf for p in boot_arr])
        low, high = (np.percentile(draws, q, method="nearest") for q in (lo_q, hi_q))  # may be inf: no interpolation
        out["labels_to_reach"].append({
            "target": float(target), "labels": None if need is None else int(math.ceil(need)),
            "more_labels": None if need is None else max(0, int(math.ceil(need - now))),
            "low": None if not np.isfinite(low) else int(math.ceil(low)),
            "high": None if not np.isfinite(high) else int(math.ceil(high)),
        })
    if gain["high"] < min_gain:
        out["warning"] = (f"flat curve: the next round (+{step} labels) is forecast to add {gain['accuracy']:+.3f} "
                     f"accuracy ({confidence:.0%} interval {gain['low']:+.3f} to {gain['high']:+.3f}); more labels "
                          "will hardly help the current model — change the model, its features or the data instead")
    if fixed:
        out["note"] = f"{len(usable)} points: exponent fixed at c = {FIXED_EXPONENT}; forecasts are rough"
    return out
