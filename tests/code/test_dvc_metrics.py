"""`dvc metrics show` reads as a table of headline figures: one row per run and per data stage, at
most 30 columns, every run's test accuracy in it.

The metrics files are the ones dvc.yaml lists, written by the stages' own functions (evaluate's
scalars from real metric and audit computations on random predictions), then read by DVC itself in
a scratch DVC project with the project's dvc.yaml and params.yaml: no stage runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from helpers import CLASSES, PROJECT, dvc_metrics_table

MAX_COLUMNS = 30  # issue 16: the table fits a terminal


def listed_metrics() -> set[str]:
    """Every metrics path dvc.yaml names, in stages and at the top level."""
    dvc_yaml = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    paths = set()
    for entries in [stage.get("do", stage).get("metrics", []) for stage in dvc_yaml["stages"].values()] + \
            [dvc_yaml.get("metrics", [])]:
        paths.update(next(iter(e)) if isinstance(e, dict) else e for e in entries)
    return paths


def _classifier_scalars(rng, epsilon: float | None) -> dict:
    from fedbrain import reliability
    from fedbrain.evaluate import classification_metrics, run_scalars
    from fedbrain.privacy.audit import audit_model

    def proba(n):
        return rng.dirichlet(np.ones(len(CLASSES)), n)

    labels = rng.integers(0, len(CLASSES), 60)
    audit = audit_model(proba(60), labels, proba(60), labels, epsilon, 1e-5 if epsilon else None)
    info = {"epsilon": epsilon, "delta": 1e-5 if epsilon else None, "temperature": 1.3}
    test = proba(60)
    metrics = {**classification_metrics(labels, test, CLASSES), **reliability.assess(test, labels, 1.3)}
    return run_scalars(info, metrics, audit)


def _segmenter_scalars(rng) -> dict:
    from fedbrain import segmentation_scores
    from fedbrain.evaluate import run_scalars, segmentation_metrics

    masks = (rng.random((6, 16, 16, 1)) > 0.7).astype(np.uint8)
    proba, patients = rng.random((6, 16, 16, 1)), [0, 0, 1, 1, 2, 2]
    reference = segmentation_scores.Reference([m[..., 0] > 0 for m in masks], ["CS", "CS", "DU", "DU", "HT", "HT"],
                                              "native 16x16")
    metrics = {**segmentation_metrics(masks, proba, patients, list(range(6))),
               **segmentation_scores.score(reference, proba, patients, list(range(6)), min_pixels=4)}
    return run_scalars({"epsilon": None, "delta": None}, metrics, {"status": "audit skipped: classifiers only"})


def scratch_project(tmp_path: Path, variants: list[str], segmenters: bool) -> tuple[Path, list[str]]:
    """A DVC project holding the metrics files a run of these variants leaves; returns it and the runs."""
    from dvc.repo import Repo

    from fedbrain import partition, validate
    from fedbrain.evaluate import headline, write_headlines

    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT / name, root / name)
    Repo.init(str(root), no_scm=True).close()
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert listed_metrics() == {"reports/validation/summary.json", "reports/headline", "data/partition/summary.json"}

    images = pd.DataFrame({"decodes": [True] * 8})
    classes = pd.DataFrame({"label": CLASSES, "n_images": [2] * 4})
    duplicates = pd.DataFrame({"content_hash": ["h"], "n_copies": [2], "labels": ["glioma"], "image_ids": ["a;b"]})
    summary = validate.headline(validate.summarise(images, classes, duplicates, True))
    (root / "reports" / "validation").mkdir(parents=True)
    (root / "reports" / "validation" / "summary.json").write_text(json.dumps(summary))
    (root / "data" / "partition").mkdir(parents=True)
    report = {"duplicates_dropped": 1, "label_conflicts_dropped": 0, "n_per_split": {"train": 5, "val": 1, "test": 1}}
    (root / "data" / "partition" / "summary.json").write_text(json.dumps(partition.headline(report)))

    rng = np.random.default_rng(0)
    headlines = {}
    for training in ["centralized", *(f"federated/{v}" for v in variants)]:
        variant = params["variants"].get(training.split("/")[-1], {}) if training != "centralized" else {}
        epsilon = 2.5 if (variant.get("privacy") or {}).get("mode") else None
        headlines[f"{training}/classifier"] = headline("classification", _classifier_scalars(rng, epsilon))
        if segmenters:
            headlines[f"{training}/segmenter"] = headline("segmentation", _segmenter_scalars(rng))
    write_headlines(root / "reports" / "headline", headlines)
    return root, list(headlines)


def test_metrics_show_on_the_sample_is_a_headline_table(tmp_path):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    root, runs = scratch_project(tmp_path, params["pipeline_variants"], segmenters=False)  # the sample: no masks
    columns, rows = dvc_metrics_table(root)
    assert len(columns) <= MAX_COLUMNS, columns
    by_path = {row["Path"]: row for row in rows}
    for run in runs:
        row = by_path[f"reports/headline/{run}.json"]
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0 and row["test_macro_f1"] != "-" and row["mia_auc"] != "-"
        assert 0.0 <= float(row["test_ece_calibrated"]) <= 1.0
    assert by_path["reports/headline/federated/secure/classifier.json"]["epsilon"] == "2.5"
    assert by_path["reports/headline/federated/fedavg/classifier.json"]["epsilon"] == "-"
    assert by_path["reports/validation/summary.json"]["success"] == "True"
    assert by_path["data/partition/summary.json"]["duplicates_dropped"] == "1"
    # Not in the headline: the partition's per-hospital counts, per-class scores, the audit's details.
    assert not [c for c in columns if c.startswith(("hospital", "label_counts", "class_counts", "mia_tpr"))]
    assert len(rows) == len(runs) + 2


def test_every_variant_with_a_segmenter_still_fits(tmp_path):
    """Columns are the union of the figures' names, so more runs add rows, not columns."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    root, runs = scratch_project(tmp_path, list(params["variants"]), segmenters=True)
    columns, rows = dvc_metrics_table(root)
    assert len(runs) == 2 * (1 + len(params["variants"])) and len(columns) <= MAX_COLUMNS, columns
    segmenter = {row["Path"]: row for row in rows}["reports/headline/federated/dp/segmenter.json"]
    assert segmenter["test_dice"] != "-" and segmenter["test_accuracy"] == "-"
    assert segmenter["test_dice_native_mean"] != "-" and not [c for c in columns if "site_" in c]
