"""Which DP-SGD settings make a private classifier useful at epsilon 8 (not a test).

  PYTHONPATH=src .venv/bin/python bench/dp_settings.py [--data build/bench/brain-tumor-mri]
      [--examples 1500] [--epochs 20] [--epsilon 8] [--only NAME ...]

One hospital's worth of images (``--examples`` drawn at random from the partition's train split,
IID, the size of the full set's larger hospitals) trained by DP-SGD to ``--epsilon`` at delta 1e-5
with each setting below, then scored on the pooled validation split (825 images). The baseline,
measured in the same run on the same images: the same network trained without DP. The federation
averages three such hospitals' noisy updates (the noise of the average is 1/sqrt(3) of one
hospital's), so a setting's single-hospital accuracy is a pessimistic proxy of its federated one.

Why these settings: the noise added to a batch's mean gradient has standard deviation
sigma * clip / batch per weight, so at batch 32 on the 2.8M-weight cnn its norm is ~50 times the
clipped signal's. Larger batches cut sigma / batch (sigma rises much more slowly than the batch
at the same epsilon), and a narrower network has fewer coordinates for the noise to fill.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from fedbrain.dataset import Split, load_split  # noqa: E402
from fedbrain.models import compact_cnn  # noqa: E402
from fedbrain.privacy.dp_sgd import private_model  # noqa: E402
from fedbrain.privacy.settings import PrivacySettings  # noqa: E402
from fedbrain.train import compile_model, fit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED = 42
# name: (cnn width, batch size, Adam learning rate, augment, private[, pretrained on LGG, trained layers])
SETTINGS = {
    "plain-w32-b32": (32, 32, 0.002, True, False),
    "dp-w32-b32": (32, 32, 0.002, True, True),
    "dp-w32-b256": (32, 256, 0.002, True, True),
    "dp-w16-b256": (16, 256, 0.002, True, True),
    "dp-w8-b256": (8, 256, 0.002, True, True),
    "dp-w16-b256-lr5": (16, 256, 0.005, True, True),
    "dp-w16-b256-noaug": (16, 256, 0.002, False, True),
    "plain-w16-b256": (16, 256, 0.002, True, False),
    "dp-w16-b256-lr10-noaug": (16, 256, 0.01, False, True),
    "dp-w8-b256-lr10-noaug": (8, 256, 0.01, False, True),
    "dp-w16-b512-lr10-noaug": (16, 512, 0.01, False, True),
    "dp-w16-b128-lr5-noaug": (16, 128, 0.005, False, True),
    "plain-w16-b256-lr10-noaug": (16, 256, 0.01, False, False),
    "dp-w16-b256-lr10-noaug-lgg-all": (16, 256, 0.01, False, True, True, "all"),
    "dp-w16-b256-lr10-noaug-lgg-head": (16, 256, 0.01, False, True, True, "head"),
    "plain-w16-b256-lr10-noaug-lgg-head": (16, 256, 0.01, False, False, True, "head"),
}
LGG = ROOT.parent / "shared/data/lgg-mri-segmentation/kaggle_3m"


def lgg_slices(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Public pretraining data: TCGA-LGG FLAIR slices (grey, [0, 1]) and tumour / no tumour labels."""
    from PIL import Image

    images, labels = [], []
    for mask_path in sorted(LGG.glob("*/*_mask.tif")):
        flair = Image.open(str(mask_path).replace("_mask", "")).getchannel(1).resize((size, size), Image.BILINEAR)
        images.append(np.asarray(flair, np.float32)[..., None] / 255.0)
        labels.append(int(np.asarray(Image.open(mask_path)).max() > 0))
    return np.stack(images), np.asarray(labels, np.int64)


_PRETRAINED = {}


def pretrained(width: int, size: int) -> list:
    """The cnn's weights after 10 ordinary epochs on the public LGG slices (tumour or not)."""
    if width not in _PRETRAINED:
        images, labels = lgg_slices(size)
        tf.keras.utils.set_random_seed(SEED)
        model = compact_cnn((size, size, 1), 2, width=width, normalization="group")
        compile_model(model, "classification", 0.002, label_smoothing=0.1)
        split = Split(images, labels, None, [str(i) for i in range(len(labels))], [None] * len(labels))
        history = fit(model, split, None, "classification", {"batch_size": 32, "learning_rate": 0.002}, 10, SEED,
                      verbose=0)
        print(f"pretrained width {width} on {len(labels)} LGG slices ({labels.mean():.2f} with tumour): "
              f"train accuracy {history['accuracy'][-1]:.3f}", flush=True)
        _PRETRAINED[width] = model.get_weights()[:-2]  # all but the 2-class head
    return _PRETRAINED[width]
