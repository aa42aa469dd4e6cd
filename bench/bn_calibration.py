"""Does the way the federated classifier's BatchNorm statistics are measured move its accuracy?

The server gives the averaged weights BatchNorm statistics the hospitals measure on them
(federated.calibration_images, task.batch_norm_statistics: 128 training images per hospital, in
training mode at the hospitals' batch size, pooled by training images). Here the same weights get
other statistics and are scored on the shared val and test splits; the baseline is the model as the
federation saved it, scored in the same run:

- training mode (upstream layers on batch statistics, as in training and in the federation) at
  batches of 8, 32 and 128, on 128 and on all training images per hospital;
- layer by layer in inference mode: each layer's input measured with every upstream layer already
  on its new pooled statistics, what the network sees at test time (a federation would need one
  exchange per layer to do this; here it only asks whether it would matter).

    .venv/bin/python bench/bn_calibration.py build/bench/brain-tumor-mri/models/federated/<variant>/classifier.keras
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import centralized  # noqa: E402  (bench/centralized.py: WORK)

from fedbrain.dataset import load_split  # noqa: E402
from fedbrain.models import load  # noqa: E402

DATA = centralized.WORK / "brain-tumor-mri"
HOSPITALS = 3
SAMPLE = 128  # federated.calibration_images' default
SEED = 42


def sample(images, n: int) -> np.ndarray:
    """The federation's seeded sample of n images (all when n is 0), in stored order."""
    keep = (np.sort(np.random.default_rng(SEED).choice(len(images), n, replace=False)) if 0 < n < len(images)
            else np.arange(len(images)))
    return np.asarray(images[keep], np.float32)


def pooled(per_hospital: list[list[tuple]], weights: list[int]) -> list[tuple]:
    """Per layer, the hospitals' (mean, E[x^2]) pooled by training images -> (mean, variance)."""
    w = np.asarray(weights, float) / sum(weights)
    out = []
    for layer in range(len(per_hospital[0])):
        mean = sum(wk * stats[layer][0] for wk, stats in zip(w, per_hospital))
        second = sum(wk * stats[layer][1] for wk, stats in zip(w, per_hospital))
        out.append((mean, np.maximum(second - mean ** 2, 0.0)))
    return out


def moments(outputs, n: int, sums: list) -> None:
    for total, out in zip(sums, outputs):
        values = out.numpy().reshape(-1, out.shape[-1]).astype(np.float64)
        total[0] += values.mean(0) * n
        total[1] += (values ** 2).mean(0) * n


def training_mode(model, layers, images: np.ndarray, batch: int) -> list[tuple]:
    taps = tf.keras.Model(model.input, [layer.input for layer in layers])
    sums = [[0.0, 0.0] for _ in layers]
    for i in range(0, len(images), batch):
        moments(taps(images[i:i + batch], training=True), len(images[i:i + batch]), sums)
    return [(s[0] / len(images), s[1] / len(images)) for s in sums]


def layer_by_layer(model, layers, hospitals: list[np.ndarray], weights: list[int]) -> None:
    for layer in layers:
        tap = tf.keras.Model(model.input, layer.input)
        per_hospital = []
        for images in hospitals:
            sums = [[0.0, 0.0]]
            for i in range(0, len(images), 64):
                moments([tap(images[i:i + 64], training=False)], len(images[i:i + 64]), sums)
            per_hospital.append([(sums[0][0] / len(images), sums[0][1] / len(images))])
        (mean, variance), = pooled(per_hospital, weights)
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)


def main(model_path: Path) -> None:
    processed, parts = DATA / "processed", DATA / "partition"
    model = load(model_path)
    layers = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    trains = [load_split(processed, parts, "train", hospital=h) for h in range(HOSPITALS)]
    val, test = load_split(processed, parts, "val"), load_split(processed, parts, "test")
    weights = [len(t) for t in trains]

    def scores() -> str:
        accuracy = [float((model.predict(np.asarray(s.images, np.float32), batch_size=64, verbose=0).argmax(1)
                           == s.labels).mean()) for s in (val, test)]
        return f"val {accuracy[0]:.4f}  test {accuracy[1]:.4f}"

    def assign(stats) -> None:
        for layer, (mean, variance) in zip(layers, stats):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)

    print(f"BENCH bn_calibration {model_path}: hospitals {weights} training images, val {len(val)}, test {len(test)}, "
          f"{len(layers)} BatchNormalization layers", flush=True)
    print(f"  baseline, as the federation saved it: {scores()}", flush=True)
    start = time.perf_counter()
    for n in (SAMPLE, 0):
        images = [sample(t.images, n) for t in trains]
        for batch in (8, 32, 128):
            assign(pooled([training_mode(model, layers, x, batch) for x in images], weights))
            print(f"  training mode, {n or 'all'} images per hospital, batch {batch}: {scores()} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        if n:
            layer_by_layer(model, layers, images, weights)
            print(f"  layer by layer in inference mode, {n} images per hospital: {scores()} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a federated classifier.keras of bench/variants.py")
    main(parser.parse_args().model)
