"""Networks small enough that a federated test's time goes to Flower, not to TensorFlow tracing.

Named in a test's params as ``model: "tiny_model:build"``; the tests put this folder on the
PYTHONPATH of the SuperLink and SuperNodes they start, as a user would install their own model.
``build`` has a BatchNormalization layer (so runs exercise the statistics calibration, one more
message per round); ``build_plain`` has none (no calibration phase: faster); ``build_slow`` is ``build_plain``
with slow training steps that a test can hold (the crash test kills a hospital while it trains); ``build_segmenter`` maps an image to
a tumour mask.
"""

import os
import time
from pathlib import Path

import numpy as np
import tensorflow as tf


def build(input_shape, num_classes, batch_norm: bool = True):
    inputs = tf.keras.Input(input_shape, name="image")
    x = tf.keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=not batch_norm)(inputs)
    if batch_norm:
        x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.Activation("relu")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="tiny")


def build_plain(input_shape, num_classes):
    return build(input_shape, num_classes, batch_norm=False)


def build_segmenter(input_shape, num_classes):
    """A tumour-probability map the size of the image (num_classes is unused: one sigmoid mask)."""
    inputs = tf.keras.Input(input_shape, name="image")
    x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = tf.keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return tf.keras.Model(inputs, outputs, name="tiny_segmenter")


def build_group(input_shape, num_classes):
    """`build` with GroupNormalization instead of BatchNormalization: the form DP training needs."""
    inputs = tf.keras.Input(input_shape, name="image")
    x = tf.keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = tf.keras.layers.GroupNormalization(groups=2)(x)
    x = tf.keras.layers.Activation("relu")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="tiny_group")


# Seconds every training step of `build_slow` sleeps: the crash test must find its hospital still
# training when it kills it, and the tiny model alone trains a round in well under its 0.5 s poll.
SLOW_STEP_S = 1.5


# The crash test's barrier, so that its kill provably lands while a hospital trains: when the folder
# $TINY_MODEL_HOLD_DIR holds `<pid>.hold` (text: a number of steps N), the process with that pid stops
# inside its first training step after N, writes `<pid>.holding` and waits there until the hold file
# goes (or the process is killed). Other processes train on.
HOLD_DIR = "TINY_MODEL_HOLD_DIR"
_steps = 0


def _training_step() -> np.float32:
    global _steps
    _steps += 1
    if folder := os.environ.get(HOLD_DIR):
        hold = Path(folder) / f"{os.getpid()}.hold"
        if hold.is_file() and _steps > int(hold.read_text()):
            (Path(folder) / f"{os.getpid()}.holding").write_text(str(_steps))
            while hold.is_file():
                time.sleep(0.05)
    time.sleep(SLOW_STEP_S)
    return np.float32(0.0)


@tf.keras.utils.register_keras_serializable(package="tiny_model")
class SlowTrainingStep(tf.keras.layers.Layer):
    """The identity, but each training step waits SLOW_STEP_S, or at a hold (above); inference does not."""

    def call(self, x, training=None):
        if not training:
            return x
        return x + tf.numpy_function(_training_step, [], tf.float32)


def build_slow(input_shape, num_classes):
    """`build_plain` whose training steps take SLOW_STEP_S each."""
    inputs = tf.keras.Input(input_shape, name="image")
    model = build_plain(input_shape, num_classes)
    return tf.keras.Model(inputs, model(SlowTrainingStep()(inputs)), name="tiny_slow")
