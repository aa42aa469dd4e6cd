"""Tiny processed/partition folders following the dataset.py contract, made in tmp_path.

The images carry a learnable signal (a bright square whose position depends on the class; for
the masked set the square is the tumour and its mask), so a few steps of training move metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np
import pandas as pd
import pytest

SIZE = 32


def make_dataset(root: Path, classes: list[str], channels: int, has_masks: bool, per_class: int = 12,
                 seed: int = 0, test_parts: int = 0) -> tuple[Path, Path]:
    """``test_parts``: how many hospitals get a held-out test part (splits.parquet's test_hospital); 0
    writes splits.parquet as the partition stage did before test parts existed (no such column)."""
    rng = np.random.default_rng(seed)
    n = per_class * len(classes)
    labels = np.repeat(np.arange(len(classes)), per_class)
    images = rng.uniform(0.0, 0.2, (n, SIZE, SIZE, channels)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE, 1), np.uint8)
    for i, label in enumerate(labels):
        if has_masks and classes[label] == "no_tumor":
            continue
        y, x = 4 + 6 * (label % 4), 4 + int(rng.integers(0, 16))
        images[i, y:y + 8, x:x + 8, :] = 0.9
        masks[i, y:y + 8, x:x + 8, 0] = 1
    patients = [f"p{i // 4}" if has_masks else None for i in range(n)]
    ids = [f"img{i:03d}" for i in range(n)]
    processed, partition = root / "processed", root / "partition"
    processed.mkdir(parents=True)
    partition.mkdir(parents=True)
    np.save(processed / "images.npy", images)
    if has_masks:
        np.save(processed / "masks.npy", masks)
    index = pd.DataFrame({"row": np.arange(n), "image_id": ids, "patient_id": patients,
                          "label": [classes[k] for k in labels], "label_index": labels})
    index.to_parquet(processed / "index.parquet")
    (processed / "classes.json").write_text(json.dumps(
        {"classes": classes, "has_masks": has_masks, "channels": channels, "size": SIZE}))
    # Splits by position within each class: 8 train, 2 val, 2 test per class (all classes in test).
    pos = np.tile(np.arange(per_class), len(classes))
    split = np.where(pos < per_class - 4, "train", np.where(pos < per_class - 2, "val", "test"))
    hospital = np.where(split == "test", -1, pos % 2)
    splits = index.assign(site=None, split=split, hospital=hospital)
    if test_parts:  # by label, as a label-skewed partition would (and a patient stays in one part)
        splits["test_hospital"] = np.where(split == "test", labels % test_parts, -1)
    splits.to_parquet(partition / "splits.parquet")
    for k in (0, 1):
        hdir = partition / f"hospital_{k}"
        hdir.mkdir()
        splits[splits["hospital"] == k][["row", "split", "label_index"]].to_parquet(hdir / "index.parquet")
    return processed, partition


@pytest.fixture
def classification_data(tmp_path):
    return make_dataset(tmp_path / "cls", ["glioma", "meningioma", "notumor", "pituitary"], 1, False)


@pytest.fixture
def classification_with_test_parts(tmp_path):
    """The classification set with a held-out test part for each of ``test_parts`` hospitals (by label:
    with 2, hospital 0 holds the test images of classes 0 and 2, hospital 1 those of classes 1 and 3)."""
    return lambda test_parts: make_dataset(tmp_path / "cls", ["glioma", "meningioma", "notumor", "pituitary"], 1,
                                           False, test_parts=test_parts)


@pytest.fixture
def segmentation_data(tmp_path):
    return make_dataset(tmp_path / "seg", ["no_tumor", "tumor"], 3, True)


@pytest.fixture
def tiny_params(tmp_path, monkeypatch):
    """params.yaml content for tiny runs, with an MLflow store (and its artifacts) inside tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    fit = {"batch_size": 8, "lr_schedule": "cosine", "warmup_epochs": 0, "patience": 3, "monitor": "val_loss",
           "class_weight": True, "augment": {"rotation_deg": 15, "hflip": True, "vflip": True, "brightness": 0.1}}
    return {
        "preprocess": {"size": SIZE, "equalize": False, "bias_field": False},
        "train": {"seed": 1,
                  "classifier": {"model": "cnn", "weights": "none", "epochs": 2, "learning_rate": 0.003,
                                 "label_smoothing": 0.1, **fit},
                  "segmenter": {"model": "unet", "epochs": 2, "learning_rate": 0.003, **fit}},
        "evaluate": {"threshold": 0.5, "overlays": 2, "batch_size": 16},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "fedbrain-test",
                   "artifact_location": str(tmp_path / "mlartifacts"),
                   "log_models": True},
    }
