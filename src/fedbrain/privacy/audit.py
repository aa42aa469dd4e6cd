"""Privacy measured, not claimed: membership inference on a trained classifier, and the empirical
epsilon a one-run audit supports.

Membership inference (``membership_sample``, ``audit_model``): members are a seeded sample of the
partition's training rows (every hospital's train part pooled), non-members as many test rows,
class by class, so neither attack can score a difference in class mix instead of membership.
Two attacks score each image (higher = "member"):

  loss        Yeom et al. 2018: minus the cross-entropy of the true label.
  calibrated  the logit-scaled true-class confidence log(p / (1 - p)) standardised by its mean and
              spread over non-members of the same class: offline LiRA (Carlini et al. 2022) without
              shadow models, the class's non-members standing in for the "out" distribution, so
              an image is judged against how hard its class is.

TF-Privacy 0.9.0's membership-inference attack cannot be imported here: the wheel has no
``tensorflow_privacy.privacy.privacy_tests`` package, so
``import tensorflow_privacy.privacy.privacy_tests.membership_inference_attack`` fails with
``ModuleNotFoundError: No module named 'tensorflow_privacy.privacy.privacy_tests'``, and the old
path ``tensorflow_privacy.privacy.membership_inference_attack`` imports as an empty shim (a
"sources were moved" warning) whose modules re-export that missing package and fail the same way.
So the attacks are written here on scikit-learn's ROC functions.

One-run epsilon (``epsilon_lower_bound``): Steinke, Nasr & Jagielski 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbrain.dataset import Split

ATTACKS = ("loss", "calibrated")
# Metric-name suffix -> false positive rate; names without dots, which DVC reads as nesting.
FPRS = {"1pct": 0.01, "0_1pct": 0.001}
NO_MEMBERSHIP = "audit skipped: no membership information"
CLASSIFIERS_ONLY = "audit skipped: classifiers only"
_TINY = 1e-12  # floor for probabilities: a softmax saturated at 1.0 in float32 must stay finite


@dataclass
class MembershipSample:
    """Members (train rows, images loaded) and non-members (positions in evaluate's test split)."""

    members: Split
    member_rows: np.ndarray
    nonmember_positions: np.ndarray
    nonmember_rows: np.ndarray
    nonmember_ids: list[str]


def membership_sample(processed: Path, partition: Path, size: int, seed: int,
                      test: Split | None = None) -> MembershipSample | dict:
    """``size`` non-members drawn from the test split and as many members from the pooled train split,
    matched per class; when the partition cannot say who trained, the skipped audit instead
    (``{"status": NO_MEMBERSHIP, "reason": ...}``): scoring a guess would report a leak of nothing.

    ``test``: evaluate's test split, checked to be in ``splits.parquet``'s order, so its predictions
    can be reused for the non-members.
    """
    path = Path(partition) / "splits.parquet"
    if not path.is_file():
        return {"status": NO_MEMBERSHIP, "reason": f"{path} not found"}
    table = pd.read_parquet(path)
    train, held_out = table[table["split"] == "train"], table[table["split"] == "test"]
    if len(train) == 0 or len(held_out) == 0:
        return {"status": NO_MEMBERSHIP, "reason": f"{path}: {len(train)} train and {len(held_out)} test rows"}
    rng = np.random.default_rng(seed)
    test_labels, train_labels = held_out["label_index"].to_numpy(), train["label_index"].to_numpy()
    picked = np.sort(rng.choice(len(held_out), min(size, len(train), len(held_out)), replace=False))
    positions, member_index = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for label in np.unique(test_labels[picked]):
        mine, pool = picked[test_labels[picked] == label], np.flatnonzero(train_labels == label)
        n = min(len(mine), len(pool))  # a class short of train rows loses non-members too
        positions.append(mine[:n])
        member_index.append(rng.choice(pool, n, replace=False))
    positions, member_index = np.sort(np.concatenate(positions)), np.sort(np.concatenate(member_index))
    if len(positions) == 0:
        return {"status": NO_MEMBERSHIP, "reason": f"{path}: no class has both train and test rows"}
    members, nonmembers = train.iloc[member_index], held_out.iloc[positions]
    if test is not None and [test.image_ids[i] for i in positions] != nonmembers["image_id"].tolist():
        raise AssertionError(f"{path}: the test split is not in splits.parquet's order")
    # A row or an image id in both would be scored as a member and as a non-member of one model;
    # raised, not asserted, so that python -O keeps the check.
    for column in ("row", "image_id"):
        if shared := set(members[column]) & set(nonmembers[column]):
            raise AssertionError(f"{path}: {column} {sorted(shared)[:3]} both member (train) and non-member (test)")
    rows = members["row"].to_numpy(dtype=np.int64)
    images = np.asarray(np.load(Path(processed) / "images.npy", mmap_mode="r")[rows], dtype=np.float32)
    member_split = Split(images, members["label_index"].to_numpy(dtype=np.int64), None,
                         members["image_id"].tolist(), members["patient_id"].tolist())
    return MembershipSample(member_split, rows, positions, nonmembers["row"].to_numpy(dtype=np.int64),
                            nonmembers["image_id"].tolist())


def _true_class(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.asarray(proba, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]


def loss_scores(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Minus the cross-entropy of the true label."""
    return np.log(np.clip(_true_class(proba, labels), _TINY, 1.0))


def logit_confidence(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log(p_y / (1 - p_y)): Carlini et al. found it close to Gaussian, which a mean and spread describe."""
    p = _true_class(proba, labels)
    rest = np.asarray(proba, dtype=np.float64).sum(axis=1) - p
    return np.log(np.clip(p, _TINY, None)) - np.log(np.clip(rest, _TINY, None))


def _standardise(values: np.ndarray, labels: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray):
    out = np.zeros(len(values))
    for label in np.unique(labels):
        ref = reference[reference_labels == label]
        if len(ref) < 2:  # too few of this class to calibrate on: the whole reference instead
            ref = reference
        # A class every image gets the same confidence for carries no membership signal; dividing
        # float noise in its mean by a zero spread would invent one.
        if len(ref) >= 2 and ref.std() > 1e-9 * max(1.0, abs(ref.mean())):
            out[labels == label] = (values[labels == label] - ref.mean()) / ref.std()
    return out


def calibrated_scores(member_proba, member_labels, nonmember_proba, nonmember_labels, seed: int = 0):
    """(member, non-member) scores of the class-calibrated attack, cross-fitted: a non-member's own
    confidence never enters the statistics it is standardised by (that would pull it towards its
    class mean and make non-members look unlike members for no reason)."""
    members = logit_confidence(member_proba, member_labels)
    others = logit_confidence(nonmember_proba, nonmember_labels)
    nonmember_labels = np.asarray(nonmember_labels)
    order = np.random.default_rng(seed).permutation(len(others))
    a, b = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    scored = np.empty(len(others))
    scored[a] = _standardise(others[a], nonmember_labels[a], others[b], nonmember_labels[b])
    scored[b] = _standardise(others[b], nonmember_labels[b], others[a], nonmember_labels[a])
    # Members are standardised by half a, like the non-members of half b: the same kind of reference.
    return _standardise(members, np.asarray(member_labels), others[a], nonmember_labels[a]), scored


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR of an ROC point whose FPR is at most ``target`` (no interpolation up to it)."""
    return float(np.max(tpr[fpr <= target]))


def roc_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    scores = np.r_[member_scores, nonmember_scores]
    assert np.isfinite(scores).all(), "membership scores must be finite"
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)  # keep every corner for tpr_at_fpr
    return {"auc": float(roc_auc_score(truth, scores)),
            **{f"tpr_at_{name}_fpr": tpr_at_fpr(fpr, tpr, rate) for name, rate in FPRS.items()},
            "curve": {"fpr": fpr, "tpr": tpr}}


def dp_tpr_ceiling(epsilon: float, delta: float, fpr: float) -> float:
    """The highest TPR any attack can have at ``fpr`` against an (epsilon, delta)-DP training run."""
    return min(1.0, math.exp(min(epsilon, 700.0)) * fpr + delta)


def audit_model(member_proba, member_labels, nonmember_proba, nonmember_labels,
                epsilon: float | None = None, delta: float | None = None, seed: int = 0) -> dict:
    """Both attacks' AUC and TPR at each FPR in ``FPRS``, the member/non-member accuracy gap and, for
    a DP model, the TPR ceilings its (epsilon, delta) implies and whether an attack beat them."""
    member_labels, nonmember_labels = np.asarray(member_labels), np.asarray(nonmember_labels)
    scores = {"loss": (loss_scores(member_proba, member_labels), loss_scores(nonmember_proba, nonmember_labels)),
              "calibrated": calibrated_scores(member_proba, member_labels, nonmember_proba, nonmember_labels, seed)}
    attacks = {name: roc_summary(*pair) for name, pair in scores.items()}
    member_accuracy = float(np.mean(np.argmax(member_proba, axis=1) == member_labels))
    nonmember_accuracy = float(np.mean(np.argmax(nonmember_proba, axis=1) == nonmember_labels))
    out = {"status": "audited", "members": len(member_labels), "nonmembers": len(nonmember_labels),
           "member_accuracy": member_accuracy, "nonmember_accuracy": nonmember_accuracy,
           "accuracy_gap": member_accuracy - nonmember_accuracy, "attacks": attacks,
           "auc": max(a["auc"] for a in attacks.values()),
           "strongest": max(attacks, key=lambda name: attacks[name]["auc"]),
           **{f"tpr_at_{n}_fpr": max(a[f"tpr_at_{n}_fpr"] for a in attacks.values()) for n in FPRS},
           "dp_ceiling": None, "exceeds_dp_bound": None, "violations": []}
    if epsilon is not None:
        delta = 0.0 if delta is None else float(delta)
        out["dp_ceiling"] = {n: dp_tpr_ceiling(float(epsilon), delta, rate) for n, rate in FPRS.items()}
        out["violations"] = [(name, rate, attacks[name][f"tpr_at_{n}_fpr"], out["dp_ceiling"][n])
                             for n, rate in FPRS.items() for name in ATTACKS
                             if attacks[name][f"tpr_at_{n}_fpr"] > out["dp_ceiling"][n]]
        out["exceeds_dp_bound"] = bool(out["violations"])
    return out


def audit_scalars(audit: dict) -> dict:
    """Flat ``mia_*`` numbers of an audit, for metrics.json and the model's MLflow run."""
    if audit.get("status") != "audited":
        return {}
    flat = {"mia_auc": audit["auc"], "mia_accuracy_gap": audit["accuracy_gap"], "mia_members": audit["members"],
            **{f"mia_tpr_at_{n}_fpr": audit[f"tpr_at_{n}_fpr"] for n in FPRS}}
    for name, attack in audit["attacks"].items():
        flat[f"mia_{name}_auc"] = attack["auc"]
        flat.update({f"mia_{name}_tpr_at_{n}_fpr": attack[f"tpr_at_{n}_fpr"] for n in FPRS})
    if audit["dp_ceiling"] is not None:
        flat.update({f"mia_dp_tpr_ceiling_at_{n}_fpr": c for n, c in audit["dp_ceiling"].items()})
        flat["mia_exceeds_dp_bound"] = audit["exceeds_dp_bound"]
    return flat


# --------------------------------------------------------------------------- one-run epsilon

def _check_counts(m: int, k_guessed: int, correct: int, delta: float) -> None:
    if not (0 <= correct <= k_guessed <= m):
        raise ValueError(f"need 0 <= correct ({correct}) <= k_guessed ({k_guessed}) <= m ({m})")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta {delta} must be in [0, 1)")


def one_run_p_value(m: int, k_guessed: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """How likely ``correct`` or more right guesses out of ``k_guessed`` about ``m`` canaries are if
    training was (epsilon, delta)-DP: f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i, with
    f(v) = P[Binomial(k_guessed, e^eps / (1 + e^eps)) >= v] (see ``epsilon_lower_bound``)."""
    from scipy.special import expit
    from scipy.stats import binom

    _check_counts(m, k_guessed, correct, delta)
    q = float(expit(epsilon))  # a guess's accuracy under eps-DP randomized response, overflow-safe
    tail = float(binom.sf(correct - 1, k_guessed, q))
    if delta == 0.0 or correct == 0:
        return min(1.0, tail)
    i = np.arange(1, correct + 1)
    # f(v - i) - f(v) = P[v - i <= Binomial < v], summed from pmf terms: no cancellation of two tails.
    between = np.cumsum(binom.pmf(correct - i, k_guessed, q))
    return min(1.0, tail + 2.0 * m * delta * float(np.max(between / i)))


def epsilon_lower_bound(m: int, k_guessed: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The empirical epsilon of one training run: the largest epsilon that ``correct`` right guesses out
    of ``k_guessed`` (about ``m`` canaries, each included in training by a fair coin) refute at
    ``confidence``; 0 when not even epsilon 0 is refuted (e.g. chance-level guessing).

    Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023
    (arXiv:2305.08846), main theorem for (epsilon, delta)-DP: with W the number of correct guesses
    among r = ``k_guessed`` guesses, P[W >= v] <= f(v) + 2 m delta max_{i in 1..m} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]; for i > v, f(v - i) = 1, so the maximum is reached
    at some i <= v. This full approximate-DP form (not a simplified corollary) was taken from, and
    agrees with, two implementations of the paper's p-value (its reference code ``p_value_DP_audit``
    and jax_privacy.auditing._one_run_p_value), not re-derived from the paper's text: check the
    theorem's number there before quoting one. delta = 0 leaves the exact pure-DP Binomial tail.
    Found by bisection on the exact tail (scipy.stats.binom), never a normal approximation.
    """
    _check_counts(m, k_guessed, correct, delta)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    significance = 1.0 - confidence
    if k_guessed == 0 or one_run_p_value(m, k_guessed, correct, 0.0, delta) > significance:
        return 0.0
    low, high = 0.0, 1.0  # kept: p(low) <= significance < p(high)
    while one_run_p_value(m, k_guessed, correct, high, delta) <= significance:
        low, high = high, 2.0 * high  # terminates: p -> 1 as epsilon grows (q -> 1)
    while high - low > 1e-9 * max(1.0, high):
        middle = (low + high) / 2.0
        if one_run_p_value(m, k_guessed, correct, middle, delta) <= significance:
            low = middle
        else:
            high = middle
    return low
