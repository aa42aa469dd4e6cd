"""DP-SGD step time: fedbrain's fast per-example clipping vs ordinary training (not a test).

  .venv/bin/python bench/dp_step.py [--batch-size 32] [--size 128] [--repeats 20] [--stock-repeats 3] [--no-stock]

The default classifier in its DP form, build_model("cnn", (size, size, 1), 4,
normalization="group") (the brain-tumor-mri images are preprocessed to one grey channel), on
random images. Baseline (a): an ordinary Keras train step of that GroupNorm model with Adam.
Against it, in the same process, each after a warm-up step and timed interleaved (a busy moment
on a shared machine hits all): (b) fedbrain.privacy.dp_sgd.private_model's DP step (Adam);
(c) TF-Privacy's stock DPKerasAdamOptimizer (its vectorized jacobian, num_microbatches = batch
size) on the same model; (d) the BatchNorm cnn's ordinary step, the non-private default.
Prints median seconds per step (and the fastest and slowest), and the ratios b/a (target <= 2.0),
c/a and d/a. The GroupNorm model's ordinary step is bimodal here (~0.19 s or ~0.31 s per step
within one run, seen on an idle machine): take enough repeats for its median to settle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from fedbrain.models import build_model  # noqa: E402
from fedbrain.privacy.dp_sgd import private_model  # noqa: E402
from fedbrain.train import compile_model  # noqa: E402

CLASSES = 4
LEARNING_RATE = 1e-3
L2_NORM_CLIP, NOISE_MULTIPLIER = 1.0, 1.1


def steps(args) -> dict:
    """name -> a compiled model whose train_on_batch is the step to time."""
    shape = (args.size, args.size, 1)
    tf.keras.utils.set_random_seed(0)
    models = {"a_ordinary_groupnorm": compile_model(build_model("cnn", shape, CLASSES, normalization="group"),
                                                    "classification", LEARNING_RATE)}
    private = private_model(build_model("cnn", shape, CLASSES, normalization="group"), L2_NORM_CLIP, NOISE_MULTIPLIER)
    models["b_fedbrain_dp"] = compile_model(private, "classification", LEARNING_RATE)
    if not args.no_stock:
        from tensorflow_privacy import DPKerasAdamOptimizer

        optimizer = DPKerasAdamOptimizer(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
                                         num_microbatches=args.batch_size, learning_rate=LEARNING_RATE)
        models["c_tf_privacy_optimizer"] = compile_model(build_model("cnn", shape, CLASSES, normalization="group"),
                                                         "classification", LEARNING_RATE, optimizer=optimizer)
    models["d_ordinary_batchnorm"] = compile_model(build_model("cnn", shape, CLASSES), "classification", LEARNING_RATE)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of a, b and d")
    parser.add_argument("--stock-repeats", type=int, default=3, help="timed steps of c (seconds each)")
    parser.add_argument("--no-stock", action="store_true", help="skip (c), TF-Privacy's DP optimizer")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(args.batch_size, args.size, args.size, 1)).astype("float32"))
    y = tf.one_hot(rng.integers(0, CLASSES, args.batch_size), CLASSES)
    models = steps(args)
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up: tracing and first-call costs
        for _ in range(2):
            model.train_on_batch(x, y)
    for i in range(args.repeats):
        for name, model in models.items():
            if name.startswith("c_") and i >= args.stock_repeats:
                continue
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["a_ordinary_groupnorm"]
    print(json.dumps({"batch_size": args.batch_size, "size": args.size, "load_avg_1min": os.getloadavg()[0],
                      "median_step_s": {k: round(v, 4) for k, v in median.items()},
                      "min_max_step_s": {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()},
                      "repeats": {k: len(v) for k, v in times.items()}}))
    ratios = ", ".join(f"{name[2:]} {median[name] / base:.2f}x" for name in median if name != "a_ordinary_groupnorm")
    print(f"BENCH dp_step (cnn GroupNorm, batch {args.batch_size}, {args.size}x{args.size}x1, median of "
          f"{args.repeats}): ordinary step (baseline) {base * 1000:.0f} ms = {args.batch_size / base:.0f} images/s; "
          f"vs baseline: {ratios} (target for fedbrain_dp <= 2.0)", flush=True)


if __name__ == "__main__":
    main()
