"""Are the bench classifiers' probabilities calibrated? ECE and Brier before and after temperature scaling (not a test).

  .venv/bin/python bench/reliability.py [--models DIR]

For build/bench/brain-tumor-mri/models/centralized/classifier.keras and every
federated/*/classifier.keras beside it (bench/centralized.py, bench/federated.py and bench/variants.py
leave them), on bench/centralized.py's processed data and partition: the temperature and where it
came from (the model's card, or fitted here on the validation split when the card has none, as
`fedbrain evaluate` does), the test split's expected calibration error (15 equal-width bins) and
Brier score before and after temperature scaling. The baseline is the same model's probabilities
as trained, in the same run. Target: test ECE after scaling <= 0.03 for the centralized and the
federated classifier. Reliability diagrams and Grad-CAM galleries go to
build/bench/brain-tumor-mri/reports/reliability-bench/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import centralized  # noqa: E402  (bench/centralized.py: WORK)

from fedbrain import evaluate  # noqa: E402
from fedbrain.dataset import load_classes, load_split  # noqa: E402

DATA = centralized.WORK / "brain-tumor-mri"
TARGET = 0.03


def classifiers(models: Path) -> list[Path]:
    found = [models / "centralized" / "classifier.keras"] + sorted((models / "federated").glob("*/classifier.keras"))
    return [path for path in found if path.is_file()]


def main(models: Path) -> None:
    processed, parts = DATA / "processed", DATA / "partition"
    if not (parts / "splits.parquet").is_file():
        sys.exit(f"{parts}: no partition; run bench/centralized.py classifier first")
    paths = classifiers(models)
    if not paths:
        sys.exit(f"{models}: no centralized/classifier.keras or federated/*/classifier.keras; "
                 "run bench/centralized.py classifier (and bench/federated.py classifier) first")
    classes = list(load_classes(processed)["classes"])
    test, val = load_split(processed, parts, "test"), load_split(processed, parts, "val")
    settings = {"threshold": 0.5, "overlays": 0, "batch_size": 64}
    plots = DATA / "reports" / "reliability-bench"
    print(f"BENCH reliability: brain-tumor-mri, {len(test)} test / {len(val)} val images, "
          f"{len(paths)} classifier(s) under {models}")
    for path in paths:
        result = evaluate.evaluate_model(path, models, test, classes, settings, plots, val=val)
        info, metrics = result["info"], result["metrics"]
        met = "met" if metrics["ece_calibrated"] <= TARGET else "NOT met"
        print(f"  {info['run']} ({info['model']}, accuracy {metrics['accuracy']:.4f}): temperature "
              f"{info['temperature']:.3f} ({info['temperature_source']}); test ECE {metrics['ece']:.4f} -> "
              f"{metrics['ece_calibrated']:.4f} (target <= {TARGET}: {met}); Brier {metrics['brier']:.4f} -> "
              f"{metrics['brier_calibrated']:.4f}", flush=True)
    print(f"  reliability diagrams and explanation galleries: {plots}/<run>/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=DATA / "models")
    args = parser.parse_args()
    main(args.models)
