"""Can a classifier's probabilities be taken at their word? Expected calibration error, Brier score,
reliability diagrams, and temperature scaling fitted on the validation split.

Not this project's other "calibration": the federation's BatchNorm calibration (``federated/``,
``bench/calibration.py``, ``federated.calibration_images``) measures normalisation statistics; this
module asks whether images given p = 0.9 are right nine times in ten.

Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks") divides a
classifier's logits by one T > 0 and takes the softmax again: T > 1 softens over-confident
probabilities, T < 1 sharpens timid ones. fedbrain's classifiers end in a softmax and expose no
logits, but log p is the logits minus a per-row constant (their log-sum-exp), which a softmax
ignores, so softmax(log(p) / T) is exactly softmax(logits / T). One T for every image and class
keeps each row's order, so the predicted class never changes: accuracy, F1 and the confusion
matrix are the unscaled model's.

T minimises the negative log-likelihood (NLL) of the validation split, never the test split's. In a
federation nobody holds the whole validation split: each hospital returns ``nll_by_temperature`` of
its own split over the shared grid ``TEMPERATURES``, divided by its number of images; the server's
examples-weighted average of those means is the pooled split's mean NLL (federated/task.py,
records.fitted_temperature), and ``choose_temperature`` takes the grid's argmin. With the
examples at hand, ``fit_temperature`` also refines that argmin between its grid neighbours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_BINS = 15  # equal-width confidence bins of the ECE (Guo et al.'s choice)
# Candidate temperatures, shared by every party of a federation: 4% apart, from sharpening 4x to
# softening 8x. NLL is convex in 1/T, so a grid this fine lands next to the optimum.
TEMPERATURES = np.geomspace(0.25, 8.0, 90)
_FLOOR = 1e-12  # a float32 softmax can round a probability to 0; log(0) would make it -inf


def _log_proba(proba) -> np.ndarray:
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), _FLOOR, None))


def scale(proba, temperature: float) -> np.ndarray:
    """Probabilities (n, classes) as the same model with its logits divided by ``temperature``."""
    from scipy.special import softmax

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(_log_proba(proba) / float(temperature), axis=1)


def nll_by_temperature(proba, labels, temperatures=TEMPERATURES) -> np.ndarray:
    """Summed (not mean) NLL of these examples at each candidate temperature: the sum over several
    sets of examples (hospitals) is the NLL of their union. No examples give zeros."""
    from scipy.special import log_softmax

    log_proba = _log_proba(proba)
    labels = np.asarray(labels, dtype=np.int64)
    temperatures = np.asarray(temperatures, dtype=np.float64)
    if len(labels) == 0:
        return np.zeros(len(temperatures))
    scaled = log_softmax(log_proba[None] / temperatures[:, None, None], axis=2)  # (T, n, classes)
    return -scaled[:, np.arange(len(labels)), labels].sum(axis=1)


def choose_temperature(summed_nll, temperatures=TEMPERATURES) -> float:
    """The candidate temperature with the smallest summed NLL."""
    summed = np.asarray(summed_nll, dtype=np.float64)
    if summed.shape != np.shape(temperatures):
        raise ValueError(f"{summed.shape[0] if summed.ndim else 0} NLL values for {len(temperatures)} temperatures")
    if not np.isfinite(summed).all() or np.ptp(summed) == 0:
        raise ValueError("the summed NLL is flat or not finite: no validation examples to fit a temperature on")
    return float(np.asarray(temperatures)[int(np.argmin(summed))])


def fit_temperature(proba, labels) -> float:
    """The NLL-minimising temperature of these examples: the grid's argmin, refined by a bounded
    Brent search between its neighbours (the result stays inside the grid's range)."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        raise ValueError("no examples to fit a temperature on")
    summed = nll_by_temperature(proba, labels)
    choose_temperature(summed)  # refuses a flat NLL
    best = int(np.argmin(summed))
    low, high = TEMPERATURES[max(best - 1, 0)], TEMPERATURES[min(best + 1, len(TEMPERATURES) - 1)]
    found = minimize_scalar(lambda t: nll_by_temperature(proba, labels, [t])[0], bounds=(low, high),
                            method="bounded", options={"xatol": 1e-4})
    return float(found.x)


def model_temperature(model, split, batch_size: int) -> float:
    """``fit_temperature`` of a Keras classifier's probabilities on ``split`` (its validation split:
    centralized training and evaluate for a card without one)."""
    return fit_temperature(model.predict(split.images, batch_size=batch_size, verbose=0), split.labels)


def reliability_bins(proba, labels, bins: int = N_BINS) -> dict:
    """Per equal-width bin of top-class confidence: image count, mean confidence, accuracy (NaN where empty)."""
    from scipy.stats import binned_statistic

    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.histogram(confidence, edges)[0]
    means = binned_statistic(confidence, [confidence, correct], statistic="mean", bins=edges).statistic
    return {"edges": edges, "counts": counts, "confidence": means[0], "accuracy": means[1]}


def expected_calibration_error(proba, labels, bins: int = N_BINS) -> float:
    """The image-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    table = reliability_bins(proba, labels, bins)
    filled = table["counts"] > 0
    gaps = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float(np.sum(table["counts"][filled] * gaps) / max(1, table["counts"].sum()))


def brier_score(proba, labels) -> float:
    """Multi-class Brier score: mean over images of the summed squared difference to the one-hot label
    (0 is perfect, 2 the worst; no halving, also with two classes)."""
    from sklearn.metrics import brier_score_loss

    proba = np.asarray(proba, dtype=np.float64)
    # A float32 softmax sums to 1 only within ~1e-7, outside sklearn's float64 tolerance (it warns).
    proba = proba / proba.sum(axis=1, keepdims=True)
    return float(brier_score_loss(labels, proba, labels=list(range(proba.shape[1])), scale_by_half=False))


def assess(proba, labels, temperature: float) -> dict:
    """ECE and Brier of the test probabilities as they are and scaled by ``temperature``."""
    scaled = scale(proba, temperature)
    return {"ece": expected_calibration_error(proba, labels),
            "ece_calibrated": expected_calibration_error(scaled, labels),
            "brier": brier_score(proba, labels), "brier_calibrated": brier_score(scaled, labels)}


def summary_line(run: str, temperature: float, source: str, metrics: dict) -> str:
    """One printed line: the temperature, where it came from, ECE and Brier before -> after."""
    return (f"reliability {run}: temperature {temperature:.3f} ({source}); test ECE {metrics['ece']:.4f} -> "
            f"{metrics['ece_calibrated']:.4f}, Brier {metrics['brier']:.4f} -> {metrics['brier_calibrated']:.4f}")


def plot_reliability_diagram(proba, labels, temperature: float, title: str, path: Path) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling (a calibrated model
    follows the diagonal), with the share of images in each bin beneath."""
    from fedbrain.plots import figure, save

    fig = figure(8.4, 4.8)
    axes = fig.subplots(2, 2, sharex=True, height_ratios=[3, 1])
    for column, (name, p) in enumerate((("as trained", np.asarray(proba)),
                                        (f"temperature {temperature:.2f}", scale(proba, temperature)))):
        table = reliability_bins(p, labels)
        left, width = table["edges"][:-1], np.diff(table["edges"])
        filled = table["counts"] > 0
        top, bottom = axes[0, column], axes[1, column]
        top.bar(left[filled], table["accuracy"][filled], width[filled], align="edge", color="C0",
                edgecolor="white", label="accuracy")
        # The gap to the bin's mean confidence: red above a bar where the model claims too much.
        top.bar(left[filled], table["confidence"][filled] - table["accuracy"][filled], width[filled],
                bottom=table["accuracy"][filled], align="edge", color="C3", alpha=0.35, label="gap to confidence")
        top.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{name}: ECE {expected_calibration_error(p, labels):.4f}", fontsize=9)
        top.legend(fontsize=7, loc="upper left")
        bottom.bar(left, table["counts"] / max(1, table["counts"].sum()), width, align="edge", color="grey")
        bottom.set_xlabel("confidence (top-class probability)")
        bottom.set_ylabel("share")
    fig.suptitle(f"{title}: reliability on the test split ({len(labels)} images, {N_BINS} bins)", fontsize=9)
    return save(fig, path)
