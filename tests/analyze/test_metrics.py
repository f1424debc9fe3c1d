"""Clustering and retrieval metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from cellmi.analyze.metrics import (
    average_precision,
    cluster_scores,
    confusion,
    field_folds,
    mean_average_precision,
    nn_accuracy,
    probe_accuracy,
    purity,
)


def test_purity_and_confusion_by_hand():
    truth = ["a", "a", "b", "b"]
    pred = [0, 0, 0, 1]
    assert purity(truth, pred) == pytest.approx(3 / 4)
    table = confusion(truth, pred)
    assert (
        table.loc[0, "a"] == 2
        and table.loc[0, "b"] == 1
        and table.loc[1, "b"] == 1
        and table.loc[1, "a"] == 0
    )


def test_cluster_scores_perfect_relabelling_and_degenerate_truth():
    scores = cluster_scores(["x", "x", "y", "y", "z"], [5, 5, 1, 1, 9])
    assert scores == {"ari": pytest.approx(1.0), "nmi": pytest.approx(1.0), "purity": pytest.approx(1.0)}
    # everything in one cluster: ARI 0, purity = largest group share
    lumped = cluster_scores(["x", "x", "y", "y"], [0, 0, 0, 0])
    assert lumped["ari"] == pytest.approx(0.0) and lumped["purity"] == pytest.approx(0.5)
    assert cluster_scores(["x", "x"], [0, 1])["ari"] is None  # one true group: nothing to score


def _unit(degrees):
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_average_precision_by_hand():
    # angles 0, 25 (group A) and 10, 90 (group B); rankings worked out by hand:
    # q0: 10(B) 25(A) 90(B) -> AP 1/2; q1: 10(B) 0(A) 90(B) -> 1/2
    # q2: 0(A) 25(A) 90(B) -> 1/3;     q3: 25(A) 10(B) 0(A) -> 1/2
    x = _unit([0, 25, 10, 90]) * np.array([[1.0], [3.0], [0.5], [2.0]])  # cosine ignores length
    groups = ["A", "A", "B", "B"]
    np.testing.assert_allclose(average_precision(x, groups), [0.5, 0.5, 1 / 3, 0.5])
    assert mean_average_precision(x, groups) == pytest.approx((0.5 + (1 / 3 + 0.5) / 2) / 2)
    assert nn_accuracy(x, groups) == pytest.approx(0.0)


def test_retrieval_perfect_and_singletons():
    x = _unit([0, 5, 90, 95, 180])
    groups = ["A", "A", "B", "B", "C"]  # C has no partner: left out of both scores
    assert nn_accuracy(x, groups) == pytest.approx(1.0)
    assert mean_average_precision(x, groups) == pytest.approx(1.0)
    assert np.isnan(average_precision(x, groups)[4])
    assert mean_average_precision(_unit([0, 90]), ["A", "B"]) is None


def test_average_precision_matches_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5))
    groups = rng.integers(0, 4, size=30)
    ours = average_precision(x, groups)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(30):
        others = np.delete(np.arange(30), i)
        expected = average_precision_score(groups[others] == groups[i], unit[others] @ unit[i])
        assert ours[i] == pytest.approx(expected)


def test_field_folds_hold_out_some_fields_of_every_sample():
    samples = ["a"] * 4 + ["b"] * 6  # a: fields 1, 2 (two windows each); b: fields 1, 2, 3
    fields = ["1", "1", "2", "2", "1", "1", "2", "2", "3", "3"]
    folds = field_folds(samples, fields)
    np.testing.assert_array_equal(folds, [0, 0, 1, 1, 0, 0, 1, 1, 0, 0])  # b's third field wraps to fold 0
    assert set(folds[:4]) == set(folds[4:]) == {0, 1}


def _windows(rng: np.random.Generator, apart: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 samples x 4 fields x 20 windows of 16 features; sample means ``apart`` standard deviations apart."""
    samples = np.repeat(["a", "b", "c"], 80)
    fields = np.tile(np.repeat(["1", "2", "3", "4"], 20), 3)
    centres = rng.normal(size=(3, 16)) * apart
    x = centres[np.repeat([0, 1, 2], 80)] + rng.normal(size=(240, 16))
    return x, samples, fields


def test_probe_names_separated_samples_and_not_noise():
    rng = np.random.default_rng(0)
    assert probe_accuracy(*_windows(rng, apart=5.0)) == pytest.approx(1.0)
    chance = probe_accuracy(*_windows(rng, apart=0.0))
    assert 0.15 < chance < 0.55  # three samples: about a third


def test_probe_is_tested_on_fields_it_was_not_trained_on():
    """Each field its own offset, shared by none: a probe that saw the field would name its sample
    from the offset; held-out fields leave it at chance."""
    rng = np.random.default_rng(1)
    x, samples, fields = _windows(rng, apart=0.0)
    offsets = rng.normal(size=(12, 16)) * 6.0
    x = x + offsets[np.repeat(np.arange(12), 20)]
    assert probe_accuracy(x, samples, fields) < 0.6


def test_probe_needs_two_samples_and_two_fields():
    x = np.zeros((8, 4))
    assert probe_accuracy(x, ["a"] * 8, ["1", "2"] * 4) is None
    assert probe_accuracy(x, ["a"] * 4 + ["b"] * 4, ["1"] * 8) is None  # one field each: nothing to hold out
