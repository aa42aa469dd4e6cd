"""Training curves as DVC data plots (fedbrain.curves): what DVC is given it can draw and overlay."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

from fedbrain.curves import curve_rows, write_curves
from helpers import PROJECT

DVC = Path(sys.executable).parent / "dvc"


def test_series_of_different_lengths_keep_each_value_at_its_step():
    rows = curve_rows({"loss": [1.0, 0.5, 0.25], "val_loss": [1.1, 0.6, float("nan")], "epsilon": [2.0, 3.0],
                       "note": "not a series"})
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["epsilon"] for r in rows] == ["", 2.0, 3.0]  # logged from round 2 on
    assert rows[2]["val_loss"] == "" and "note" not in rows[0]


def test_one_file_per_model_by_task_and_stale_curves_removed(tmp_path):
    models = [
        {"run": "centralized/classifier", "task": "classification", "training": "centralized",
         "history": {"loss": [1.0, 0.8], "val_loss": [1.1, 0.9], "val_accuracy": [0.5, 0.6]}},
        {"run": "federated/fedavg/segmenter", "task": "segmentation", "training": "federated",
         "history": {"loss": [1.0], "val_loss": [1.2], "val_dice": [0.3]}},
        {"run": "federated/dp/classifier", "task": "classification", "training": "federated", "history": None},
    ]
    stale = tmp_path / "classification" / "federated_old_classifier.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("step\n1\n")
    written = write_curves(models, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "classification/centralized_classifier.csv", "segmentation/federated_fedavg_segmenter.csv"]
    assert not stale.exists()
    with written[0].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["unit"], r["val_accuracy"]) for r in rows] == [("1", "epoch", "0.5"), ("2", "epoch", "0.6")]
    assert list(csv.DictReader(written[1].open()))[0]["unit"] == "round"


def test_dvc_draws_every_curve_with_the_projects_plot_definitions(tmp_path):
    """The top-level `plots` of the project's dvc.yaml, in a scratch DVC repository, over written curves."""
    plots = [p for p in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["plots"]
             if isinstance(p, dict) and any(str(k).startswith("reports/curves") for k in p)]
    assert {next(iter(p)) for p in plots} == {"reports/curves/classification", "reports/curves/segmentation"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))

    def show() -> dict:
        shown = subprocess.run([str(DVC), "plots", "show", "--json"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        result = json.loads(shown.stdout)
        assert not result.get("errors"), result["errors"]
        return result

    # A dataset without masks trains no segmenter: its empty folder is no error (a missing one is).
    write_curves([{"run": "centralized/classifier", "task": "classification", "training": "centralized",
                   "history": {"val_loss": [1.1], "val_accuracy": [0.5]}}], tmp_path / "reports" / "curves")
    assert list(show()["data"]) == ["reports/curves/classification/centralized_classifier.csv"]
    write_curves([
        {"run": "centralized/classifier", "task": "classification", "training": "centralized",
         "history": {"loss": [1.0, 0.8], "val_loss": [1.1, 0.9], "accuracy": [0.4, 0.7], "val_accuracy": [0.5, 0.6]}},
        {"run": "federated/fedavg/classifier", "task": "classification", "training": "federated",
         "history": {"val_loss": [1.0, 0.7, 0.6], "val_accuracy": [0.4, 0.6, 0.7], "epsilon": [1.0, 2.0, 3.0]}},
        {"run": "centralized/segmenter", "task": "segmentation", "training": "centralized",
         "history": {"val_loss": [0.9], "val_dice": [0.4]}},
    ], tmp_path / "reports" / "curves")
    result = show()
    drawn = {Path(k).name: {v["field"] for v in plot[0]["content"]["data"]["values"]}
             for k, plot in result["data"].items()}
    assert drawn == {"centralized_classifier.csv": {"val_loss", "val_accuracy"},
                     "federated_fedavg_classifier.csv": {"val_loss", "val_accuracy"},
                     "centralized_segmenter.csv": {"val_loss", "val_dice"}}
