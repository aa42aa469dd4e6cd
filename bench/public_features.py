"""Features learned from public data for the DP classifier? (issue 12's lead)

DP-SGD's noise fills every trained weight, so the dp variants train a linear head over fixed features
(the scatter classifier's wavelets: non-private ceiling 0.90-0.92, 0.78-0.79 at epsilon 8). Features
learned on public images cost no privacy. The only public tumour MRI here is TCGA-LGG: this takes a
U-Net trained on it (bench/segmenter_sites.py's fold models), its encoder's four stages pooled (mean
and max: 960 features, gray images repeated to three channels) as the features of the 4-class set, and
prints (1) a centralized non-private logistic regression on them (scikit-learn), the features' ceiling,
and (2) a simulation of the dp variant's federation on them in numpy: 3 hospitals (the bench partition),
10 rounds x 5 local epochs of Poisson-sampled batches of 256, per-example gradients clipped to 1, Gaussian
noise for each hospital's own epsilon 8 (fedbrain's privacy plan), FedAvg; the features standardised
with statistics of LGG slices only (public), and the same loop without noise beside it.

    .venv/bin/python bench/public_features.py [--unet build/bench/lgg-sites/fold-CS/epochs-32/models/centralized/segmenter.keras] [--rates 64 1024]
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
from fedbrain.privacy.settings import PrivacySettings  # noqa: E402

DATA = centralized.WORK / "brain-tumor-mri"
LGG = centralized.WORK / "lgg-sites" / "processed" / "images.npy"
UNET = centralized.WORK / "lgg-sites" / "fold-CS" / "epochs-32" / "models" / "centralized" / "segmenter.keras"
HOSPITALS, ROUNDS, EPOCHS, BATCH, CLIP, EPSILON = 3, 10, 5, 256, 1.0, 8.0


def encoder_features(unet: tf.keras.Model):
    stages = [layer for layer in unet.layers if isinstance(layer, tf.keras.layers.MaxPooling2D)]
    # Each stage's output before its pooling (but the first: 16 channels at full resolution), and the
    # bottleneck before the first up-sampling.
    taps = [stage.input for stage in stages[1:]]
    taps.append(next(layer for layer in unet.layers if isinstance(layer, tf.keras.layers.Conv2DTranspose)).input)
    model = tf.keras.Model(unet.input, taps)

    def of(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), 64):
            x = np.asarray(images[i:i + 64], np.float32)
            if x.shape[-1] == 1:
                x = np.repeat(x, 3, axis=-1)
            maps = model(x, training=False)
            out.append(np.concatenate([np.concatenate([m.numpy().mean((1, 2)), m.numpy().max((1, 2))], 1)
                                       for m in maps], 1))
        return np.concatenate(out).astype(np.float64)
    return of


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def federated_dp(hospitals, classes: int, rate: float, private: bool, seed: int = 0) -> np.ndarray:
    """The dp variant's loop on a linear softmax head (per-example gradients are exact here)."""
    rng = np.random.default_rng(seed)
    privacy = PrivacySettings.from_params({"privacy": {"mode": "example", "l2_norm_clip": CLIP, "target_epsilon": EPSILON,
                                                       "noise_multiplier": None, "delta": None,
                                                       "epsilon_budget": None, "accountant": "rdp"}})
    weights = np.zeros((hospitals[0][0].shape[1], classes))
    for r in range(ROUNDS):
        scale = 0.5 * (1 + np.cos(np.pi * r / ROUNDS))  # federated.lr_decay cosine
        updates = []
        for features, labels in hospitals:
            n = len(features)
            sigma = privacy.example_plan(n, BATCH, EPOCHS, ROUNDS).noise_multiplier
            local, targets = weights.copy(), np.eye(classes)[labels]
            for _ in range(int(np.ceil(EPOCHS * n / BATCH))):
                batch = np.nonzero(rng.random(n) < BATCH / n)[0]
                grads = features[batch][:, :, None] * (softmax(features[batch] @ local) - targets[batch])[:, None, :]
                if private:
                    norms = np.sqrt((grads ** 2).sum((1, 2)))
                    grads = grads / np.maximum(1.0, norms / CLIP)[:, None, None]
                    step = (grads.sum(0) + rng.normal(0.0, sigma * CLIP, local.shape)) / BATCH
                else:
                    step = grads.mean(0) if len(batch) else 0.0
                local -= rate * scale * step
            updates.append((n, local))
        weights = sum(n * w for n, w in updates) / sum(n for n, _ in updates)
    return weights


def main(unet_path: Path, rates: list[float]) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    processed, parts = DATA / "processed", DATA / "partition"
    of = encoder_features(load(unet_path))
    train, test = load_split(processed, parts, "train"), load_split(processed, parts, "test")
    f_train, f_test = of(train.images), of(test.images)
    print(f"BENCH public_features: {unet_path} encoder, {f_train.shape[1]} features; train {len(train)}, test "
          f"{len(test)}", flush=True)
    scaler = StandardScaler().fit(f_train)
    for c in (0.01, 0.1, 1.0):
        probe = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(f_train), train.labels)
        print(f"  centralized, non-private logistic regression (C {c}): test "
              f"{probe.score(scaler.transform(f_test), test.labels):.4f}", flush=True)
    public = of(np.load(LGG, mmap_mode="r")[::2])
    mean, std = public.mean(0), public.std(0) + 1e-6

    def standardised(f: np.ndarray) -> np.ndarray:  # public statistics only; one column for the bias
        z = (f - mean) / std / np.sqrt(f.shape[1])
        return np.concatenate([z, np.ones((len(z), 1))], 1)

    hospitals = []
    for k in range(HOSPITALS):
        split = load_split(processed, parts, "train", hospital=k)
        hospitals.append((standardised(of(split.images)), split.labels))
    z_test, classes = standardised(f_test), int(train.labels.max()) + 1
    for rate in rates:
        for private in (False, True):
            weights = federated_dp(hospitals, classes, rate, private)
            accuracy = float(np.mean(np.argmax(z_test @ weights, 1) == test.labels))
            print(f"  federated {ROUNDS} x {EPOCHS}, rate {rate:g}, "
                  f"{f'epsilon {EPSILON:g} per hospital' if private else 'no noise, no clipping'}: test {accuracy:.4f}",
                  flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", type=Path, default=UNET, help="a U-Net trained on public images (TCGA-LGG)")
    parser.add_argument("--rates", type=float, nargs="+", default=[64.0, 1024.0])
    args = parser.parse_args()
    main(args.unet, args.rates)
