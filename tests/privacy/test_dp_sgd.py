"""DP-SGD: the fast per-example norms and clipped sums equal one-example-at-a-time references;
a fit step through fedbrain.train trains; models the clipping cannot cover exactly are refused."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions.dense import dense_layer_computation

from fedbrain.dataset import Split
from fedbrain.errors import InputError
from fedbrain.privacy.clipping import make_layer_registry
from fedbrain.privacy.dp_sgd import plain_model, private_model
from fedbrain.train import DiceBCELoss, compile_model, fit

layers = tf.keras.layers
SIZE, CLASSES = 16, 3


def every_layer_kind(seed: int = 0) -> tf.keras.Model:
    """Conv2D strided without bias, plain with bias, dilated, 1x1 strided valid; Conv2DTranspose;
    GroupNorm; pooling; Dense."""
    tf.keras.utils.set_random_seed(seed)
    inputs = tf.keras.Input((SIZE, SIZE, 2))
    x = layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.Activation("relu")(layers.GroupNormalization(2)(x))
    x = layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(6, 3, padding="same", dilation_rate=2, activation="tanh")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2DTranspose(4, 2, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2D(5, 1, strides=2, padding="valid")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(8, activation="relu")(x)
    return tf.keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(x))


def batch(n: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.uniform(size=(n, SIZE, SIZE, 2)).astype("float32"))
    y = tf.one_hot(rng.integers(0, CLASSES, n), CLASSES)
    return x, y


def naive_gradients(model, loss, x, y):
    """Each example's gradient, one example at a time."""
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            value = loss(y[i:i + 1], model(x[i:i + 1], training=True))
        grads.append(tape.gradient(value, model.trainable_variables))
    return grads


def assert_close(actual, expected, rtol=1e-5):
    for a, e in zip(actual, expected):
        error = float(tf.norm(tf.convert_to_tensor(a) - e))
        assert error <= rtol * float(tf.norm(e)) + 1e-9, (error, float(tf.norm(e)))


def registry(conv_method: str):
    if conv_method == "dense_norms_only":
        # A registry function giving norms only (TF-Privacy's own Dense): the step falls back to
        # backpropagating the clip-weighted losses for that layer.
        layer_registry = make_layer_registry("auto")
        layer_registry.insert(layers.Dense, dense_layer_computation)
        return layer_registry
    return make_layer_registry(conv_method)


@pytest.mark.parametrize("conv_method", ["ghost", "per_example", "auto", "dense_norms_only"])
def test_clipped_sum_equals_naive_reference(conv_method):
    model = every_layer_kind()
    x, y = batch()
    loss = tf.keras.losses.CategoricalCrossentropy()
    per_example = naive_gradients(model, loss, x, y)
    naive_norms = np.array([float(tf.linalg.global_norm(g)) for g in per_example])
    clip = float(np.median(naive_norms))
    assert (naive_norms > clip * 1.01).any() and (naive_norms < clip * 0.99).any()
    expected = [tf.add_n([g[k] * min(1.0, clip / n) for g, n in zip(per_example, naive_norms)])
                for k in range(len(model.trainable_variables))]

    dp = private_model(model, clip, 0.0, layer_registry=registry(conv_method))
    compile_model(dp, "classification", 0.1)
    grads, norms, _ = dp.clipped_gradient_sum(x, y)
    np.testing.assert_allclose(norms.numpy(), naive_norms, rtol=1e-5)
    assert_close(grads, expected)


def test_dropout_is_on_and_each_clipped_gradient_is_within_the_clip():
    # One example per batch: the clipped sum is that example's clipped gradient. Its norm is the
    # clip exactly only if the norm was measured on the same (training-mode, same-mask) network.
    inputs = tf.keras.Input((SIZE, SIZE, 2))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = layers.Dropout(0.5)(layers.GlobalAveragePooling2D()(x))
    model = tf.keras.Model(inputs, layers.Dense(CLASSES, activation="softmax")(x))
    dp = private_model(model, 1e-3, 0.0)
    compile_model(dp, "classification", 0.1)
    x, y = batch(1)
    grads, norms, y_pred = dp.clipped_gradient_sum(x, y)
    assert not np.allclose(y_pred, model(x, training=False))
    assert float(norms[0]) > 1e-3
    assert abs(float(tf.linalg.global_norm(grads)) - 1e-3) < 1e-8


