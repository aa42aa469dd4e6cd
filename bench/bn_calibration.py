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
from fedbrain.federated.server_app import pool_batch_norm_statistics  # noqa: E402
from fedbrain.federated.task import set_batch_norm_statistics  # noqa: E402
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


def moments(images: np.ndarray, taps, training: bool, batch: int) -> list:
    """Per tapped layer input: mean and variance over `images` ([mean_1, var_1, ...], the order of
    the federation's statistics), from per-batch sums of x and x^2."""
    sums = None
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        outs = taps(x, training=training)
        outs = outs if isinstance(outs, list) else [outs]
        values = [o.numpy().reshape(-1, o.shape[-1]).astype(np.float64) for o in outs]
        batch_sums = [(v.mean(0) * len(x), (v ** 2).mean(0) * len(x)) for v in values]
        sums = batch_sums if sums is None else [(a + c, b + d) for (a, b), (c, d) in zip(sums, batch_sums)]
    stats = []
    for first, second in sums:
        mean = first / len(images)
        stats += [mean, np.maximum(second / len(images) - mean ** 2, 0.0)]
    return stats


def training_mode(model, layers, images: np.ndarray, batch: int) -> list:
    return moments(images, tf.keras.Model(model.input, [layer.input for layer in layers]), True, batch)


def layer_by_layer(model, layers, hospitals: list[np.ndarray], weights: list[int]) -> None:
    for layer in layers:
        tap = tf.keras.Model(model.input, layer.input)
        per_hospital = [(n, moments(x, tap, False, 64)) for n, x in zip(weights, hospitals)]
        mean, variance = pool_batch_norm_statistics(per_hospital)
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

    print(f"BENCH bn_calibration {model_path}: hospitals {weights} training images, val {len(val)}, test {len(test)}, "
          f"{len(layers)} BatchNormalization layers", flush=True)
    print(f"  baseline, as the federation saved it: {scores()}", flush=True)
    start = time.perf_counter()
    for n in (SAMPLE, 0):
        images = [sample(t.images, n) for t in trains]
        for batch in (8, 32, 128):
            set_batch_norm_statistics(model, pool_batch_norm_statistics(
                [(n, training_mode(model, layers, x, batch)) for n, x in zip(weights, images)]))
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
