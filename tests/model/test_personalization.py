"""evaluate with personalized federated models: each hospital's held-out test part scored by every model,
the personalization table, and a hospital's own model kept out of the registry."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from fedbrain import tracking
from fedbrain.dataset import Split, load_split
from fedbrain.evaluate import describe, segmentation_metrics
from fedbrain.hospital_scores import MEAN_ROW, OWN_MODEL, hospital_scores, personalization_table
from fedbrain.evaluate import run as evaluate
from fedbrain.models import build_model
from fedbrain.train import save_model

FOUR = ["glioma", "meningioma", "notumor", "pituitary"]


def constant_classifier(label: int):
    """A classifier that predicts ``label`` for every image: scores on a part are known by hand."""
    model = build_model("cnn", (32, 32, 1), len(FOUR))
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    # a tiny kernel (not zero) keeps gradients for Grad-CAM; the bias decides the class
    layer.set_weights([kernel * 1e-3, np.where(np.arange(len(FOUR)) == label, 10.0, 0.0).astype(np.float32)])
    return model


def card(**extra) -> dict:
    return {"task": "classification", "model": "cnn", "training": "federated", "privacy": "none",
            "epsilon": None, "delta": None, "classes": FOUR, "run_id": None, **extra}


def personalized_card(hospital: int) -> dict:
    return card(personalization="fedbn", hospital=hospital)


def test_describe_reads_a_personalized_card_and_infers_a_hospital_folder_without_one(tmp_path):
    models = tmp_path / "models"
    model = constant_classifier(0)
    own = models / "federated" / "fedbn" / "hospital_1" / "classifier.keras"
    assert describe(own, models, model, personalized_card(1))["personalization"] == "fedbn"
    assert describe(own, models, model, personalized_card(1))["hospital"] == 1
    # Without its card a model in a hospital folder is still a hospital's own model (never registered).
    assert (describe(own, models, model, {})["hospital"], describe(own, models, model, {})["personalization"]) \
        == (1, "unknown")
    global_model = describe(models / "federated" / "fedbn" / "classifier.keras", models, model, card())
    assert (global_model["personalization"], global_model["hospital"]) == (None, None)


def test_evaluate_scores_every_model_on_each_hospitals_test_part(classification_with_test_parts, tiny_params,
                                                                 tmp_path, monkeypatch):
    from fedbrain import registry

    registered = []  # what evaluate hands the registry (registering itself is tests/model/test_registry.py's)
    monkeypatch.setattr(registry, "register", lambda params, models: registered.extend(models))
    processed, partition = classification_with_test_parts(2)  # hospital 0: classes 0 and 2; 1: classes 1 and 3
    models, out = tmp_path / "models", tmp_path / "reports"
    with tracking.start_run(tiny_params, "centralized-classifier", {"training": "centralized"}) as active:
        central_run = active.info.run_id
    constants = {"centralized/classifier": 2, "federated/fedbn/classifier": 3,
                 "federated/fedbn/hospital_0/classifier": 0, "federated/fedbn/hospital_1/classifier": 1}
    save_model(constant_classifier(2), models / "centralized" / "classifier.keras",
               card(training="centralized", run_id=central_run))
    save_model(constant_classifier(3), models / "federated" / "fedbn" / "classifier.keras", card())
    for k in (0, 1):
        save_model(constant_classifier(k), models / "federated" / "fedbn" / f"hospital_{k}" / "classifier.keras",
                   personalized_card(k))

    params = {**tiny_params, "evaluate": {**tiny_params["evaluate"], "audit": {"members": 0}}}  # not under test
    evaluate(params, processed, partition, models, out)

    table = pd.read_csv(out / "personalization.csv")
    own = "federated/fedbn" + OWN_MODEL
    assert list(table.columns) == ["task", "metric", "hospital", "test_images", "centralized/classifier",
                                   "federated/fedbn/classifier", own]
    assert list(zip(table["metric"], table["hospital"].astype(str))) == [
        ("accuracy", "0"), ("accuracy", "1"), ("accuracy", MEAN_ROW),
        ("macro_f1", "0"), ("macro_f1", "1"), ("macro_f1", MEAN_ROW)]
    assert list(table["test_images"]) == [4, 4, 8] * 2
    # Every cell by hand: the column's model (hospital k's own one in the personalized column) on
    # hospital k's test part, as load_split gives it.
    expected = {}
    for k in (0, 1):
        part = load_split(processed, partition, "test", hospital=k)
        for column, run in (("centralized/classifier", "centralized/classifier"),
                            ("federated/fedbn/classifier", "federated/fedbn/classifier"),
                            (own, f"federated/fedbn/hospital_{k}/classifier")):
            predicted = np.full(len(part), constants[run])
            expected[("accuracy", k, column)] = accuracy_score(part.labels, predicted)
            expected[("macro_f1", k, column)] = f1_score(part.labels, predicted, average="macro", zero_division=0)
    rows = table.set_index(["metric", "hospital"])
    for (metric, k, column), value in expected.items():
        assert rows.loc[(metric, str(k)), column] == pytest.approx(value), (metric, k, column)
        mean = np.mean([expected[(metric, h, column)] for h in (0, 1)])
        assert rows.loc[(metric, MEAN_ROW), column] == pytest.approx(mean)
    # Each hospital's own model predicts a class of its own part: 0.5 each; the global models only one part's.
    assert list(rows.loc[[("accuracy", "0"), ("accuracy", "1")], own]) == [0.5, 0.5]
    assert list(rows.loc[[("accuracy", "0"), ("accuracy", "1")], "federated/fedbn/classifier"]) == [0.0, 0.5]
    assert "## classification: accuracy" in (out / "personalization.md").read_text()
    assert (out / "plots" / "personalization_classification.png").stat().st_size > 1000

    # Every model's scores on every part (not only its own hospital's) in evaluation.json.
    detail = json.loads((out / "evaluation.json").read_text())
    mine = detail["federated/fedbn/hospital_1/classifier"]
    assert (mine["personalization"], mine["hospital"]) == ("fedbn", 1)
    assert mine["metrics"]["by_hospital"]["0"] == {"test_images": 4, "accuracy": 0.0, "macro_f1": 0.0}
    assert set(detail["centralized/classifier"]["metrics"]["by_hospital"]) == {"0", "1"}
    # The personalized models are compared on the common test split too, like every model.
    comparison = pd.read_csv(out / "comparison.csv").set_index("run")
    assert comparison.loc["federated/fedbn/hospital_0/classifier", "personalization"] == "fedbn"
    assert comparison.loc["federated/fedbn/hospital_0/classifier", "test_images"] == 8
    assert comparison["personalization"].isna().sum() == 2  # the global models

    # MLflow: a hospital's own model gets an evaluation run of its own, tagged; it is never registered.
    mlflow.set_tracking_uri(tiny_params["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["fedbrain-test"], filter_string="tags.personalization = 'fedbn'")
    assert sorted(runs["tags.hospital"]) == ["0", "1"]
    assert sorted(runs["metrics.test_accuracy"]) == [0.25, 0.25]
    assert [m["run"] for m in registered] == ["centralized/classifier", "federated/fedbn/classifier"]
    assert "evaluation/personalization_classification.png" in {
        a.path for a in client.list_artifacts(central_run, "evaluation")}


@pytest.mark.parametrize("test_parts", [0, 1])
def test_no_table_without_test_parts_of_two_hospitals(classification_with_test_parts, tmp_path, tiny_params, capsys,
                                                      test_parts):
    # 0: a splits.parquet written before test parts existed; 1: a single hospital has one.
    processed, partition = classification_with_test_parts(test_parts)
    models, out = tmp_path / "models", tmp_path / "reports"
    save_model(constant_classifier(0), models / "federated" / "fedbn" / "hospital_0" / "classifier.keras",
               personalized_card(0))
    out.mkdir()
    (out / "personalization.md").write_text("a previous evaluation's table")
    params = {**tiny_params, "evaluate": {**tiny_params["evaluate"], "log_mlflow": False, "audit": {"members": 0}}}

    evaluate(params, processed, partition, models, out)
    # DVC's outs are there, saying why there is no table
    assert "None: " in (out / "personalization.md").read_text() and "previous" not in (out / "personalization.md").read_text()
    assert pd.read_csv(out / "personalization.csv").empty
    assert not list((out / "plots").glob("personalization_*.png"))
    detail = json.loads((out / "evaluation.json").read_text())["federated/fedbn/hospital_0/classifier"]
    assert "by_hospital" not in detail["metrics"] and detail["hospital"] == 0
    said = capsys.readouterr().out
    assert "personalization: no per-hospital table" in said
    assert ("dvc repro partition" in said) == (test_parts == 0)


# --- the table and the scores without models --------------------------------------------------------

def result(run: str, task: str, by_hospital: dict, hospital: int | None = None) -> dict:
    return {"info": {"run": run, "task": task, "hospital": hospital,
                     "personalization": None if hospital is None else "local_head"},
            "metrics": {"by_hospital": by_hospital}}


def test_table_puts_each_variants_own_models_beside_its_global_model():
    parts = {0: np.arange(3), 2: np.arange(3, 8)}
    score = lambda a0, a2: {"0": {"accuracy": a0, "macro_f1": a0}, "2": {"accuracy": a2, "macro_f1": a2}}  # noqa: E731
    results = [result("centralized/classifier", "classification", score(0.5, 0.6)),
               result("federated/local/classifier", "classification", score(0.7, 0.8)),
               result("federated/local/hospital_0/classifier", "classification", score(0.9, 0.1), hospital=0),
               result("federated/local/hospital_2/classifier", "classification", score(0.2, 1.0), hospital=2),
               result("federated/other/hospital_0/classifier", "classification", score(0.3, 0.3), hospital=0),
               result("federated/secure/classifier", "classification", score(0.4, 0.4)),
               result("centralized/segmenter", "segmentation",
                      {"0": {"dice_tumour_slices": 0.6}, "2": {"dice_tumour_slices": None}})]
    table = personalization_table(results, parts)
    assert list(table.columns[4:]) == ["centralized/classifier", "federated/local/classifier",
                                       "federated/local" + OWN_MODEL, "federated/secure/classifier",
                                       "federated/other" + OWN_MODEL, "centralized/segmenter"]
    accuracy = table[table["metric"] == "accuracy"].set_index("hospital")
    assert list(accuracy.index) == [0, 2, MEAN_ROW] and list(accuracy["test_images"]) == [3, 5, 8]
    assert list(accuracy["federated/local" + OWN_MODEL]) == pytest.approx([0.9, 1.0, 0.95])
    assert list(accuracy["federated/local/classifier"]) == pytest.approx([0.7, 0.8, 0.75])
    assert accuracy["centralized/segmenter"].isna().all()  # another task's model: no score in these rows
    # A hospital without its own model: an empty cell, and the mean over the hospitals that have one.
    assert pd.isna(accuracy.loc[2, "federated/other" + OWN_MODEL])
    assert accuracy.loc[MEAN_ROW, "federated/other" + OWN_MODEL] == pytest.approx(0.3)
    dice = table[table["task"] == "segmentation"].set_index("hospital")
    assert list(dice["metric"]) == ["dice_tumour_slices"] * 3
    assert dice.loc[MEAN_ROW, "centralized/segmenter"] == pytest.approx(0.6)
    assert pd.isna(dice.loc[2, "centralized/segmenter"]) and dice["centralized/classifier"].isna().all()
    assert personalization_table(results, {0: np.arange(3)}) is None
    assert personalization_table(results, None) is None


def test_hospital_dice_is_the_tumour_slice_dice_of_the_parts_rows():
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 8, 8, 1), np.uint8)
    for i in (0, 1, 3, 4):
        masks[i, 2:5, 2:5 + i % 2] = 1
    proba = rng.uniform(0, 1, (6, 8, 8, 1)).astype(np.float32) * 0.3
    proba[0, 2:5, 2:5] = proba[3, 3:6, 3:6] = 0.9
    test = Split(np.zeros((6, 8, 8, 1), np.float32), np.zeros(6, np.int64), masks, [f"i{k}" for k in range(6)],
                 [f"p{k}" for k in range(6)])
    parts = {0: np.array([0, 1, 2]), 1: np.array([3, 4, 5])}
    scored = hospital_scores("segmentation", test, proba, parts, threshold=0.5)
    for k, rows in parts.items():
        by_hand = segmentation_metrics(masks[rows], proba[rows], [f"p{i}" for i in rows], [f"i{i}" for i in rows])
        assert scored[str(k)] == {"test_images": 3, "tumour_slices": 2,
                                  "dice_tumour_slices": pytest.approx(by_hand["dice_tumour_slices"])}
    assert scored["0"]["dice_tumour_slices"] == pytest.approx(0.5)  # slice 0 perfect, slice 1 missed
