"""The membership-inference audit and the one-run epsilon bound.

Named test_membership_audit.py, not test_audit.py: tests/secure/test_audit.py exists and, without
__init__.py files, pytest imports both as module ``test_audit`` and stops the whole run with
"import file mismatch".
"""

from __future__ import annotations

import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq

from helpers import one_run_p_value_by_hand

from fedbrain.privacy.audit import (CLASSIFIERS_ONLY, NO_MEMBERSHIP, audit_model, dp_tpr_ceiling,
                                    epsilon_lower_bound, membership_sample, one_run_p_value, roc_summary,
                                    tpr_at_fpr)

SIZE, CLASSES = 16, ["glioma", "meningioma", "notumor", "pituitary"]
PER_CLASS = {"train": 24, "val": 2, "test": 12}


def noise_dataset(root, seed: int = 0):
    """Pure-noise images with labels dealt per class: a model can only learn them by memorising."""
    rng = np.random.default_rng(seed)
    parts = [(split, k) for split, n in PER_CLASS.items() for k in range(len(CLASSES)) for _ in range(n)]
    n = len(parts)
    splits, labels = [p[0] for p in parts], np.array([p[1] for p in parts])
    processed, partition = root / "processed", root / "partition"
    processed.mkdir(parents=True)
    partition.mkdir(parents=True)
    np.save(processed / "images.npy", rng.uniform(0, 1, (n, SIZE, SIZE, 1)).astype(np.float32))
    index = pd.DataFrame({"row": np.arange(n), "image_id": [f"img{i:03d}" for i in range(n)], "patient_id": None,
                          "label": [CLASSES[k] for k in labels], "label_index": labels})
    index.to_parquet(processed / "index.parquet")
    (processed / "classes.json").write_text(json.dumps({"classes": CLASSES, "has_masks": False, "channels": 1,
                                                        "size": SIZE}))
    hospital = np.where(np.array(splits) == "test", -1, np.arange(n) % 2)
    index.assign(site=None, split=splits, hospital=hospital).to_parquet(partition / "splits.parquet")
    return processed, partition


def overfit_model(processed, partition):
    import tensorflow as tf

    from fedbrain.dataset import load_split

    train = load_split(processed, partition, "train")
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((SIZE, SIZE, 1)), tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(128, activation="relu"),
                                 tf.keras.layers.Dense(len(CLASSES), activation="softmax")])
    model.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(train.images, train.labels, batch_size=len(train), epochs=150, verbose=0)  # no augmentation
    return model


def constant_model():
    """Outputs that ignore the input: the same softmax for every image."""
    import tensorflow as tf

    bias = tf.keras.initializers.Constant([0.5, 0.1, -0.2, 0.3])
    return tf.keras.Sequential([tf.keras.Input((SIZE, SIZE, 1)), tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(len(CLASSES), activation="softmax", kernel_initializer="zeros",
                                                      bias_initializer=bias)])


def params(tmp_path):
    return {"evaluate": {"batch_size": 64, "log_mlflow": False, "audit": {"members": 1000, "seed": 0}},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "fedbrain-test"}}


def null_auc_sigma(n_members: int, n_nonmembers: int) -> float:
    """The AUC's standard deviation when members and non-members score alike (Mann-Whitney)."""
    return math.sqrt((n_members + n_nonmembers + 1) / (12 * n_members * n_nonmembers))


