"""Agreement measures against known values (Krippendorff 2011's worked examples; scipy's τ-b) and routing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kendalltau

from preference.agreement import (
    ReviewConfig,
    agreement_report,
    annotator_stats,
    item_tau,
    jaccard_distance,
    kendall_tau_b,
    krippendorff_alpha,
    route_for_review,
)
from preference.schema import Response

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: 4 observers, 12 units, missing = None
KRIPP_C = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def units_of(matrix):
    return [[v for v in col if v is not None] for col in zip(*matrix, strict=True)]


def test_krippendorff_alpha_published_values():
    assert krippendorff_alpha(units_of(KRIPP_C)) == pytest.approx(0.743, abs=5e-4)  # nominal
    assert krippendorff_alpha(units_of(KRIPP_C), lambda x, y: (x - y) ** 2) == pytest.approx(0.849, abs=5e-4)
    # example A: two observers, binary data → 0.095
    a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert krippendorff_alpha(list(zip(a, b, strict=True))) == pytest.approx(0.095, abs=5e-4)


def test_krippendorff_alpha_on_label_sets_by_hand():
    # values {a}, {a,b}, {}, {}: nominal D_o = 2/4, D_e = 10/12 → 0.4; Jaccard D_o = 1/4, D_e = 9/12 → 2/3
    units = [[frozenset("a"), frozenset("ab")], [frozenset(), frozenset()]]
    assert krippendorff_alpha(units) == pytest.approx(0.4)
    assert krippendorff_alpha(units, jaccard_distance) == pytest.approx(2 / 3)
    assert jaccard_distance(frozenset(), frozenset()) == 0.0


def test_krippendorff_alpha_edge_cases():
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # no variation: expected disagreement 0
    assert krippendorff_alpha([[1], [2], [3]]) is None  # no unit with two values
    assert krippendorff_alpha([[1, 1], [2, 2]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[1, 2], [2, 1]]) < 0  # systematic disagreement


def test_kendall_tau_b_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 7))
        a = rng.integers(1, 4, n)
        b = rng.integers(1, 4, n)
        ours = kendall_tau_b({str(i): int(x) for i, x in enumerate(a)}, {str(i): int(x) for i, x in enumerate(b)})
        ref = kendalltau(a, b).statistic
        if np.isnan(ref):
            assert ours is None
        else:
            assert ours == pytest.approx(ref)


def test_kendall_tau_b_known_values():
    x = {"a": 1, "b": 2, "c": 3}
    assert kendall_tau_b(x, x) == 1.0
    assert kendall_tau_b(x, {"a": 3, "b": 2, "c": 1}) == -1.0
    assert kendall_tau_b(x, {"a": 1, "b": 3, "c": 2}) == pytest.approx(1 / 3)
    assert kendall_tau_b(x, {"a": 1, "b": 1, "c": 1}) is None  # one ranking is a single tie
    assert kendall_tau_b(x, {"a": 1, "z": 2}) is None  # one shared item


def resp(rid, who, ranks, harm=None, status="submitted"):
    return Response(record_id=rid, annotator=who, status=status, ranks=ranks, harm=harm or {})


def test_report_routing_and_annotator_stats():
    responses = [
        resp("r1", "u1", {"a": 1, "b": 2, "c": 3}, {"a": [], "b": [], "c": []}),
        resp("r1", "u2", {"a": 1, "b": 2, "c": 3}, {"a": [], "b": [], "c": ["violence"]}),
        resp("r2", "u1", {"d": 1, "e": 2}, {"d": [], "e": []}),
        resp("r2", "u2", {"d": 2, "e": 1}, {"d": [], "e": []}),
        resp("r3", "u1", {"f": 1, "g": 2}),
        resp("r3", "u2", {}, status="discarded"),
    ]
    report = agreement_report(responses)
    assert report["responses_submitted"] == 5 and report["records"] == 3
    assert report["ranking"]["kendall_tau_mean"] == pytest.approx(0.0)  # r1: 1, r2: -1
    assert report["ranking"]["annotator_pairs"] == 2
    # 5 pairable units, one split: nominal values {} ×9, {violence} ×1 → D_o = 2/10, D_e = 18/90 → α = 0
    assert report["harm"]["alpha_nominal_sets"] == pytest.approx(0.0)
    assert report["harm"]["alpha_per_label"]["violence"] == pytest.approx(0.0)
    assert report["harm"]["flag_rate"] == pytest.approx(0.1)
    assert item_tau([responses[2], responses[3]]) == -1.0

    routed = route_for_review(responses, ReviewConfig(min_tau=0.0))
    assert routed["r1"]["reasons"] == ["harm_flag"] and routed["r1"]["flags"] == {"c": ["violence"]}
    assert routed["r2"]["reasons"] == ["low_agreement"] and routed["r2"]["tau"] == -1.0
    assert "r3" not in routed  # one ranking: agreement undefined, no flags
    assert set(route_for_review(responses, ReviewConfig(route_harm=False, min_tau=-1.0))) == set()

    stats = annotator_stats(responses, consensus={"r1": {"a": 1.0, "b": 0.5, "c": 0.0}})
    assert stats["u1"]["submitted"] == 3 and stats["u2"]["discarded"] == 1
    assert stats["u1"]["tau_vs_peers"] == pytest.approx(0.0)
    assert stats["u2"]["tau_vs_consensus"] == pytest.approx(1.0)
    assert stats["u2"]["harm_flag_rate"] == pytest.approx(1 / 5)


def test_review_config_validates_range():
    with pytest.raises(ValueError, match="min_tau"):
        ReviewConfig(min_tau=2.0)
