"""Seconds per Grad-CAM explanation, against one plain prediction (not a test).

  .venv/bin/python bench/explain.py [--model PATH] [--images N]

Loads a classifier (default build/bench/brain-tumor-mri/models/centralized/classifier.keras, which
bench/centralized.py leaves; without it an untrained `cnn` from fedbrain.models.build_model at
params.yaml's preprocess.size: the same network, so the same cost to explain), takes N test images
(bench/centralized.py's processed brain-tumor-mri test split when present, else data/sample's
JPEGs through predict's reader), warms up, then times each image twice, interleaved: the baseline,
a plain ``model(x)`` prediction of that one image, and its explanation as `fedbrain predict
--explain` makes it (heat map of the predicted class + overlay PNG written). Prints the medians and
their ratio. Target: <= 0.5 s per explanation on the 2-core machine, model loaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import centralized  # noqa: E402  (bench/centralized.py: WORK, PROJECT)

import numpy as np  # noqa: E402

from fedbrain.config import load_params  # noqa: E402

DATA = centralized.WORK / "brain-tumor-mri"
DEFAULT_MODEL = DATA / "models" / "centralized" / "classifier.keras"
WARM_UP = 3


def load_classifier(path: Path):
    import tensorflow as tf

    from fedbrain.models import build_model

    if path.is_file():
        return tf.keras.models.load_model(path, compile=False), str(path)
    size = load_params(centralized.PROJECT / "params.yaml")["preprocess"]["size"]
    return build_model("cnn", (size, size, 1), 4), f"untrained cnn ({path} absent)"


def test_images(model, count: int) -> tuple[np.ndarray, str]:
    from fedbrain.dataset import load_split

    processed, parts = DATA / "processed", DATA / "partition"
    if (parts / "splits.parquet").is_file():
        images = load_split(processed, parts, "test").images[:count]
        if images.shape[1:] == tuple(model.input_shape[1:]):
            return images, f"brain-tumor-mri test split ({processed})"
    from fedbrain.predict import read_input

    _, size, _, channels = model.input_shape
    files = sorted((centralized.PROJECT / "data" / "sample" / "brain-tumor-mri").rglob("*.jpg"))
    chosen = files[::max(1, len(files) // count)][:count]
    preprocess = load_params(centralized.PROJECT / "params.yaml")["preprocess"]
    return np.stack([read_input(str(f), size, channels, preprocess, None)[0] for f in chosen]), "data/sample JPEGs"


def main(model_path: Path, count: int) -> None:
    from fedbrain.explain import GradCam, write_overlay

    model, described = load_classifier(model_path)
    images, source = test_images(model, count)
    explainer = GradCam(model)  # once, as predict does after loading the model
    out = Path(tempfile.mkdtemp(prefix="fedbrain-bench-explain-"))

    def predict(i: int) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        proba = model(images[i:i + 1], training=False).numpy()[0]
        return time.perf_counter() - started, proba

    def explain(i: int, proba: np.ndarray) -> tuple[float, float]:
        """(seconds of the heat map, seconds of the overlay PNG)."""
        started = time.perf_counter()
        predicted = int(np.argmax(proba))
        heatmap = explainer(images[i:i + 1], np.array([predicted]))[0][0]
        mapped = time.perf_counter()
        write_overlay(images[i], heatmap, f"class {predicted} p={proba[predicted]:.2f}", out / f"{i}_gradcam.png")
        return mapped - started, time.perf_counter() - mapped

    for i in range(min(WARM_UP, len(images))):  # tracing, first-call allocations, matplotlib's fonts
        explain(i, predict(i)[1])
    parts, predicted = [], []
    for i in range(len(images)):
        seconds, proba = predict(i)
        predicted.append(seconds)
        parts.append(explain(i, proba))
    explained = [heatmap + png for heatmap, png in parts]
    seconds, baseline = statistics.median(explained), statistics.median(predicted)
    print(f"BENCH explain: {described}, layer {explainer.layer.name}, {len(images)} images "
          f"{images.shape[1]}x{images.shape[2]}x{images.shape[3]} from {source}, {os.cpu_count()} cores")
    print(f"  Grad-CAM explanation (heat map + overlay PNG): median {seconds:.3f} s per image "
          f"(max {max(explained):.3f} s; target <= 0.5 s): heat map {statistics.median(h for h, _ in parts):.3f} s, "
          f"PNG {statistics.median(p for _, p in parts):.3f} s")
    print(f"  baseline, model(x) of one image: median {baseline:.4f} s -> explanation = {seconds / baseline:.1f}x "
          f"a prediction")
    print(f"  overlays in {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=30)
    args = parser.parse_args()
    main(args.model, args.images)
