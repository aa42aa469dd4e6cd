"""Does a fixed wavelet front end make DP-SGD useful at epsilon 8? (not a test; issue 12's lead)

  .venv/bin/pip install kymatio==0.3.0      # not a project dependency (yet)
  PYTHONPATH=src .venv/bin/python bench/dp_features.py [--data build/bench/brain-tumor-mri]
      [--examples 1500] [--epochs 20] [--epsilon 8] [--only NAME ...]

Tramer & Boneh, "Differentially private learning needs better features (or much more data)",
ICLR 2021: on small datasets a linear model (or a small CNN) over a ScatterNet's fixed wavelet
features, trained by DP-SGD, beats end-to-end private CNNs; the features cost no privacy (nothing in
them is learned from the data). Here: Kymatio's 2-D scattering (Morlet wavelets, L = 8 angles, scale
J: 2^J downsampling, 1 + 8J + 32J(J-1) channels), a data-independent per-image normalisation
(GroupNormalization without weights), then a linear softmax layer or a small GroupNorm CNN, trained
with fedbrain's DP-SGD (fedbrain.privacy.dp_sgd: per-example clipping at 1.0, Gaussian noise) to
--epsilon at delta 1e-5 (the same RDP accountant as the federation). Same protocol as
bench/dp_settings.py: one hospital's worth of images (--examples, IID draw from the partition's
train split), scored on the pooled validation split; its table's width-16 cnn is the baseline.

The scattering is computed once per image (it has no weights, and DP runs without augmentation), so
only the head trains here. In a federation each hospital would do the same once per run: the
scattering of 1500 images takes ~30 s (J=2) to ~70 s (J=4) on 2 cores with TensorFlow's backend.

Kymatio 0.3.0 (2022, its latest release) imports scipy.special.sph_harm for its 3-D transform, which
SciPy 1.17 removed; the 2-D transform never calls it, so this bench sets a placeholder before the
import. Nothing else of Kymatio or SciPy is changed.
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

import dp_settings  # noqa: E402  (bench/dp_settings.py: subset, NO_AUGMENT, SEED)
from fedbrain.dataset import Split, load_split  # noqa: E402

layers = tf.keras.layers
# name: (J, head, batch, Adam rate, private); head: linear | pool<k> (k x k average first) | cnn<width>
SETTINGS = {
    "plain-J3-linear": (3, "linear", 256, 0.01, False),
    "dp-J3-linear": (3, "linear", 256, 0.01, True),
    "dp-J3-linear-lr5m": (3, "linear", 256, 0.005, True),
    "dp-J3-pool2": (3, "pool2", 256, 0.01, True),
    "dp-J2-cnn16": (2, "cnn16", 256, 0.01, True),
    "plain-J2-cnn16": (2, "cnn16", 256, 0.01, False),
    "plain-J4-linear": (4, "linear", 256, 0.01, False),
    "dp-J4-linear": (4, "linear", 256, 0.01, True),
}


def scattering(images: np.ndarray, J: int) -> np.ndarray:
    """Kymatio's 2-D scattering of grey images [N, H, W, 1] -> [N, H/2^J, W/2^J, channels]."""
    import scipy.special

    if not hasattr(scipy.special, "sph_harm"):  # see the module docstring: 3-D only, never called
        scipy.special.sph_harm = None
    try:
        from kymatio.keras import Scattering2D
    except ImportError as exc:
        raise SystemExit(f"this bench needs Kymatio: .venv/bin/pip install kymatio==0.3.0 ({exc})")
    inputs = tf.keras.Input(images.shape[1:])
    x = layers.Reshape(images.shape[1:3])(inputs)
    x = layers.Permute((2, 3, 1))(Scattering2D(J=J, L=8)(x))
    return tf.keras.Model(inputs, x).predict(images, batch_size=64, verbose=0)


def head(shape, kind: str, num_classes: int) -> tf.keras.Model:
    inputs = tf.keras.Input(shape)
    x = layers.GroupNormalization(groups=1, center=False, scale=False)(inputs)  # per image, no weights
    if kind.startswith("cnn"):
        width = int(kind[3:])
        for i, filters in enumerate((width, 2 * width, 4 * width)):
            x = layers.Conv2D(filters, 3, padding="same")(x)
            x = layers.Activation("relu")(layers.GroupNormalization(groups=min(8, filters))(x))
            x = layers.MaxPooling2D(2)(x) if i < 2 else layers.GlobalAveragePooling2D()(x)
    else:
        if kind.startswith("pool"):
            x = layers.AveragePooling2D(int(kind[4:]))(x)
        x = layers.Flatten()(x)
    return tf.keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


def run(name: str, train: Split, val: Split, epochs: int, epsilon: float) -> dict:
    _, kind, batch, rate, private = SETTINGS[name]
    tf.keras.utils.set_random_seed(dp_settings.SEED)
    model = head(train.images.shape[1:], kind, 4)
    result = dp_settings.train_and_score(model, train, val, epochs, epsilon, batch, rate, private, augment=False)
    return {"params": model.count_params(), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BENCH.parent / "build/bench/brain-tumor-mri")
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS))
    args = parser.parse_args()
    processed, partition = args.data / "processed", args.data / "partition"
    train = dp_settings.subset(load_split(processed, partition, "train"), args.examples, dp_settings.SEED)
    val = load_split(processed, partition, "val")
    print(f"{len(train)} training images (IID draw), {len(val)} validation images; epsilon {args.epsilon} at delta "
          f"1e-5 over {args.epochs} epochs (RDP, Poisson-sampling accountant)", flush=True)
    features: dict[int, tuple[Split, Split]] = {}
    for name in args.only or SETTINGS:
        J = SETTINGS[name][0]
        if J not in features:
            start = time.perf_counter()
            features[J] = tuple(Split(scattering(s.images, J), s.labels, None, s.image_ids, s.patient_ids)
                                for s in (train, val))
            print(f"scattering J={J}: {features[J][0].images.shape[1:]} per image, "
                  f"{time.perf_counter() - start:.0f} s for {len(train) + len(val)} images", flush=True)
        result = run(name, *features[J], args.epochs, args.epsilon)
        print(f"{name:20s} {result['params']:>8,d} weights, noise {result['noise']:.2f}: best val "
              f"{result['best']:.4f}, last {result['last']:.4f} ({result['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
