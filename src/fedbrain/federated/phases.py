"""Where a hospital's message goes: the seconds of each part of its handling (bench/round_cost.py).

Every ClientApp reply carries them as ``phase-<name>-s`` (and ``phase-handler-s``, the whole
handling timed by its own clock, so that a part nobody timed shows up as a gap); the server keeps
them per hospital and round (MLflow ``hospital_<k>/phase_<name>_s``). They are timings of this
process, never averaged into the model's metrics.

A round's local training is split the same way: its first epoch (the one that pays for any
tracing), the median of the others (the steady compute an epoch costs), and the rest of ``fit``
(datasets, callbacks); then the one validation of the weights the hospital sends.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

PREFIX = "phase-"
HANDLER = f"{PREFIX}handler-s"


def is_phase(key: str) -> bool:
    return key.startswith(PREFIX)


class Phases:
    """Seconds per named phase of one message, from its arrival in the handler."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def add_fit(self, timer, total: float) -> None:
        """Split `total`, the seconds of one `fit`, into the parts `timer` (a fit_timer()) saw."""
        epochs = timer.epochs
        self.add("fit-first-epoch", epochs[0] if epochs else 0.0)
        self.add("fit-other-epochs", sum(epochs[1:]))
        self.add("fit-setup", total - sum(epochs))

    def metrics(self, timer=None) -> dict[str, float]:
        out = {f"{PREFIX}{name}-s": seconds for name, seconds in self.seconds.items()}
        if timer is not None and len(timer.epochs) > 1:
            # Not a phase of its own (it is inside fit-other-epochs): what an epoch costs once warm.
            out["steady-epoch-s"] = statistics.median(timer.epochs[1:])
        out[HANDLER] = time.perf_counter() - self.start
        return out


def fit_timer():
    """A Keras callback timing each epoch (a hospital's local fit has no validation split: it
    validates once after fit, its phase `local-validation`)."""
    import tensorflow as tf

    class FitTimer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[float] = []
            self._clock = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._clock = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(time.perf_counter() - self._clock)

    return FitTimer()
