"""IR metrics and statistics against values computed by hand."""

import math

import numpy as np
import pytest

from embedforge.evaluate import ir_metrics, paired_bootstrap, randomization_p_value, verdict


def test_binary_metrics_by_hand():
    # q1: relevant d1, d3; ranking d2 d1 d3 -> hits at ranks 2 and 3.
    # q2: relevant d9 (not retrieved at all).
    ranked = {"q1": ["d2", "d1", "d3", "d4"], "q2": ["d1", "d2"]}
    qrels = {"q1": {"d1": 1, "d3": 1}, "q2": {"d9": 1}}
    metrics = ir_metrics(ranked, qrels)
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert metrics["ndcg@10"]["q1"] == pytest.approx(dcg / idcg)
    assert metrics["ndcg@1"]["q1"] == 0.0
    assert metrics["recall@1"]["q1"] == 0.0
    assert metrics["recall@5"]["q1"] == 1.0
    assert metrics["mrr@10"]["q1"] == pytest.approx(0.5)
    assert metrics["map@100"]["q1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert all(metrics[name]["q2"] == 0.0 for name in metrics)


def test_graded_ndcg_uses_grades_as_gains():
    ranked = {"q": ["a", "b", "c"]}
    qrels = {"q": {"a": 1, "b": 2}}
    graded = ir_metrics(ranked, qrels, graded=True)["ndcg@10"]["q"]
    binary = ir_metrics(ranked, qrels)["ndcg@10"]["q"]
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert graded == pytest.approx(expected)
    assert binary == pytest.approx(1.0)  # both relevant at the top two ranks


def test_bootstrap_interval_covers_known_difference():
    rng = np.random.default_rng(1)
    differences = 0.05 + rng.normal(0, 0.1, size=400)
    low, high = paired_bootstrap(differences, resamples=2000, seed=0)
    assert low < 0.05 < high
    assert low > 0  # a real improvement of this size over 400 queries is significant
    assert verdict(low, high) == "better"
    assert randomization_p_value(differences, resamples=2000) < 0.01


def test_no_difference_is_not_significant():
    rng = np.random.default_rng(2)
    differences = rng.normal(0, 0.1, size=200)
    low, high = paired_bootstrap(differences, resamples=2000, seed=0)
    assert low < 0 < high
    assert verdict(low, high) == "no significant difference"
    assert randomization_p_value(np.zeros(10)) == 1.0
    assert verdict(-0.2, -0.1) == "worse"
