"""reliability: ECE and Brier against known predictors, temperature scaling and its fit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from fedbrain import reliability


def _sampled(rng, logits):
    """Labels drawn from softmax(logits): a predictor that outputs exactly those probabilities is calibrated."""
    proba = softmax(logits, axis=1)
    cumulative = proba.cumsum(axis=1)
    return np.minimum((rng.random((len(proba), 1)) > cumulative).sum(axis=1), proba.shape[1] - 1)


def test_temperature_scaling_never_changes_the_predicted_class():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.full(4, 0.3), 2000).astype(np.float32)
    proba[:5] = np.eye(4)[[0, 1, 2, 3, 0]]  # rows with exact zeros: the log floor must keep their order
    for temperature in (0.25, 0.5, 0.9, 1.0, 1.7, 4.0, 8.0):
        scaled = reliability.scale(proba, temperature)
        assert np.array_equal(scaled.argmax(axis=1), proba.argmax(axis=1)), temperature
        assert scaled.sum(axis=1) == pytest.approx(np.ones(len(proba)))
    assert reliability.scale(proba, 1.0) == pytest.approx(proba, abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        reliability.scale(proba, 0.0)


def test_ece_is_near_zero_when_calibrated_and_clearly_above_when_over_confident():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, (20000, 4))
    labels = _sampled(rng, logits)
    calibrated = reliability.expected_calibration_error(softmax(logits, axis=1), labels)
    over_confident = reliability.expected_calibration_error(softmax(3 * logits, axis=1), labels)
    assert calibrated < 0.01
    assert over_confident > 0.1


def test_ece_agrees_with_tensorflow_probability():
    import tensorflow_probability as tfp

    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 3.0, (3000, 4)).astype(np.float32)  # tfp bins in float32
    labels = _sampled(rng, logits / 2).astype(np.int32)
    expected = float(tfp.stats.expected_calibration_error(reliability.N_BINS, logits=logits, labels_true=labels))
    assert reliability.expected_calibration_error(softmax(logits, axis=1), labels) == pytest.approx(expected, abs=1e-6)


def test_brier_score_by_hand():
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    labels = np.array([0, 2])
    by_hand = ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.2 ** 2 + 0.5 ** 2 + 0.7 ** 2)) / 2
    assert reliability.brier_score(proba, labels) == pytest.approx(by_hand)
    # Two classes: the same sum over both columns, not sklearn's binary half of it.
    assert reliability.brier_score(np.array([[0.8, 0.2]]), np.array([1])) == pytest.approx(0.8 ** 2 * 2)


def test_summed_nll_of_two_halves_is_the_nll_of_the_whole():
    rng = np.random.default_rng(3)
    proba, labels = rng.dirichlet(np.ones(4), 500), rng.integers(0, 4, 500)
    whole = reliability.nll_by_temperature(proba, labels)
    halves = (reliability.nll_by_temperature(proba[:200], labels[:200])
              + reliability.nll_by_temperature(proba[200:], labels[200:]))
    assert whole.shape == reliability.TEMPERATURES.shape
    assert halves == pytest.approx(whole)
    assert reliability.nll_by_temperature(proba[:0], labels[:0]) == pytest.approx(np.zeros_like(whole))
    with pytest.raises(ValueError, match="no validation examples"):
        reliability.choose_temperature(np.zeros_like(whole))


@pytest.mark.parametrize("true_temperature", [0.6, 2.5])
def test_a_known_temperature_is_recovered(true_temperature):
    """Labels drawn from softmax(z): the model that says softmax(z * T0) has temperature T0 to undo."""
    rng = np.random.default_rng(4)
    logits = rng.normal(0.0, 1.5, (20000, 4))
    labels = _sampled(rng, logits)
    proba = softmax(logits * true_temperature, axis=1)
    # As a federation would: two hospitals' NLL grids, summed by the server.
    summed = (reliability.nll_by_temperature(proba[:7000], labels[:7000])
              + reliability.nll_by_temperature(proba[7000:], labels[7000:]))
    assert reliability.choose_temperature(summed) == pytest.approx(true_temperature, rel=0.05)
    fitted = reliability.fit_temperature(proba, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    assert reliability.expected_calibration_error(reliability.scale(proba, fitted), labels) < 0.015


def test_assess_and_the_reliability_diagram(tmp_path):
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 2.0, (2000, 4))
    labels = _sampled(rng, logits)
    proba = softmax(2 * logits, axis=1)
    scores = reliability.assess(proba, labels, 2.0)
    assert scores["ece_calibrated"] < scores["ece"] and scores["brier_calibrated"] < scores["brier"]
    path = reliability.plot_reliability_diagram(proba, labels, 2.0, "test", tmp_path / "plots" / "reliability.png")
    assert path.stat().st_size > 1000
