"""Does a fixed wavelet front end make DP-SGD useful at epsilon 8? (not a test; issue 12's lead)

  (Kymatio is a project dependency since the dp and secure variants train fedbrain.scattering's
  `scatter` classifier, this bench's dp-J4-linear; the bench keeps its own copy of the transform.)
  PYTHONPATH=src .venv/bin/python bench/dp_features.py [--data build/bench/brain-tumor-mri]
      [--examples 1500] [--epochs 20] [--epsilon 8] [--only NAME ...] [--federated R E [--dp-only]]

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

--federated R E: the same heads trained as FedAvg over the partition's hospitals (Dirichlet label
skew), in this process (not a Flower federation: the question is whether averaging private linear
heads keeps the one-hospital figure): R rounds of E local epochs, each hospital with its own Adam
state and its own DP-SGD plan to --epsilon over all R x E epochs of its images (its noise from its
size, as federated/task.py plans it), the rounds' rates decayed as federated.lr_decay cosine does,
local rates cosine within a round, the best local epoch on the hospital's validation images
returned (as fit does in the federation); the global model is the examples-weighted average.
Printed: the global model's pooled validation accuracy by round and its test accuracy, beside the
same federation without DP in the same run.

Kymatio 0.3.0 (2022, its latest release) imports scipy.special.sph_harm for its 3-D transform, which
SciPy 1.17 removed; the 2-D transform never calls it, so this bench sets the project's placeholder
(fedbrain.scattering.allow_kymatio_import) before the import. Nothing else of Kymatio or SciPy is changed.
"""

from __future__ import annotations

import argparse
import hashlib
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
    "dp-J4-linear-lr20m": (4, "linear", 256, 0.02, True),
    "dp-J4-linear-lr5m": (4, "linear", 256, 0.005, True),
    "dp-J4-linear-b512": (4, "linear", 512, 0.01, True),
    "dp-J4-linear-b512-lr20m": (4, "linear", 512, 0.02, True),
    "dp-J4-linear-b128": (4, "linear", 128, 0.01, True),
    # Weight-free normalisations of the J=4 features before the linear head: `order` standardises
    # each scattering order (1, 8J and 32J(J-1) channels) apart, per image; `log` takes log(x + 1e-3)
    # first; `logorder` both.
    "plain-J4-order": (4, "order", 256, 0.01, False),
    "dp-J4-order": (4, "order", 256, 0.01, True),
    "plain-J4-log": (4, "log", 256, 0.01, False),
    "dp-J4-log": (4, "log", 256, 0.01, True),
    "plain-J4-logorder": (4, "logorder", 256, 0.01, False),
    "dp-J4-logorder": (4, "logorder", 256, 0.01, True),
    # `order`, then a fixed Gaussian random projection of the 26,688 features to D (data-independent, the
    # same at every hospital: no privacy cost): DP-SGD's noise then fills 4 x D weights instead of 106,756.
    **{f"{p}-J4-order-rp{d}": (4, f"order-rp{d}", 256, 0.01, p == "dp") for p in ("plain", "dp")
       for d in (512, 1024, 2048, 4096)},
}


def _by_order(x, J: int = 4, L: int = 8):
    """Each scattering order's channels standardised apart, per image (no weights)."""
    bounds = [0, 1, 1 + L * J, x.shape[-1]]
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = x[..., lo:hi]
        mean, var = tf.nn.moments(part, axes=(1, 2, 3), keepdims=True)
        parts.append((part - mean) * tf.math.rsqrt(var + 1e-3))
    return tf.concat(parts, axis=-1)


def scattering(images: np.ndarray, J: int) -> np.ndarray:
    """Kymatio's 2-D scattering of grey images [N, H, W, 1] -> [N, H/2^J, W/2^J, channels]."""
    from fedbrain.scattering import allow_kymatio_import

    allow_kymatio_import()  # see the module docstring: sph_harm is 3-D only, never called
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
    x = inputs
    kind, _, projection = kind.partition("-rp")  # "order-rp1024": the `order` head over a 1,024-wide projection
    if kind in ("log", "logorder"):
        x = layers.Lambda(lambda t: tf.math.log(tf.maximum(t, 0.0) + 1e-3))(x)
    if kind in ("order", "logorder"):
        x = layers.Lambda(_by_order)(x)
    else:
        x = layers.GroupNormalization(groups=1, center=False, scale=False)(x)  # per image, no weights
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
        if projection:
            # A seeded initializer gives the same matrix at every call: every hospital and the scorer.
            x = layers.Dense(int(projection), use_bias=False, trainable=False, kernel_initializer=tf.keras.initializers.RandomNormal(
                stddev=1.0 / np.sqrt(x.shape[-1]), seed=20261207))(x)
    return tf.keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


def run(name: str, train: Split, val: Split, epochs: int, epsilon: float) -> dict:
    _, kind, batch, rate, private = SETTINGS[name]
    tf.keras.utils.set_random_seed(dp_settings.SEED)
    model = head(train.images.shape[1:], kind, 4)
    result = dp_settings.train_and_score(model, train, val, epochs, epsilon, batch, rate, private, augment=False)
    return {"params": model.count_params(), **result}


def cached_scattering(split: Split, J: int, cache: Path) -> Split:
    """`split` with its images replaced by their scattering, kept in `cache` (.npy) between calls; the
    file's name carries a digest of the split's image ids, so another partition never reads it."""
    digest = hashlib.sha256("\n".join(map(str, split.image_ids)).encode()).hexdigest()[:12]
    cache = cache.with_name(f"{cache.stem}-{digest}.npy")
    if cache.is_file():
        features = np.load(cache)
    else:
        start = time.perf_counter()
        features = scattering(split.images, J)
        np.save(cache, features)
        print(f"scattering J={J} of {len(split)} images: {time.perf_counter() - start:.0f} s -> {cache}", flush=True)
    return Split(features, split.labels, None, split.image_ids, split.patient_ids)