def test_evaluate_audits_every_classifier_and_flags_a_dp_claim_the_attack_beats(tmp_path, capsys):
    from fedbrain.evaluate import MIA_COLUMNS
    from fedbrain.evaluate import run as evaluate
    from fedbrain.train import save_model

    processed, partition = noise_dataset(tmp_path)
    models = tmp_path / "models"
    overfit = overfit_model(processed, partition)
    save_model(overfit, models / "centralized" / "classifier.keras",
               {"task": "classification", "model": "mlp", "training": "centralized", "privacy": "none",
                "epsilon": None, "run_id": None})
    # The same memorising weights under a fabricated DP card: epsilon 0.01 allows a TPR of ~1% at 1% FPR.
    save_model(overfit, models / "federated" / "dp" / "classifier.keras",
               {"task": "classification", "model": "mlp", "training": "federated", "privacy": "example",
                "epsilon": 0.01, "delta": 1e-5, "run_id": None})
    save_model(constant_model(), models / "federated" / "fedavg" / "classifier.keras",
               {"task": "classification", "model": "constant", "training": "federated", "privacy": "none",
                "epsilon": None, "run_id": None})

    started = time.perf_counter()
    table = evaluate(params(tmp_path), processed, partition, models, tmp_path / "reports").set_index("run")
    seconds = time.perf_counter() - started
    out = capsys.readouterr().out
    with capsys.disabled():  # the audit's lines and its share of the time, for a human reading the run
        print("\n" + "\n".join(line for line in out.splitlines() if "membership audit" in line),
              f"\nevaluate with the audit: {seconds:.2f} s")

    central, dp, constant = (table.loc[f"{r}/classifier"] for r in ("centralized", "federated/dp", "federated/fedavg"))
    assert set(MIA_COLUMNS) <= set(table.columns)
    assert (central["mia_status"], dp["mia_status"], constant["mia_status"]) == ("audited",) * 3
    assert central["mia_loss_auc"] > 0.8 and central["mia_auc"] >= central["mia_loss_auc"]
    assert central["mia_accuracy_gap"] > 0.5  # memorised train, chance on test
    n = 4 * PER_CLASS["test"]  # every test image: fewer than evaluate.audit.members
    assert abs(constant["mia_auc"] - 0.5) <= 3 * null_auc_sigma(n, n)
    assert abs(constant["mia_loss_auc"] - 0.5) <= 3 * null_auc_sigma(n, n)

    assert dp["mia_exceeds_dp_bound"] is True or dp["mia_exceeds_dp_bound"] == 1
    assert pd.isna(central["mia_exceeds_dp_bound"])  # no DP claim to hold it against
    warnings = [line for line in out.splitlines() if line.startswith("WARNING: membership audit")]
    assert warnings and all("federated/dp/classifier" in line for line in warnings)
    assert "DP ceiling 0.0101" in out  # beside the TPR at 1% FPR: e^0.01 * 0.01 + 1e-5

    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["centralized/classifier"]["mia_auc"] == pytest.approx(central["mia_auc"])
    assert metrics["federated/dp/classifier"]["mia_exceeds_dp_bound"] is True
    assert {"mia_loss_auc", "mia_calibrated_auc", "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr",
            "mia_members"} <= set(metrics["centralized/classifier"])
    detail = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    assert detail["federated/dp/classifier"]["membership_audit"]["dp_ceiling"]["1pct"] == pytest.approx(
        math.exp(0.01) * 0.01 + 1e-5)
    assert (tmp_path / "reports" / "plots" / "membership_roc.png").stat().st_size > 1000
    assert "membership audit: " in out and " s of evaluate's " in out


def test_members_and_nonmembers_never_overlap(tmp_path):
    from fedbrain.dataset import load_split

    processed, partition = noise_dataset(tmp_path)
    test = load_split(processed, partition, "test")
    sample = membership_sample(processed, partition, 20, seed=3, test=test)
    splits = pd.read_parquet(partition / "splits.parquet").set_index("row")
    assert len(sample.member_rows) == len(sample.nonmember_rows) <= 20
    assert not set(sample.member_rows) & set(sample.nonmember_rows)
    assert not set(sample.members.image_ids) & set(sample.nonmember_ids)
    assert set(splits.loc[sample.member_rows, "split"]) == {"train"}
    assert set(splits.loc[sample.nonmember_rows, "split"]) == {"test"}
    # Positions index evaluate's test split, whose predictions the audit reuses.
    assert [test.image_ids[i] for i in sample.nonmember_positions] == sample.nonmember_ids
    # Class by class, so class mix is not what the attacks detect.
    assert sorted(sample.members.labels) == sorted(test.labels[sample.nonmember_positions])
    again = membership_sample(processed, partition, 20, seed=3)
    assert list(again.member_rows) == list(sample.member_rows)

    # A partition that lists one image as both train and test is refused, not scored.
    table = pd.read_parquet(partition / "splits.parquet")
    first_test = table.index[table["split"] == "test"][0]
    table.loc[table["split"] == "train", "image_id"] = table.loc[first_test, "image_id"]
    table.to_parquet(partition / "splits.parquet")
    with pytest.raises(AssertionError, match="image_id"):
        membership_sample(processed, partition, 1000, seed=0)


def test_no_membership_information_skips_the_audit(tmp_path, capsys):
    from fedbrain.evaluate import run as evaluate
    from fedbrain.train import save_model

    processed, partition = noise_dataset(tmp_path)
    save_model(constant_model(), tmp_path / "models" / "centralized" / "classifier.keras",
               {"task": "classification", "model": "constant", "training": "centralized", "run_id": None})
    # Only the test rows kept: evaluate still has its test split, the audit no train rows.
    table = pd.read_parquet(partition / "splits.parquet")
    table[table["split"] == "test"].to_parquet(partition / "splits.parquet")
    result = evaluate(params(tmp_path), processed, partition, tmp_path / "models", tmp_path / "reports")
    assert result["mia_status"].tolist() == [NO_MEMBERSHIP]
    assert result["mia_auc"].isna().all()
    assert f"membership audit centralized/classifier: {NO_MEMBERSHIP}" in capsys.readouterr().out
    assert "mia_auc" not in json.loads((tmp_path / "reports" / "metrics.json").read_text())["centralized/classifier"]

    (partition / "splits.parquet").unlink()
    assert membership_sample(processed, partition, 1000, seed=0)["status"] == NO_MEMBERSHIP
    assert CLASSIFIERS_ONLY == "audit skipped: classifiers only"


