"""Centralized baseline numbers on the real data beside the project (not a test).

  .venv/bin/python bench/centralized.py [classifier] [classifier-group] [segmenter] [throughput] [evaluate]
                                        [--seed S]
  (default: classifier, segmenter, throughput)

classifier  brain-tumor-mri/Training through ingest -> preprocess -> partition (the pipeline's
            leakage-free split) -> train-centralized with params.yaml's train.classifier ->
            evaluate: prints test accuracy, macro F1 and wall time. Targets: >= 0.95, >= 0.94.
classifier-group  the same classifier in its GroupNorm form (train.classifier.normalization: group,
            what DP-SGD trains), into models-group/ and reports-group/: the cost of the normalisation
            change apart from the cost of DP (issue 12).
--seed S    the classifiers with train.seed S (other initial weights and batch order, the same split),
            into models-seedS/ and reports-seedS/: the centralized reference of a federated run on that
            seed (bench/variants.py with a variant setting train.seed).
segmenter   lgg-mri-segmentation, split by patient, U-Net (train.segmenter): prints mean Dice on
            test slices with tumour (target >= 0.80), per-patient Dice and HD95.
throughput  images/s of fedbrain.train.fit vs a bare model.fit on the same model and data in the
            same process (ratio, target >= 0.9).
evaluate    `fedbrain evaluate` over every classifier in build/bench/brain-tumor-mri/models (the
            centralized one and each federated variant the other benches trained), nothing trained:
            the comparison, the membership audit of each model, and the audit's share of the time.

Work files go to build/bench/<dataset>/ (git-ignored); the data stages are re-run only when
their outputs are missing. MLflow runs go to build/bench/mlflow.db.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared" / "data"
WORK = PROJECT / "build" / "bench"
sys.path.insert(0, str(PROJECT / "src"))

from fedbrain import evaluate, ingest, partition, preprocess, train  # noqa: E402
from fedbrain.config import load_params  # noqa: E402
from fedbrain.dataset import load_classes, load_split  # noqa: E402


def params_for(root: Path) -> dict:
    params = copy.deepcopy(load_params(PROJECT / "params.yaml"))
    params["data"]["root"] = str(root)
    params["mlflow"] = {**params.get("mlflow", {}), "tracking_uri": f"sqlite:///{WORK / 'mlflow.db'}",
                        "experiment": "fedbrain-bench", "artifact_location": str(WORK / "mlruns")}
    return params


def prepare(name: str, root: Path, params: dict) -> tuple[Path, Path]:
    if not root.is_dir():
        sys.exit(f"{root}: real data absent (expected beside the project in ../shared/data)")
    work = WORK / name
    manifest, processed, parts = work / "manifest.parquet", work / "processed", work / "partition"
    if not manifest.is_file():
        ingest.run(params, manifest)
    if not (processed / "classes.json").is_file():
        preprocess.run(params, manifest, processed)
    if not (parts / "splits.parquet").is_file():
        partition.run(params, processed, parts)
    return processed, parts


def bench_classifier(normalization: str = "batch", seed: int | None = None) -> None:
    params = params_for(SHARED / "brain-tumor-mri" / "Training")
    processed, parts = prepare("brain-tumor-mri", SHARED / "brain-tumor-mri" / "Training", params)
    classes = load_classes(processed)
    split_train, split_val = load_split(processed, parts, "train"), load_split(processed, parts, "val")
    models, reports = WORK / "brain-tumor-mri" / "models", WORK / "brain-tumor-mri" / "reports"
    if normalization != "batch":  # its own folders: `evaluate` scores every model under models/
        params["train"]["classifier"]["normalization"] = normalization
        models, reports = models.with_name(f"models-{normalization}"), reports.with_name(f"reports-{normalization}")
    if seed is not None:
        params["train"]["seed"] = seed
        models, reports = models.with_name(f"{models.name}-seed{seed}"), reports.with_name(f"{reports.name}-seed{seed}")
    start = time.perf_counter()
    card = train.train_model(params, "classifier", classes, split_train, split_val, models / "centralized")
    wall = time.perf_counter() - start
    table = evaluate.run(params, processed, parts, models, reports)
    row = table[table["run"] == "centralized/classifier"].iloc[0]
    print(f"\nBENCH classifier ({card['model']}, {normalization} normalization, train.seed {params['train']['seed']}, "
          f"{len(split_train)} train / "
          f"{len(split_val)} val / "
          f"{row['test_images']} test images, {len(card['history']['loss'])} epochs): "
          f"test accuracy {row['accuracy']:.4f} (target 0.95), macro F1 {row['macro_f1']:.4f} (target 0.94), "
          f"train wall time {wall / 60:.1f} min on {os.cpu_count()} cores", flush=True)


def bench_evaluate() -> None:
    params = params_for(SHARED / "brain-tumor-mri" / "Training")
    processed, parts = prepare("brain-tumor-mri", SHARED / "brain-tumor-mri" / "Training", params)
    table = evaluate.run(params, processed, parts, WORK / "brain-tumor-mri" / "models",
                         WORK / "brain-tumor-mri" / "reports")
    columns = [c for c in ("run", "accuracy", "epsilon", "mia_auc", "mia_loss_auc", "mia_tpr_at_1pct_fpr",
                           "mia_accuracy_gap") if c in table.columns]
    print("\nBENCH evaluate (brain-tumor-mri):\n" + table[columns].to_string(index=False), flush=True)


def bench_segmenter() -> None:
    root = SHARED / "lgg-mri-segmentation" / "kaggle_3m"
    params = params_for(root)
    processed, parts = prepare("lgg-mri-segmentation", root, params)
    classes = load_classes(processed)
    split_train, split_val = load_split(processed, parts, "train"), load_split(processed, parts, "val")
    models = WORK / "lgg-mri-segmentation" / "models"
    start = time.perf_counter()
    card = train.train_model(params, "segmenter", classes, split_train, split_val, models / "centralized")
    wall = time.perf_counter() - start
    table = evaluate.run(params, processed, parts, models, WORK / "lgg-mri-segmentation" / "reports")
    row = table[table["run"] == "centralized/segmenter"].iloc[0]
    detail = json.loads((WORK / "lgg-mri-segmentation" / "reports" / "evaluation.json").read_text())
    metrics = detail["centralized/segmenter"]["metrics"]
    print(f"\nBENCH segmenter (unet, patients split, {len(split_train)} train slices, "
          f"{len(card['history']['loss'])} epochs): mean Dice on {metrics['tumour_slices']} test tumour slices "
          f"{metrics['dice_tumour_slices']:.4f} (target 0.80), HD95 on them {metrics['hd95_tumour_slices']:.2f} px; "
          f"per patient: Dice {row['dice']:.4f}, HD95 {row['hd95']:.2f} px (128x128 pixels); "
          f"missed tumour slices {metrics['missed_tumour_slices']}; train wall time {wall / 60:.1f} min", flush=True)


def bench_throughput(rounds: int = 4, epochs: int = 3) -> None:
    """Same model object, same training images: fedbrain's fit (tf.data, augmentation, class
    weights, schedule) vs Keras' own model.fit on the arrays, alternated ``rounds`` times.

    The machine's 2 cores are shared, so single timings swing by 2-3x: each method's rate is
    taken from its fastest epoch (the least disturbed one; first epochs, which trace, excluded)
    and the median is printed beside it.
    """
    import numpy as np
    import tensorflow as tf

    from fedbrain.models import build_model

    params = params_for(SHARED / "brain-tumor-mri" / "Training")
    processed, parts = prepare("brain-tumor-mri", SHARED / "brain-tumor-mri" / "Training", params)
    split = load_split(processed, parts, "train")
    # A fixed subset keeps this part to minutes; both loops see exactly the same images.
    keep = np.random.default_rng(0).permutation(len(split))[:640]
    split = type(split)(split.images[keep], split.labels[keep], None,
                        [split.image_ids[i] for i in keep], [split.patient_ids[i] for i in keep])
    opts = params["train"]["classifier"]
    batch = opts["batch_size"]

    class Timer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)

    model = build_model(opts["model"], split.images.shape[1:], 4)
    train.compile_model(model, "classification", opts["learning_rate"], label_smoothing=opts["label_smoothing"])
    images = math.ceil(len(split) / batch) * batch
    y = tf.keras.utils.to_categorical(split.labels, 4)
    times = {"bare model.fit": [], "fedbrain fit": []}
    for _ in range(rounds):
        for name in times:
            timer = Timer()
            if name == "bare model.fit":
                model.fit(split.images, y, batch_size=batch, epochs=epochs, shuffle=True, callbacks=[timer], verbose=0)
            else:
                train.fit(model, split, None, "classification", opts, epochs, seed=0, callbacks=[timer], verbose=0)
            times[name] += timer.times[1:]
    for name, values in times.items():
        print(f"  {name}: best {images / min(values):.1f} images/s, median {images / float(np.median(values)):.1f} "
              f"(epochs {[round(t, 1) for t in values]} s)", flush=True)
    ours, bare = images / min(times["fedbrain fit"]), images / min(times["bare model.fit"])
    print(f"\nBENCH throughput ({opts['model']}, {len(split)} images, batch {batch}, augmentation on): "
          f"fedbrain fit {ours:.1f} img/s, bare model.fit {bare:.1f} img/s, ratio {ours / bare:.3f} (target 0.9); "
          f"median ratio {float(np.median(times['bare model.fit'])) / float(np.median(times['fedbrain fit'])):.3f}",
          flush=True)


if __name__ == "__main__":
    import argparse

    PARTS = {"classifier": lambda: bench_classifier(seed=args.seed), "segmenter": bench_segmenter,
             "throughput": bench_throughput, "evaluate": bench_evaluate,
             "classifier-group": lambda: bench_classifier("group", args.seed)}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="part", help=" | ".join(PARTS))
    parser.add_argument("--seed", type=int, help="train.seed for the classifiers (into models-seedS/)")
    args = parser.parse_args()
    if unknown := [part for part in args.parts if part not in PARTS]:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for part in args.parts or ["throughput", "classifier", "segmenter"]:
        PARTS[part]()
