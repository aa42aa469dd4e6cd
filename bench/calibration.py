"""BatchNormalization calibration: fedbrain's compiled step vs eager model calls (not a test).

  .venv/bin/python bench/calibration.py [classifier] [segmenter]   (default: both)

Every round each hospital measures the BatchNormalization statistics of the averaged weights on
its training data (fedbrain.federated.task.batch_norm_statistics, params.yaml's
federated.calibration_images), and that time is part of the round's orchestration overhead
(bench/federated.py). This times it on hospital 0 of bench/federated.py's partitions (real data,
freshly initialised model), against the baseline of calling the model eagerly batch by batch
(what batch_norm_statistics did before it was compiled; the rest of it unchanged), in the same
process and on the same images, and checks that both give the same statistics. Prints seconds
(data loading included, as in a round) and the speed-up.
The work folders are bench/federated.py's (build/bench/<dataset>/), built when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import centralized  # noqa: E402
import federated  # noqa: E402

import numpy as np  # noqa: E402

from fedbrain.federated import launcher, task  # noqa: E402
from fedbrain.federated.settings import FederatedSettings  # noqa: E402

HOSPITAL = 0
REPEATS = 3


def eager_step(model, layers: list):
    """The baseline: task._batch_statistics_step without tf.function, one eager call per batch."""
    def step(images):
        model(images, training=True)
        return [(layer.moving_mean, layer.moving_variance) for layer in layers]

    return step


def timed(model, settings: task.RunSettings, compiled: bool) -> tuple[list, float]:
    """task.batch_norm_statistics as it is, or with the eager step: (statistics, seconds)."""
    step = task._batch_statistics_step
    if not compiled:
        task._batch_statistics_step = eager_step
    try:
        stats, _, seconds = task.batch_norm_statistics(model, settings, HOSPITAL)
    finally:
        task._batch_statistics_step = step
    return stats, seconds


def settings_for(role: str) -> task.RunSettings:
    name, root, partition = federated.DATASETS[role]
    params = federated.bench_params(root, partition, role, {})
    processed, parts = centralized.prepare(name, root, params)
    federated.check_partition(parts, partition)
    fed = FederatedSettings.from_params(params)
    config = launcher.run_config(fed, params, role, processed, parts, centralized.WORK / "calibration",
                                 resume=False, secure=True)
    return task.RunSettings.from_run_config(config)


def bench(role: str) -> None:
    settings = settings_for(role)
    model = task.build(settings)
    images = settings.calibration_images or len(task.hospital_data(settings, HOSPITAL, "train"))
    # Both once untimed: tracing the compiled step, and TensorFlow's first-call costs for both.
    compiled_stats, _ = timed(model, settings, compiled=True)
    eager_stats, _ = timed(model, settings, compiled=False)
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(compiled_stats, eager_stats))
    times = {"compiled": [], "eager": []}
    for _ in range(REPEATS):  # interleaved: a busy moment on a shared machine hits both
        for kind in times:
            times[kind].append(timed(model, settings, compiled=kind == "compiled")[1])
    compiled, eager = min(times["compiled"]), min(times["eager"])
    print(json.dumps({role: {"model": settings.model, "hospital": HOSPITAL, "images": images,
                             "compiled_s": round(compiled, 2), "eager_s": round(eager, 2)}}))
    print(f"BENCH calibration {role} ({settings.model}, hospital {HOSPITAL}, {images} training images, best of "
          f"{REPEATS}): compiled {compiled:.2f} s, eager model calls (baseline) {eager:.2f} s, speed-up "
          f"{eager / compiled:.2f}x; largest difference between their statistics {difference:.2g}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", help="classifier and/or segmenter (default: both)")
    args = parser.parse_args()
    if unknown := set(args.parts) - set(federated.DATASETS):
        parser.error(f"unknown part(s) {sorted(unknown)}; use classifier and/or segmenter")
    for part in args.parts or ["classifier", "segmenter"]:
        bench(part)
