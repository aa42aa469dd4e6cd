"""Networks small enough that a federated test's time goes to Flower, not to TensorFlow tracing.

Named in a test's params as ``model: "tiny_model:build"``; the tests put this folder on the
PYTHONPATH of the SuperLink and SuperNodes they start, as a user would install their own model.
``build`` has a BatchNormalization layer (so runs exercise the statistics calibration, one more
message per round); ``build_plain`` has none (no calibration phase: faster); ``build_slow`` is ``build_plain``
with slow training steps (the crash test kills a hospital while it trains); ``build_segmenter`` maps an image to
a tumour mask.
"""

import time

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


@tf.keras.utils.register_keras_serializable(package="tiny_model")
class SlowTrainingStep(tf.keras.layers.Layer):
    """The identity, but each training step waits SLOW_STEP_S (inference does not)."""

    def call(self, x, training=None):
        if not training:
            return x
        pause = tf.numpy_function(lambda: np.float32(time.sleep(SLOW_STEP_S) or 0.0), [], tf.float32)
        return x + pause


def build_slow(input_shape, num_classes):
    """`build_plain` whose training steps take SLOW_STEP_S each."""
    inputs = tf.keras.Input(input_shape, name="image")
    model = build_plain(input_shape, num_classes)
    return tf.keras.Model(inputs, model(SlowTrainingStep()(inputs)), name="tiny_slow")
