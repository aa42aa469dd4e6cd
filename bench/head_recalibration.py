"""Is the federated classifier's gap in its output layer or in its features? (issue 15)

Under label skew a federated model's last layer is often the part that is off (CCVR: Luo et al. 2021,
"No Fear of Heterogeneity"; FedLC): the hospitals' features are fine and the classes' borders are
drawn from three different mixes. If so, re-fitting only the output layer would close most of the
gap to the centralized model. Per saved federated classifier, scored on the shared test and val splits:

- baseline: the model as the federation saved it;
- ccvr: the output layer fine-tuned on virtual features drawn from one Gaussian per class, whose mean
  and covariance are pooled from each hospital's sums over its own training images' features (the
  statistics a federation could exchange: per class, a sum, a sum of outer products and a count);
- oracle: the output layer fine-tuned on the real features of all training images pooled, which no
  federation may do: the most any re-fitting of the last layer could give.

    .venv/bin/python bench/head_recalibration.py build/bench/brain-tumor-mri/models/federated/<variant>/classifier.keras ...
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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import centralized  # noqa: E402  (bench/centralized.py: WORK)

from fedbrain.dataset import load_split  # noqa: E402
from fedbrain.models import load  # noqa: E402

DATA = centralized.WORK / "brain-tumor-mri"
HOSPITALS = 3
VIRTUAL_PER_CLASS = 2000
SEED = 0


def fine_tuned(kernel, bias, features, labels, epochs: int, rate: float):
    """The output layer (softmax over features @ kernel + bias) fine-tuned from its federated values."""
    tf.keras.utils.set_random_seed(SEED)
    head = tf.keras.Sequential([tf.keras.Input((kernel.shape[0],)),
                                tf.keras.layers.Dense(kernel.shape[1], activation="softmax")])
    head.layers[0].set_weights([kernel, bias])
    head.compile(tf.keras.optimizers.Adam(rate), "sparse_categorical_crossentropy")
    head.fit(features, labels, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    return head.layers[0].get_weights()


def main(model_paths: list[Path]) -> None:
    processed, parts = DATA / "processed", DATA / "partition"
    trains = [load_split(processed, parts, "train", hospital=h) for h in range(HOSPITALS)]
    val, test = load_split(processed, parts, "val"), load_split(processed, parts, "test")
    print(f"BENCH head_recalibration: hospitals {[len(t) for t in trains]} training images, val {len(val)}, "
          f"test {len(test)}", flush=True)
    rng = np.random.default_rng(SEED)
    for path in model_paths:
        model = load(path)
        output = model.get_layer("probabilities")
        # The output layer's input: the pooled features (dropout is off outside training).
        features = tf.keras.Model(model.input, output.input)

        def of(split):
            return features.predict(np.asarray(split.images, np.float32), batch_size=128, verbose=0)

        f_val, f_test = of(val), of(test)
        kernel, bias = output.get_weights()

        def scores(k, b) -> str:
            return (f"test {np.mean(np.argmax(f_test @ k + b, 1) == test.labels):.4f}  "
                    f"val {np.mean(np.argmax(f_val @ k + b, 1) == val.labels):.4f}")

        classes, dim = kernel.shape[1], kernel.shape[0]
        sums, outer, counts = np.zeros((classes, dim)), np.zeros((classes, dim, dim)), np.zeros(classes)
        pooled, labels = [], []
        for split in trains:  # what each hospital would send: per class, sums of x and x x^T, and a count
            f = of(split).astype(np.float64)
            for c in range(classes):
                mine = f[split.labels == c]
                sums[c] += mine.sum(0)
                outer[c] += mine.T @ mine
                counts[c] += len(mine)
            pooled.append(f)
            labels.append(split.labels)
        mean = sums / counts[:, None]
        covariance = outer / counts[:, None, None] - np.einsum("ki,kj->kij", mean, mean)
        virtual = np.concatenate([rng.multivariate_normal(mean[c], covariance[c], VIRTUAL_PER_CLASS, method="eigh")
                                  for c in range(classes)]).astype(np.float32)
        virtual_labels = np.repeat(np.arange(classes), VIRTUAL_PER_CLASS)
        print(f"{path}", flush=True)
        print(f"  {'baseline (as saved)':<46}{scores(kernel, bias)}", flush=True)
        for epochs, rate in ((10, 1e-3), (30, 1e-3), (10, 1e-2)):
            print(f"  {f'ccvr, {epochs} epochs at {rate:g}':<46}"
                  f"{scores(*fine_tuned(kernel, bias, virtual, virtual_labels, epochs, rate))}", flush=True)
        real = fine_tuned(kernel, bias, np.concatenate(pooled).astype(np.float32), np.concatenate(labels), 20, 1e-3)
        print(f"  {'oracle: the real pooled features, 20 epochs':<46}{scores(*real)}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+", help="federated classifier.keras files of bench/variants.py")
    main(parser.parse_args().models)