# --------------------------------------------------------------------------- attacks by hand

def test_auc_and_tpr_at_fpr_by_hand():
    members, nonmembers = np.array([5.0, 4.0, 3.0, 1.0]), np.array([4.5, 2.0, 0.0, -1.0])
    summary = roc_summary(members, nonmembers)
    # Member-above-non-member pairs: 4 + 3 + 3 + 2 of 16.
    assert summary["auc"] == pytest.approx(12 / 16)
    fpr, tpr = summary["curve"]["fpr"], summary["curve"]["tpr"]
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.25  # only 5.0 beats every non-member
    assert tpr_at_fpr(fpr, tpr, 0.2) == 0.25  # no ROC point between 0 and 1/4: never interpolated up
    assert tpr_at_fpr(fpr, tpr, 0.25) == 0.75  # 5, 4 and 3 above the threshold that lets 4.5 through
    assert summary["tpr_at_1pct_fpr"] == summary["tpr_at_0_1pct_fpr"] == 0.25
    assert dp_tpr_ceiling(1.0, 1e-5, 0.01) == pytest.approx(math.e * 0.01 + 1e-5)
    assert dp_tpr_ceiling(8.0, 1e-5, 0.01) == 1.0


def test_class_calibration_removes_class_difficulty():
    """Class 0 easy, class 1 hard; members a little more confident within each class. The loss
    attack mixes the classes' confidence levels; the calibrated attack compares within a class."""
    rng = np.random.default_rng(0)
    n = 2000
    labels = np.repeat([0, 1], n // 2)
    centre = np.where(labels == 0, 5.0, -3.0)

    def proba(shift):
        p = 1 / (1 + np.exp(-(centre + shift + rng.normal(size=n))))  # logit-scaled confidence ~ normal
        return np.where(labels[:, None] == 0, np.c_[p, 1 - p], np.c_[1 - p, p])

    audit = audit_model(proba(1.0), labels, proba(0.0), labels, seed=0)
    within = 0.76  # P[N(1, 2) > 0]: the separation inside one class
    assert audit["attacks"]["calibrated"]["auc"] == pytest.approx(within, abs=0.03)
    assert audit["attacks"]["loss"]["auc"] < within - 0.08
    assert audit["strongest"] == "calibrated" and audit["auc"] == audit["attacks"]["calibrated"]["auc"]
    assert audit["dp_ceiling"] is None and audit["exceeds_dp_bound"] is None


# --------------------------------------------------------------------------- one-run epsilon

@pytest.mark.parametrize("m,k,v,delta", [(200, 100, 90, 0.0), (200, 100, 90, 1e-5), (100, 50, 45, 1e-3),
                                         (400, 150, 120, 1e-6), (60, 30, 22, 0.0)])
def test_epsilon_lower_bound_matches_an_independent_computation(m, k, v, delta):
    significance = 0.05
    for epsilon in (0.0, 0.5, 2.0):
        assert one_run_p_value(m, k, v, epsilon, delta) == pytest.approx(one_run_p_value_by_hand(m, k, v, epsilon, delta),
                                                                         rel=1e-9, abs=1e-14)
    found = epsilon_lower_bound(m, k, v, delta, confidence=1 - significance)
    expected = brentq(lambda e: one_run_p_value_by_hand(m, k, v, e, delta) - significance, 0.0, 20.0, xtol=1e-10)
    assert found == pytest.approx(expected, abs=1e-6)
    assert one_run_p_value_by_hand(m, k, v, found, delta) <= significance + 1e-9  # still refuted at the value returned


def test_perfect_guessing_has_the_closed_form_bound_and_caps_every_other():
    k, significance = 100, 0.05
    # P[all k right] = q^k under pure DP: the bound is the epsilon with q^k = significance.
    q = significance ** (1 / k)
    assert epsilon_lower_bound(1000, k, k, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    bounds = [epsilon_lower_bound(1000, k, v, 1e-5) for v in range(k + 1)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))  # monotone in correct
    assert max(bounds) == bounds[-1] > 0
    assert epsilon_lower_bound(1000, k, k, 1e-5) <= epsilon_lower_bound(1000, k, k, 0.0)  # delta only helps DP


def test_chance_level_guessing_refutes_nothing():
    for k in (10, 100, 1000):
        assert epsilon_lower_bound(2 * k, k, k // 2, 1e-5) == 0.0
        assert epsilon_lower_bound(2 * k, k, k // 2 + 1, 0.0) == 0.0
    assert epsilon_lower_bound(100, 0, 0, 1e-5) == 0.0
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 20, 5, 1e-5)  # more guesses than canaries
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 6, 1e-5)
