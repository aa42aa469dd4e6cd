"""Tiny processed/partition folders and params for federated runs, following fedbrain.dataset's contract.

Every hospital holds a few 16x16 images with a learnable signal (a bright square whose row
depends on the class), so a round of training moves the metrics. The tests train
tiny_model.py's network on them: a round's cost is then Flower's and TensorFlow's start-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd

SIZE = 16
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


SEGMENTATION_CLASSES = ["no_tumor", "tumor"]


def make_federated_data(root: Path, hospitals: int, train_per_class: int = 3, val_per_class: int = 1,
                        test_per_class: int = 1, seed: int = 0, masks: bool = False) -> tuple[Path, Path]:
    """processed/ and partition/ with `hospitals` hospitals of distinct images each.

    masks=True: a segmentation set (no_tumor / tumor), the bright square of a tumour image being
    its mask."""
    classes = SEGMENTATION_CLASSES if masks else CLASSES
    rng = np.random.default_rng(seed)
    rows = []  # (label, split, hospital)
    for k in range(hospitals):
        for label in range(len(classes)):
            rows += [(label, "train", k)] * train_per_class + [(label, "val", k)] * val_per_class
    for label in range(len(classes)):
        rows += [(label, "test", -1)] * test_per_class
    labels = np.array([r[0] for r in rows])
    n = len(rows)
    images = rng.uniform(0.0, 0.2, (n, SIZE, SIZE, 1)).astype(np.float32)
    tumour = np.zeros((n, SIZE, SIZE, 1), np.uint8)
    for i, label in enumerate(labels):
        if masks and classes[label] == "no_tumor":
            continue
        y = 4 * label if not masks else int(rng.integers(0, SIZE - 4))
        images[i, y:y + 4, 4:12, 0] = 0.9
        tumour[i, y:y + 4, 4:12, 0] = 1
    processed, partition = root / "processed", root / "partition"
    processed.mkdir(parents=True)
    partition.mkdir(parents=True)
    np.save(processed / "images.npy", images)
    if masks:
        np.save(processed / "masks.npy", tumour)
    ids = [f"img{i:03d}" for i in range(n)]
    index = pd.DataFrame({"row": np.arange(n), "image_id": ids, "patient_id": [None] * n,
                          "label": [classes[k] for k in labels], "label_index": labels})
    index.to_parquet(processed / "index.parquet")
    (processed / "classes.json").write_text(json.dumps(
        {"classes": classes, "has_masks": masks, "channels": 1, "size": SIZE}))
    splits = index.assign(site=None, split=[r[1] for r in rows], hospital=[r[2] for r in rows])
    splits.to_parquet(partition / "splits.parquet")
    for k in range(hospitals):
        hdir = partition / f"hospital_{k}"
        hdir.mkdir()
        splits[splits["hospital"] == k][["row", "split", "label_index"]].to_parquet(hdir / "index.parquet")
    return processed, partition


def isolate(monkeypatch) -> None:
    """A federation test's processes: only its params' MLflow store counts, tests/federated is on their
    PYTHONPATH (tiny_model.py), and TensorFlow keeps to one thread each."""
    tests_dir = Path(__file__).resolve().parent
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "1")


def federated_params(tmp_path: Path, rounds: int = 2, **federated) -> dict:
    """params.yaml content for a tiny federation, with its MLflow store and keys inside tmp_path."""
    return {
        "train": {"seed": 1,
                  "classifier": {"model": "cnn", "weights": "none", "epochs": 1, "learning_rate": 0.003,
                                 "batch_size": 8, "lr_schedule": "constant", "warmup_epochs": 0,
                                 "patience": 5, "monitor": "val_loss", "class_weight": True,
                                 "augment": {"rotation_deg": 0, "hflip": False, "vflip": False,
                                             "brightness": 0.0}}},
        "federated": {"roles": "classifier", "rounds": rounds, "local_epochs": 1,
                      "min_available_nodes": 2, "min_train_nodes": 2, "min_evaluate_nodes": 2,
                      "round_timeout": 300.0, "node_wait_timeout": 120.0,
                      "state_dir": str(tmp_path / ".fedbrain"), **federated},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "fedbrain-test",
                   "artifact_location": str(tmp_path / "mlartifacts"), "log_models": False},
    }
