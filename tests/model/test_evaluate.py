"""evaluate: metrics against hand-computed values, and the stage's files and MLflow logging."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from fedbrain import tracking
from fedbrain.evaluate import (IN_EVALUATE, MIA_COLUMNS, RELIABILITY_COLUMNS, classification_metrics, dice_hd95,
                               segmentation_metrics)
from fedbrain.evaluate import run as evaluate
from fedbrain.models import build_model
from fedbrain.plots import _run_label
from fedbrain.privacy.audit import CLASSIFIERS_ONLY
from fedbrain.train import save_model


def test_classification_metrics_by_hand_with_a_class_missing_from_the_test_set():
    # Three classes; "c" has no test example but is predicted once (sample 3).
    y_true = np.array([0, 0, 1, 1])
    proba = np.array([[0.7, 0.2, 0.1],   # a -> a
                      [0.2, 0.5, 0.3],   # a -> b
                      [0.1, 0.8, 0.1],   # b -> b
                      [0.3, 0.3, 0.4]])  # b -> c
    m = classification_metrics(y_true, proba, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2,
                                                 "roc_auc": 0.75})
    assert m["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2,
                                                 "roc_auc": 0.75})
    # The absent class: no AUC (no positives), and it counts in the macro average only because it
    # was predicted (precision 0).
    assert m["per_class"]["c"]["roc_auc"] is None and m["per_class"]["c"]["support"] == 0
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert m["roc_auc"] == pytest.approx(0.75) and m["roc_auc_classes"] == 2
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]


def test_macro_average_skips_a_class_neither_present_nor_predicted():
    m = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]]), ["a", "b", "c"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == pytest.approx(1.0)


def _square(mask, y, x, h, w):
    mask[y:y + h, x:x + w] = 1
    return mask


def test_dice_hd95_empty_cases_are_explicit():
    empty, dot = np.zeros((8, 8)), _square(np.zeros((8, 8)), 2, 2, 1, 1)
    assert dice_hd95(empty, empty) == (1.0, 0.0)
    assert dice_hd95(dot, empty) == (0.0, None)
    assert dice_hd95(empty, dot) == (0.0, None)


def test_segmentation_metrics_by_hand():
    z = lambda: np.zeros((8, 8))  # noqa: E731
    truth, pred, patients = [], [], []

    def add(patient, t, p):
        truth.append(t), pred.append(p), patients.append(patient)

    add("A", _square(z(), 1, 1, 2, 2), _square(z(), 1, 1, 2, 2))  # perfect
    add("A", z(), z())                                           # both empty
    add("B", _square(z(), 2, 2, 1, 1), _square(z(), 2, 5, 1, 1))  # 3 px apart: Dice 0, HD95 3
    add("C", _square(z(), 2, 2, 2, 2), z())                      # missed
    add(None, z(), _square(z(), 4, 4, 1, 1))                     # false positive, no patient id
    add("E", _square(z(), 3, 3, 2, 2), _square(z(), 3, 3, 1, 2))  # Dice 2*2/(4+2), HD95 1
    masks = np.stack(truth)[..., None].astype(np.uint8)
    proba = np.stack(pred)[..., None] * 0.9
    m = segmentation_metrics(masks, proba, patients, [f"i{k}" for k in range(6)], threshold=0.5)
    per = m["per_patient"]
    assert set(per) == {"A", "B", "C", "i4", "E"}
    assert (per["A"]["dice"], per["A"]["hd95"], per["A"]["slices"]) == (1.0, 0.0, 2)
    assert (per["B"]["dice"], per["B"]["hd95"]) == (0.0, pytest.approx(3.0))
    assert (per["C"]["dice"], per["C"]["hd95"]) == (0.0, None)
    assert (per["i4"]["dice"], per["i4"]["hd95"]) == (0.0, None)
    assert per["E"]["dice"] == pytest.approx(2 / 3) and per["E"]["hd95"] == pytest.approx(1.0)
    assert m["dice"] == pytest.approx((1 + 0 + 0 + 0 + 2 / 3) / 5)
    assert m["hd95"] == pytest.approx((0 + 3 + 1) / 3)
    assert m["dice_tumour_slices"] == pytest.approx((1 + 0 + 0 + 2 / 3) / 4)
    assert m["hd95_tumour_slices"] == pytest.approx((0 + 3 + 1) / 3)
    assert (m["tumour_slices"], m["missed_tumour_slices"], m["false_positive_slices"]) == (4, 1, 1)


def test_evaluate_stage_finds_centralized_and_federated_models(segmentation_data, tiny_params, tmp_path):
    processed, partition = segmentation_data
    models, out = tmp_path / "models", tmp_path / "reports"
    with tracking.start_run(tiny_params, "centralized-classifier", {"training": "centralized"}) as active:
        run_id = active.info.run_id
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.4, 0.6], "val_accuracy": [0.3, 0.5]}
    save_model(build_model("cnn", (32, 32, 3), 2), models / "centralized" / "classifier.keras",
               {"task": "classification", "model": "cnn", "training": "centralized", "privacy": "none",
                "classes": ["no_tumor", "tumor"], "run_id": run_id, "history": history, "temperature": 1.5})
    save_model(build_model("unet", (32, 32, 3), 2), models / "centralized" / "segmenter.keras",
               {"task": "segmentation", "model": "unet", "training": "centralized", "run_id": None})
    # A federated variant written by someone else, without a card: inferred from its path.
    (models / "federated" / "dp").mkdir(parents=True)
    build_model("cnn", (32, 32, 3), 2).save(models / "federated" / "dp" / "classifier.keras")

    table = evaluate(tiny_params, processed, partition, models, out)
    assert list(table["run"]) == ["centralized/classifier", "centralized/segmenter", "federated/dp/classifier"]
    fed = table.set_index("run").loc["federated/dp/classifier"]
    assert (fed["training"], fed["privacy"], fed["task"]) == ("federated", "dp", "classification")

    metrics = json.loads((out / "metrics.json").read_text())
    cls = metrics["centralized/classifier"]
    assert 0.0 <= cls["test_accuracy"] <= 1.0 and "test_macro_f1" in cls and "test_roc_auc" in cls
    assert {"test_dice", "test_dice_tumour_slices"} <= set(metrics["centralized/segmenter"])
    # The DVC metrics: one headline file per run, a few of metrics.json's figures each.
    headlines = {p.relative_to(out / "headline").with_suffix("").as_posix(): json.loads(p.read_text())
                 for p in (out / "headline").rglob("*.json")}
    assert set(headlines) == set(metrics)
    assert headlines["centralized/classifier"] == {k: cls[k] for k in ("test_accuracy", "test_macro_f1", "test_roc_auc",
                                                                        "test_ece_calibrated", "mia_auc")}
    assert set(headlines["centralized/segmenter"]) <= {"test_dice", "test_dice_tumour_slices", "test_hd95",
                                                      "test_dice_native_mean"}
    assert "test_dice" in headlines["centralized/segmenter"]
    csv = pd.read_csv(out / "comparison.csv")
    assert {"run", "training", "model", "privacy", "accuracy", "macro_f1", "dice", "hd95", "epsilon"} <= set(csv)
    # The membership audit: every classifier attacked, the segmenter skipped with its reason.
    assert set(MIA_COLUMNS) <= set(csv)
    status = csv.set_index("run")["mia_status"]
    assert status["centralized/segmenter"] == CLASSIFIERS_ONLY
    assert status["centralized/classifier"] == status["federated/dp/classifier"] == "audited"
    assert 0.0 <= cls["mia_auc"] <= 1.0 and "mia_auc" not in metrics["centralized/segmenter"]
    assert (out / "plots" / "membership_roc.png").stat().st_size > 1000
    assert len(csv) == 3 and "federated/dp/classifier" in (out / "comparison.md").read_text()
    for name in ("centralized/classifier/confusion_matrix.png", "centralized/classifier/roc.png",
                 "centralized/classifier/training_curves.png", "centralized/segmenter/overlays.png",
                 "centralized/classifier/reliability.png", "centralized/classifier/explanations.png",
                 "federated/dp/classifier/reliability.png", "federated/dp/classifier/explanations.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    # Reliability: the card's temperature, or one fitted on the validation split for a card without it.
    assert set(RELIABILITY_COLUMNS) <= set(csv)
    reliability = csv.set_index("run")[RELIABILITY_COLUMNS]
    assert tuple(reliability.loc["centralized/classifier", ["temperature", "temperature_source"]]) == (1.5, "card")
    assert reliability.loc["federated/dp/classifier", "temperature_source"] == IN_EVALUATE
    assert reliability.loc["centralized/segmenter"].isna().all()
    assert cls["temperature"] == 1.5 and 0.0 <= cls["test_ece_calibrated"] <= 1.0 and 0.0 <= cls["test_brier"] <= 2.0
    assert {"test_ece", "test_brier", "test_brier_calibrated"} <= set(cls)
    assert "temperature" in metrics["federated/dp/classifier"]
    assert not {"test_ece", "temperature"} & set(metrics["centralized/segmenter"])
    # Validation curves as DVC data plots, one per model with a history (the fixture gives only the
    # centralized classifier one).
    assert sorted(p.relative_to(out / "curves").as_posix() for p in (out / "curves").rglob("*.csv")) == [
        "classification/centralized_classifier.csv"]
    detail = json.loads((out / "evaluation.json").read_text())
    assert len(detail["centralized/segmenter"]["metrics"]["per_patient"]) > 0

    # Test metrics and plots land in the classifier's own training run.
    mlflow.set_tracking_uri(tiny_params["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(cls["test_accuracy"])
    assert run.data.metrics["mia_auc"] == pytest.approx(cls["mia_auc"])
    assert run.data.metrics["test_ece_calibrated"] == pytest.approx(cls["test_ece_calibrated"])
    assert run.data.metrics["temperature"] == 1.5
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/metrics.json", "evaluation/membership_roc.png",
            "evaluation/reliability.png", "evaluation/explanations.png"} <= artifacts
    # Models without a known run get an evaluation run of their own, tagged like a training run.
    runs = mlflow.search_runs(experiment_names=["fedbrain-test"], filter_string="tags.training = 'federated'")
    assert len(runs) == 1 and runs["tags.privacy"].iloc[0] == "dp"
    # Every model is a registered version, the best of this evaluation the champion.
    champion = client.get_model_version_by_alias("fedbrain-classifier", "champion")
    best = max(("centralized/classifier", "federated/dp/classifier"), key=lambda r: metrics[r]["test_macro_f1"])
    assert champion.tags["variant"] == best.rsplit("/", 1)[0]
    assert len(client.search_model_versions("name = 'fedbrain-classifier'")) == 2
    assert client.get_model_version_by_alias("fedbrain-segmenter", "champion").tags["variant"] == "centralized"


def test_discover_skips_per_round_checkpoints(tmp_path):
    from fedbrain.evaluate import discover

    for relative in ("centralized/classifier.keras", "federated/fedavg/classifier.keras",
                     "federated/fedavg/checkpoints/classifier/round_3.keras", "centralized/.tmp.keras"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path)] == [
        "centralized/classifier.keras", "federated/fedavg/classifier.keras"]


def test_round_plot_draws_federated_rounds_against_the_centralized_kept_epoch(tmp_path):
    from fedbrain.plots import _kept_epoch, plot_rounds

    def result(run, training, history, accuracy):
        return {"info": {"run": run, "training": training, "task": "classification", "history": history},
                "metrics": {"accuracy": accuracy}}

    central = {"val_loss": [1.0, 0.4, 0.6], "val_accuracy": [0.5, 0.9, 0.95]}
    assert _kept_epoch(central) == 1  # early stopping kept the lowest val_loss, not the best accuracy
    assert _kept_epoch({"loss": [1.0, 0.5]}) == 1
    federated = {"val_loss": [1.2, 0.8], "val_accuracy": [0.6, 0.8]}
    results = [result("centralized/classifier", "centralized", central, 0.91),
               result("federated/fedavg/classifier", "federated", federated, 0.85)]
    path = plot_rounds(results, "classification", tmp_path / "rounds.png")
    assert path is not None and path.stat().st_size > 1000
    # Nothing federated with a history (or another task only): no plot.
    assert plot_rounds(results[:1], "classification", tmp_path / "none.png") is None
    assert plot_rounds(results, "segmentation", tmp_path / "seg.png") is None


def test_round_plot_legend_shows_a_zero_score_and_says_when_there_is_none():
    run = {"info": {"run": "federated/fedavg"}, "metrics": {"test_dice": 0.0}}
    assert _run_label(run, "test_dice") == "federated/fedavg (test 0.000)"
    assert _run_label(run, "test_accuracy") == "federated/fedavg (test n/a)"


def test_evaluate_scores_a_segmenter_per_patient_at_native_resolution_and_per_site(segmentation_data, tiny_params,
                                                                                   tmp_path):
    from PIL import Image

    processed, partition = segmentation_data
    index = pd.read_parquet(processed / "index.parquet")
    masks = np.load(processed / "masks.npy")
    # The original masks, twice the processed size, where ingest's manifest would point; two sites.
    paths = []
    for row, mask in zip(index["row"], masks[..., 0]):
        paths.append(str(tmp_path / "raw" / f"{row}_mask.tif"))
        Path(paths[-1]).parent.mkdir(exist_ok=True)
        Image.fromarray(np.kron(mask, np.ones((2, 2), np.uint8)) * 255).save(paths[-1])
    index.assign(site=["CS" if p in ("p0", "p1", "p2") else "DU" for p in index["patient_id"]],
                 mask_path=paths, slice_index=-1).to_parquet(processed / "index.parquet")
    models, out = tmp_path / "models", tmp_path / "reports"
    with tracking.start_run(tiny_params, "centralized-segmenter", {"training": "centralized"}) as active:
        run_id = active.info.run_id
    save_model(build_model("unet", (32, 32, 3), 2), models / "centralized" / "segmenter.keras",
               {"task": "segmentation", "model": "unet", "training": "centralized", "run_id": run_id})
    params = {**tiny_params, "evaluate": {**tiny_params["evaluate"], "register": False, "postprocess_min_pixels": 4}}

    evaluate(params, processed, partition, models, out)
    scalars = json.loads((out / "metrics.json").read_text())["centralized/segmenter"]
    detail = json.loads((out / "evaluation.json").read_text())["centralized/segmenter"]["metrics"]
    assert detail["dice_native_source"] == "native 64x64"
    assert {"test_dice", "test_dice_tumour_slices", "test_dice_native_mean", "test_dice_native_median",
            "test_hd95_native_mean", "test_false_positive_volume_px", "test_dice_native_postprocessed_mean",
            "test_site_CS/dice_native_mean", "test_site_DU/dice_native_mean", "test_site_CS/patients"} <= set(scalars)
    # The test split holds p2 (no tumour: scored by the empty-mask rule) and p5, one per site.
    assert set(detail["per_patient_native"]) == {"p2", "p5"}
    assert scalars["test_site_CS/dice_native_mean"] == detail["per_patient_native"]["p2"]["dice"]
    assert detail["per_patient_native"]["p2"]["tumour_px"] == 0
    headline = json.loads((out / "headline" / "centralized" / "segmenter.json").read_text())
    assert headline["test_dice_native_mean"] == scalars["test_dice_native_mean"]
    csv = pd.read_csv(out / "comparison.csv").set_index("run")
    assert csv.loc["centralized/segmenter", "dice_native_by_site"].startswith("CS ")
    assert "## Segmentation per institution" in (out / "comparison.md").read_text()
    assert (out / "plots" / "centralized" / "segmenter" / "dice_by_site.png").stat().st_size > 1000
    mlflow.set_tracking_uri(tiny_params["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    logged = client.get_run(run_id).data.metrics
    assert logged["test_site_DU/dice_native_mean"] == pytest.approx(scalars["test_site_DU/dice_native_mean"])
    assert "evaluation/dice_by_site.png" in {a.path for a in client.list_artifacts(run_id, "evaluation")}