def federate(name: str, hospitals: list[tuple[Split, Split]], val: Split, test: Split, rounds: int,
             local_epochs: int, epsilon: float, private: bool) -> dict:
    """FedAvg of `name`'s head over the hospitals (see the module docstring): {by_round, test, noise}."""
    from fedbrain.privacy.dp_sgd import private_model
    from fedbrain.privacy.settings import PrivacySettings
    from fedbrain.train import compile_model, fit

    J, kind, batch, rate, _ = SETTINGS[name]
    models, noises = [], []
    for k, (train, _) in enumerate(hospitals):
        tf.keras.utils.set_random_seed(dp_settings.SEED + k)
        model = head(train.images.shape[1:], kind, 4)
        if private:
            plan = PrivacySettings.from_params({"privacy": {"mode": "example", "target_epsilon": epsilon}}) \
                .example_plan(len(train), batch, local_epochs, rounds=rounds)
            noises.append(plan.noise_multiplier)
            model = private_model(model, 1.0, plan.noise_multiplier)
        compile_model(model, "classification", rate, label_smoothing=0.1)
        models.append(model)
    tf.keras.utils.set_random_seed(dp_settings.SEED)
    global_weights = head(val.images.shape[1:], kind, 4).get_weights()
    scorer = head(val.images.shape[1:], kind, 4)
    compile_model(scorer, "classification", rate, label_smoothing=0.1)
    opts = {"batch_size": batch, "learning_rate": rate, "patience": local_epochs, "monitor": "val_loss",
            "warmup_epochs": 0, "lr_schedule": "cosine", "augment": dp_settings.NO_AUGMENT}
    by_round = []
    for server_round in range(1, rounds + 1):
        scale = 0.5 * (1.0 + np.cos(np.pi * (server_round - 1) / rounds))  # federated.lr_decay: cosine
        updates, sizes = [], []
        for k, ((train, own_val), model) in enumerate(zip(hospitals, models)):
            model.set_weights(global_weights)
            tf.keras.backend.set_value(model.optimizer.learning_rate, rate * scale)
            fit(model, train, own_val, "classification", opts, local_epochs, dp_settings.SEED + 1000 * server_round + k,
                class_weight=False, verbose=0)
            updates.append(model.get_weights())
            sizes.append(len(train))
        shares = np.asarray(sizes, np.float64) / sum(sizes)
        global_weights = [sum(s * u[i] for s, u in zip(shares, updates)).astype(np.float32)
                          for i in range(len(global_weights))]
        scorer.set_weights(global_weights)
        by_round.append(score(scorer, val))
        print(f"  {name} {'DP' if private else 'no DP'} round {server_round}/{rounds}: global val accuracy "
              f"{by_round[-1]:.4f}", flush=True)
    return {"by_round": by_round, "test": score(scorer, test), "noise": noises}


def score(model, split: Split) -> float:
    proba = model.predict(split.images, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(proba, axis=1) == split.labels))


def main_federated(args, processed: Path, partition: Path) -> None:
    from fedbrain.dataset import HOSPITAL_FOLDER

    names = args.only or ["dp-J4-linear"]
    count = sum(1 for p in partition.iterdir() if HOSPITAL_FOLDER.fullmatch(p.name))
    J = SETTINGS[names[0]][0]
    if any(SETTINGS[n][0] != J for n in names):
        raise SystemExit("--federated: name settings of one scattering scale J")
    cache = args.data / f"scattering-J{J}"
    cache.mkdir(exist_ok=True)
    hospitals = [tuple(cached_scattering(load_split(processed, partition, split, hospital=k), J,
                                         cache / f"hospital{k}-{split}.npy") for split in ("train", "val"))
                 for k in range(count)]
    val = cached_scattering(load_split(processed, partition, "val"), J, cache / "val.npy")
    test = cached_scattering(load_split(processed, partition, "test"), J, cache / "test.npy")
    rounds, epochs = args.federated
    print(f"{count} hospitals ({', '.join(str(len(t)) for t, _ in hospitals)} training images), {rounds} rounds x "
          f"{epochs} local epochs, epsilon {args.epsilon} at delta 1e-5 per hospital (RDP, Poisson-sampling "
          f"accountant); pooled val {len(val)}, test {len(test)}", flush=True)
    rows = []
    for name in names:
        for private in (False, True)[1 if args.dp_only else 0:]:
            start = time.perf_counter()
            result = federate(name, hospitals, val, test, rounds, epochs, args.epsilon, private)
            rows.append((name, private, result, time.perf_counter() - start))
    print(f"\n| head | DP | noise multipliers | global val accuracy after rounds 1 / {rounds // 2} / {rounds} "
          f"| test accuracy | seconds |\n| --- | --- | --- | --- | --- | --- |")
    for name, private, result, seconds in rows:
        curve = result["by_round"]
        print(f"| {name} | {'epsilon ' + str(args.epsilon) if private else 'none'} | "
              f"{', '.join(f'{n:.2f}' for n in result['noise']) or '-'} | {curve[0]:.3f} / {curve[rounds // 2 - 1]:.3f}"
              f" / {curve[-1]:.3f} | **{result['test']:.4f}** | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BENCH.parent / "build/bench/brain-tumor-mri")
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS))
    parser.add_argument("--federated", nargs=2, type=int, metavar=("ROUNDS", "LOCAL_EPOCHS"))
    parser.add_argument("--dp-only", action="store_true", help="--federated: skip the runs without DP")
    args = parser.parse_args()
    processed, partition = args.data / "processed", args.data / "partition"
    if args.federated:
        return main_federated(args, processed, partition)
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
