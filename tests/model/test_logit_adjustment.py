"""Logit adjustment (fedbrain.logit_adjustment): the loss, when it counts, and what it refuses."""

import numpy as np
import pytest
import tensorflow as tf

from fedbrain.dataset import Split
from fedbrain.errors import InputError
from fedbrain.logit_adjustment import AdjustedCrossentropy
from fedbrain.models import build_model
from fedbrain.privacy.dp_sgd import private_model
from fedbrain.privacy.settings import PrivacySettings
from fedbrain.train import compile_model, fit

NO_AUGMENT = {"rotation_deg": 0, "hflip": False, "vflip": False, "brightness": 0.0}


def _skewed(n: int = 64) -> Split:
    """Three classes, 75% of the images in class 0; classes 1 and 2 carry a bright band."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * (3 * n // 4) + [1] * (n // 8) + [2] * (n // 8), np.int64)
    images = rng.random((n, 32, 32, 1), dtype=np.float32)
    images[labels == 1, :8] += 0.5
    images[labels == 2, -8:] += 0.5
    return Split(np.clip(images, 0, 1), labels, None, [f"i{i}" for i in range(n)], [f"p{i}" for i in range(n)])


def test_the_loss_is_cross_entropy_of_the_prior_weighted_prediction_and_plain_at_strength_zero():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
    y = tf.keras.utils.to_categorical(rng.integers(0, 4, 6), 4)
    prior = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    loss = AdjustedCrossentropy(4, label_smoothing=0.1)
    loss.log_prior.assign(np.log(prior))
    plain = tf.keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(y, p)
    np.testing.assert_allclose(float(loss(y, p)), float(plain), rtol=1e-5)
    loss.strength.assign(1.0)
    weighted = p * prior / (p * prior).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(float(loss(y, p)), float(tf.keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(
        y, weighted)), rtol=1e-5)


def _trained(adjust: bool):
    tf.keras.utils.set_random_seed(1)
    model = compile_model(build_model("cnn", (32, 32, 1), 3, width=4), "classification", 0.01, label_smoothing=0.1)
    data = _skewed()
    history = fit(model, data, None, "classification", {"batch_size": 16, "logit_adjustment": adjust,
                                                        "augment": NO_AUGMENT},
                  epochs=3, seed=0, class_weight=False, verbose=0)
    return model, data, history


def test_training_takes_the_label_mix_out_and_evaluation_stays_the_plain_loss():
    plain_model, data, _ = _trained(False)
    model, _, history = _trained(True)
    y = tf.keras.utils.to_categorical(data.labels, 3)
    p = model.predict(data.images, verbose=0)
    # Outside fit's training steps the model's loss is the plain cross-entropy of its own output.
    evaluated = model.evaluate(data.images, y, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(evaluated, float(tf.keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(y, p)),
                               rtol=1e-4)
    # The majority class's share of the predictions falls: the prior went into the loss, not the network.
    majority = plain_model.predict(data.images, verbose=0)[:, 0].mean()
    assert p[:, 0].mean() < majority - 0.03
    assert len(history["loss"]) == 3


def test_it_is_refused_with_class_weights_and_under_dp():
    model = compile_model(build_model("cnn", (32, 32, 1), 3, width=4), "classification", 0.01)
    with pytest.raises(InputError, match="class_weight and logit_adjustment"):
        fit(model, _skewed(16), None, "classification", {"batch_size": 8, "logit_adjustment": True,
                                                         "augment": NO_AUGMENT}, epochs=1, seed=0, class_weight=True,
            verbose=0)
    private = compile_model(private_model(build_model("cnn", (32, 32, 1), 3, width=4, normalization="group"),
                                          l2_norm_clip=1.0, noise_multiplier=1.0), "classification", 0.01)
    with pytest.raises(InputError, match="DP-SGD"):
        fit(private, _skewed(16), None, "classification", {"batch_size": 8, "logit_adjustment": True,
                                                           "augment": NO_AUGMENT}, epochs=1, seed=0,
            class_weight=False, verbose=0)
    with pytest.raises(InputError, match="logit_adjustment"):
        PrivacySettings.from_params({"privacy": {"mode": "example", "noise_multiplier": 1.0}}).check_training(
            {"normalization": "group", "logit_adjustment": True}, "classifier")
