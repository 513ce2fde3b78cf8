"""Budgeting: the learning curve over rounds (curation/acquisition/budget.py), on a real tiny project and on curves whose
true shape is known."""

from __future__ import annotations

import numpy as np
import pytest

from curation.acquisition.budget import curve_from_points, fit_curve, labels_for, learning_curve, power_law
from preference.plumbing.io import read_json
from preference.plumbing.store import Project

# under `pytest -n` (make test) these tests share one worker: the session's tiny rounds are made once
pytestmark = pytest.mark.xdist_group("tiny_rounds")


@pytest.mark.vllm
def test_learning_curve_of_a_real_two_round_project(tiny_project):
    project = Project(tiny_project)
    first, second = project.round(1), project.round(2)
    one = learning_curve(first)
    assert one["fit"] is None and "two or more" in one["warning"] and len(one["points"]) == 1
    curve = learning_curve(second)
    labels = [first.step("pull").manifest()["counts"]["records"]]
    labels.append(labels[0] + second.step("pull").manifest()["counts"]["records"])
    accuracy = [read_json(r.step("evaluate").file("metrics.json"))["reward"]["accuracy"] for r in (first, second)]
    assert [p["labels"] for p in curve["points"]] == labels
    assert [p["accuracy"] for p in curve["points"]] == accuracy
    assert curve["fit"]["exponent_fixed"] and "exponent fixed" in curve["note"]
    step = labels[1] - labels[0]
    assert [f["labels"] for f in curve["forecast"]] == [labels[1] + j * step for j in range(1, 5)]
    assert all(f["low"] <= f["accuracy"] <= f["high"] for f in curve["forecast"])
    gain = curve["expected_gain_next_round"]
    assert gain["labels"] == step and gain["low"] <= gain["accuracy"] <= gain["high"]
    assert curve["heldout"] == read_json(second.step("evaluate").file("metrics.json"))["heldout"]


def points(labels, accuracy, halfwidth=0.01):
    pairs = enumerate(zip(labels, accuracy, strict=True))
    return [{"round": i + 1, "labels": n, "new_labels": n - (labels[i - 1] if i else 0), "accuracy": a,
             "ci": [a - halfwidth, a + halfwidth], "n": 1000} for i, (n, a) in pairs]


def test_recovers_a_known_power_law_and_forecasts_with_an_interval():
    labels = [25, 50, 100, 200, 400]
    truth = (0.8, 0.5, 0.5)
    a, b, c, fixed = fit_curve(labels, power_law(np.array(labels), *truth), [0.005] * 5)
    assert not fixed and np.allclose((a, b, c), truth, atol=0.02)
    assert labels_for(0.75, *truth) == pytest.approx(100.0)
    assert labels_for(0.85, *truth) is None  # above the ceiling
    curve = curve_from_points(points(labels, power_law(np.array(labels), *truth).tolist()), targets=[0.77, 0.95])
    forecast = curve["forecast"][0]
    assert forecast["labels"] == 600
    assert forecast["low"] <= power_law(600, *truth) <= forecast["high"]
    reach = {r["target"]: r for r in curve["labels_to_reach"]}
    assert reach[0.77]["labels"] == pytest.approx((0.5 / 0.03) ** 2, rel=0.15)
    assert reach[0.77]["low"] <= reach[0.77]["labels"] <= reach[0.77]["high"]
    assert reach[0.95]["labels"] is None and reach[0.95]["more_labels"] is None
    gain = curve["expected_gain_next_round"]
    assert gain["accuracy"] == pytest.approx(power_law(600, *truth) - power_law(400, *truth), abs=0.002)


def test_flat_curve_warns_and_falling_accuracy_is_flat():
    flat = curve_from_points(points([100, 200, 300, 400], [0.70, 0.701, 0.699, 0.70], halfwidth=0.005))
    assert flat["warning"].startswith("flat curve") and flat["fit"]["b"] >= 0
    falling = curve_from_points(points([50, 100], [0.66, 0.62]))
    assert falling["fit"]["b"] == 0.0 and falling["warning"].startswith("flat curve")
    assert all(f["accuracy"] == pytest.approx(falling["fit"]["a"]) for f in falling["forecast"])
