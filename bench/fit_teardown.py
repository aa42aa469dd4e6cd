"""What a hospital's `fit` costs outside its epochs when hospitals share the cores (not a test).

  PYTHONPATH=src .venv/bin/python bench/fit_teardown.py [--data build/bench/brain-tumor-mri]
      [--hospitals 3] [--fits 6] [--epochs 1]

A federation on one machine runs a process per hospital, each with one TensorFlow thread
(federated.hospital_threads: auto), and each round calls `fedbrain.train.fit` once per hospital.
This starts that many processes at once, each doing `--fits` fits of its hospital's training split
(the partition's, default cnn, batch 32), and times every fit's parts with Keras callbacks: the
epochs, the validation, and what is left after `on_train_end` until `fit` returns (the input
pipeline's teardown). It runs twice, one after the other, with the same processes and data:
  baseline  the input pipeline as it was before issue 22's fix: map(num_parallel_calls=AUTOTUNE),
            prefetch(AUTOTUNE), tf.data autotuning on
  project   fedbrain.train.make_dataset as it is now
and prints, per pipeline, each hospital's teardown seconds per fit, their total, and the slowest
hospital's total time; then project / baseline for the slowest hospital.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_hospital(data: Path, hospital: int, fits: int, epochs: int, baseline: bool) -> None:
    """Runs in a child process: prints one JSON line per fit."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT / "src"))
    import tensorflow as tf

    from fedbrain import train as train_module
    from fedbrain.dataset import load_split
    from fedbrain.models import compact_cnn

    if baseline:
        train_module.make_dataset = _baseline_make_dataset(tf, train_module.make_dataset)

    class Clock(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs, self.validation, self.end = 0.0, 0.0, None
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_test_begin(self, logs=None):
            now = time.perf_counter()
            self.epochs += now - self._start
            self._start = now

        def on_epoch_end(self, epoch, logs=None):
            self.validation += time.perf_counter() - self._start

        def on_train_end(self, logs=None):
            self.end = time.perf_counter()

    tf.keras.utils.set_random_seed(hospital)
    model = compact_cnn((128, 128, 1), 4)
    train_module.compile_model(model, "classification", 0.002, label_smoothing=0.1)
    train = load_split(data / "processed", data / "partition", "train", hospital=hospital)
    val = load_split(data / "processed", data / "partition", "val", hospital=hospital)
    for i in range(fits):
        clock = Clock()
        start = time.perf_counter()
        train_module.fit(model, train, val, "classification", {"batch_size": 32, "warmup_epochs": 0}, epochs, i,
                         callbacks=[clock], verbose=0)
        done = time.perf_counter()
        print(json.dumps({"hospital": hospital, "fit": i, "seconds": done - start, "epochs": clock.epochs,
                          "validation": clock.validation, "teardown": done - clock.end}), flush=True)


def _baseline_make_dataset(tf, original):
    """make_dataset with the pre-fix tail: the same indices, batches and load function, mapped
    with AUTOTUNE parallelism, AUTOTUNE prefetch and tf.data's autotuning on."""
    import inspect

    source = inspect.getsource(original)
    tail = "    options = tf.data.Options()"
    if tail not in source:
        raise SystemExit("fedbrain.train.make_dataset changed: update this bench's baseline")
    source = source[:source.index("    # One batch prepared ahead")] + \
        "    return batches.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)\n"
    namespace = dict(original.__globals__)
    exec(source, namespace)  # noqa: S102 - our own function's source, with its last lines replaced
    return namespace["make_dataset"]


def run(pipeline: str, args) -> list[dict]:
    children = [subprocess.Popen(
        [sys.executable, __file__, "--child", str(h), "--data", str(args.data), "--fits", str(args.fits),
         "--epochs", str(args.epochs)] + (["--baseline"] if pipeline == "baseline" else []),
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"})
        for h in range(args.hospitals)]
    rows = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode:
            raise SystemExit(f"{pipeline}: a hospital's process failed (exit {child.returncode})")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "build/bench/brain-tumor-mri")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--fits", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        one_hospital(args.data, args.child, args.fits, args.epochs, args.baseline)
        return
    print(f"{args.hospitals} hospitals at once ({os.cpu_count()} cores, 1 TensorFlow thread each), {args.fits} fits "
          f"of {args.epochs} epoch(s) each, {args.data}", flush=True)
    slowest = {}
    for pipeline in ("baseline", "project"):
        rows = run(pipeline, args)
        for h in range(args.hospitals):
            mine = [r for r in rows if r["hospital"] == h]
            teardown = [r["teardown"] for r in mine]
            print(f"  {pipeline:8s} hospital {h}: teardown per fit {' '.join(f'{t:.1f}' for t in teardown)} s "
                  f"(total {sum(teardown):.1f} s); fits {sum(r['seconds'] for r in mine):.1f} s, of which epochs "
                  f"{sum(r['epochs'] for r in mine):.1f} s", flush=True)
        slowest[pipeline] = max(sum(r["seconds"] for r in rows if r["hospital"] == h) for h in range(args.hospitals))
        print(f"  {pipeline:8s} slowest hospital's fits: {slowest[pipeline]:.1f} s", flush=True)
    print(f"BENCH fit teardown: slowest hospital, project / baseline {slowest['project'] / slowest['baseline']:.2f}x")


if __name__ == "__main__":
    main()