NO_AUGMENT = {"rotation_deg": 0, "hflip": False, "vflip": False, "brightness": 0.0}


def subset(split: Split, count: int, seed: int) -> Split:
    rows = np.sort(np.random.default_rng(seed).choice(len(split), size=min(count, len(split)), replace=False))
    return Split(split.images[rows], split.labels[rows], None,
                 [split.image_ids[i] for i in rows], [split.patient_ids[i] for i in rows])


def run(name: str, train: Split, val: Split, epochs: int, epsilon: float) -> dict:
    width, batch, rate, augment, private, *transfer = SETTINGS[name]
    tf.keras.utils.set_random_seed(SEED)
    model = compact_cnn(train.images.shape[1:], 4, width=width, normalization="group")
    if transfer:
        model.set_weights(pretrained(width, train.images.shape[1]) + model.get_weights()[-2:])
        if transfer[1] == "head":
            for layer in model.layers[:-1]:
                layer.trainable = False
    result = train_and_score(model, train, val, epochs, epsilon, batch, rate, private, augment)
    return {"name": name, "width": width, "batch": batch, "lr": rate, "augment": augment,
            "noise": result["noise"], "params": model.count_params(), "best_val": result["best"],
            "last_val": result["last"], "seconds": result["seconds"],
            "noise_per_weight": result["noise"] / batch if private else 0.0}


def train_and_score(model, train: Split, val: Split, epochs: int, epsilon: float, batch: int, rate: float,
                    private: bool, augment: bool) -> dict:
    """Train `model` (by DP-SGD to `epsilon` when `private`) and score it on `val` each epoch:
    {noise, best, last, seconds}. bench/dp_features.py trains its heads with this too."""
    trainable, noise = model, 0.0
    if private:
        plan = PrivacySettings.from_params({"privacy": {"mode": "example", "target_epsilon": epsilon}}) \
            .example_plan(len(train), batch, epochs, rounds=1)
        noise = plan.noise_multiplier
        trainable = private_model(model, 1.0, noise)
    compile_model(trainable, "classification", rate, label_smoothing=0.1)
    opts = {"batch_size": batch, "learning_rate": rate, "patience": epochs, "monitor": "val_accuracy",
            "warmup_epochs": 2, "lr_schedule": "cosine", **({} if augment else {"augment": NO_AUGMENT})}
    start = time.perf_counter()
    history = fit(trainable, train, val, "classification", opts, epochs, SEED, class_weight=not private, verbose=0)
    return {"noise": noise, "best": max(history["val_accuracy"]), "last": history["val_accuracy"][-1],
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "build/bench/brain-tumor-mri")
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS))
    args = parser.parse_args()
    processed, partition = args.data / "processed", args.data / "partition"
    train = subset(load_split(processed, partition, "train"), args.examples, SEED)
    val = load_split(processed, partition, "val")
    print(f"{len(train)} training images (IID draw), {len(val)} validation images; epsilon {args.epsilon} "
          f"at delta 1e-5 over {args.epochs} epochs (RDP, Poisson-sampling accountant)", flush=True)
    results = []
    for name in args.only or SETTINGS:
        result = run(name, train, val, args.epochs, args.epsilon)
        results.append(result)
        print(f"{name:20s} width {result['width']:2d} ({result['params']:>9,d} weights) batch {result['batch']:3d} "
              f"lr {result['lr']:.3f} noise {result['noise']:.2f} (sigma/B {result['noise_per_weight']:.4f}) "
              f"best val {result['best_val']:.4f} last {result['last_val']:.4f} in {result['seconds']:.0f} s",
              flush=True)
    baselines = {r["width"]: r["best_val"] for r in results if r["noise"] == 0.0}
    for result in results:
        base = baselines.get(result["width"])
        if result["noise"] and base:
            print(f"{result['name']}: {100 * (result['best_val'] - base):+.1f} points vs plain width {result['width']}")


if __name__ == "__main__":
    main()
