"""The tables the evaluate stage writes for `dvc metrics` and `dvc plots`, read against independent computations."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sonogen.jobs.dvc_outputs import downstream_rows, roc_rows, usefulness
from sonogen.metrics.downstream import roc_table


def test_the_roc_table_holds_each_arm_s_curve_on_one_grid_of_false_positive_rates():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 400)
    scores = {"real": rng.random((3, 400)) + 0.3 * targets, "real+synthetic": rng.random((3, 400)) + 0.8 * targets}
    rows = roc_table(targets, scores, points=2001)
    assert [row["fpr"] for row in rows[:3]] == pytest.approx([0, 0.0005, 0.001])
    for arm, values in scores.items():
        curve = np.array([row[arm] for row in rows])
        assert np.all(np.diff(curve) >= -1e-12) and curve[-1] == 1.0
        # the area under the tabled curve is the AUC of the seed-averaged scores
        area = float(np.sum((curve[1:] + curve[:-1]) / 2) / (len(rows) - 1))
        assert area == pytest.approx(roc_auc_score(targets, values.mean(0)), abs=2e-3)
    assert roc_table(np.ones(5), {"real": np.zeros((1, 5))}) == []  # one class: no curve


def test_usefulness_is_the_pooled_verdict_when_cross_validated_else_the_test_split_s_interval():
    split = {"downstream": {"metric": "auc", "auc": {"real": 0.7, "real+synthetic": 0.8, "synthetic": 0.6},
                            "auc_delta": 0.1, "auc_delta_ci95": [0.02, 0.2]}}
    assert usefulness(split) == {"usefulness": "helps", "usefulness_metric": "auc", "usefulness_delta": 0.1,
                                 "usefulness_ci_low": 0.02, "usefulness_ci_high": 0.2}
    assert usefulness({"downstream": {**split["downstream"], "auc_delta_ci95": [-0.3, -0.01]}})["usefulness"] == "hurts"
    assert [(row["arm"], row["score"]) for row in downstream_rows(split)] == [
        ("real", 0.7), ("real+synthetic", 0.8), ("synthetic", 0.6)]
    pooled = {"crossval": {"metric": "balanced_accuracy", "verdict": "copies training images", "delta": 0.05,
                           "ci_low": -0.01, "ci_high": 0.1, "balanced_accuracy": {"real": 0.5, "real+synthetic": 0.55}},
              **split}
    assert usefulness(pooled)["usefulness"] == "copies training images"
    assert usefulness(pooled)["usefulness_metric"] == "balanced_accuracy"
    assert [row["metric"] for row in downstream_rows(pooled)] == ["balanced_accuracy"] * 2
    assert usefulness({"crossval": {"verdict": "not measured", "reason": "fold 1 failed"}}) == {}
    assert usefulness({}) == {} and downstream_rows({}) == [] and roc_rows({}, None) == []