def test_segmentation_loss_clips_per_image():
    inputs = tf.keras.Input((SIZE, SIZE, 1))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = layers.GroupNormalization(2)(layers.MaxPooling2D(2)(x))
    x = layers.Conv2DTranspose(4, 2, strides=2, padding="same")(x)
    model = tf.keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid")(x))
    rng = np.random.default_rng(2)
    images = tf.constant(rng.uniform(size=(4, SIZE, SIZE, 1)).astype("float32"))
    masks = tf.cast(images > 0.7, tf.float32)
    per_example = naive_gradients(model, DiceBCELoss(), images, masks)
    naive_norms = [float(tf.linalg.global_norm(g)) for g in per_example]
    dp = private_model(model, 1.0, 0.0, role="segmenter")
    compile_model(dp, "segmentation", 0.1)
    _, norms, _ = dp.clipped_gradient_sum(images, masks)
    np.testing.assert_allclose(norms.numpy(), naive_norms, rtol=1e-5)


def tiny_classifier(dropout: float):
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input((SIZE, SIZE, 1), name="image")
    x = layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.Activation("relu")(layers.GroupNormalization(2)(x))
    x = layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return tf.keras.Model(inputs, layers.Dense(CLASSES, activation="softmax", name="probabilities")(x))


def test_fit_trains_through_compile_model_and_fit():
    model = tiny_classifier(dropout=0.3)
    rng = np.random.default_rng(4)
    labels = rng.integers(0, CLASSES, 16)
    split = Split(rng.uniform(size=(16, SIZE, SIZE, 1)).astype("float32"), labels, None,
                  [f"i{i}" for i in range(16)], [None] * 16)
    dp = private_model(model, 1.0, 1.1)
    compile_model(dp, "classification", 0.01)
    before = model.get_weights()
    # Class weights (a third dataset element) and fit's augmentation go through the DP step.
    history = fit(dp, split, None, "classification", {"batch_size": 8}, epochs=1, seed=0, verbose=0)
    assert np.isfinite(history["loss"]).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    saveable = plain_model(dp)
    assert all(a is b for a, b in zip(saveable.weights, model.weights))


def test_dp_step_without_noise_or_clipping_is_an_sgd_step():
    model = tiny_classifier(dropout=0.0)
    x, y = batch(8)
    x = x[..., :1]
    start = model.get_weights()
    dp = private_model(model, 1e6, 0.0)
    compile_model(dp, "classification", 0.5, optimizer=tf.keras.optimizers.SGD(0.5))
    dp.train_on_batch(x, y)
    private_update = [w - s for w, s in zip(model.get_weights(), start)]
    model.set_weights(start)
    compile_model(model, "classification", 0.5, optimizer=tf.keras.optimizers.SGD(0.5))
    model.train_on_batch(x, y)
    plain_update = [w - s for w, s in zip(model.get_weights(), start)]
    assert all(np.abs(u).max() > 0 for u in plain_update)
    assert_close(private_update, plain_update)


def test_batch_norm_and_unregistered_layers_are_refused():
    inputs = tf.keras.Input((SIZE, SIZE, 1))
    x = layers.BatchNormalization()(layers.Conv2D(4, 3)(inputs))
    with pytest.raises(InputError, match=r"train\.segmenter\.normalization: group"):
        private_model(tf.keras.Model(inputs, x), 1.0, 1.0, role="segmenter")
    inner = tf.keras.Model(inputs, layers.SeparableConv2D(4, 3, name="sep")(inputs))
    outer_inputs = tf.keras.Input((SIZE, SIZE, 1))
    nested = tf.keras.Model(outer_inputs, layers.Dense(2)(layers.Flatten()(inner(outer_inputs))))
    with pytest.raises(InputError, match=r"'sep' \(SeparableConv2D\)"):
        private_model(nested, 1.0, 1.0)


def test_noise_does_not_follow_the_training_seed_and_is_not_a_weight():
    """Everyone can read train.seed in params.yaml: noise drawn from it could be subtracted again."""
    x, y = batch(8)
    x = x[..., :1]
    updates = []
    for _ in range(2):
        tf.keras.utils.set_random_seed(7)
        model = tiny_classifier(dropout=0.0)
        start = model.get_weights()
        dp = private_model(model, 1.0, 1.0)
        compile_model(dp, "classification", 0.5, optimizer=tf.keras.optimizers.SGD(0.5))
        # The noise generator's state is no weight: ServerApp and hospitals exchange the same vector.
        assert len(dp.get_weights()) == len(start) and len(dp.weights) == len(model.weights)
        tf.keras.utils.set_random_seed(7)
        dp.train_on_batch(x, y)
        updates.append(np.concatenate([(w - s).ravel() for w, s in zip(model.get_weights(), start)]))
    # Same seed, same initial weights, same batch: only the noise can differ, and it does.
    assert np.abs(updates[0] - updates[1]).max() > 1e-3
