"""Logit adjustment: a classifier trained on a skewed label mix, with the mix taken out of its loss
(`train.<role>.logit_adjustment`, the hospitals' usually: `federated.train.classifier`).

Menon et al. 2021 ("Long-tail learning via logit adjustment"; Ren et al. 2020's balanced softmax):
the loss is the cross-entropy of softmax(log p + log prior), `prior` being the class frequencies of
the images `fit` trains on. A hospital whose images are 50% meningioma then does not teach the
network that a scan is likely meningioma; the prior is added in the loss and left out of the
network, which learns the classes' evidence instead. Under label skew (Dirichlet partitions) every
hospital's prior differs and each pulls the average towards its own mix: this is the correction
FedLC (Zhang et al. 2022) applies for federated training. The network's own output (p) is unchanged
and is what every evaluation and prediction uses.

The adjustment counts only in training steps: the callback sets it for `fit`'s training batches and
removes it for validation passes and afterwards (as federated/proximal.py does), so val_* and every
evaluation of a model are the plain cross-entropy. The prior comes from the training labels: under
DP-SGD it would be a statistic of the private data outside what the epsilon covers, so a private
model is refused.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fedbrain.errors import InputError


class AdjustedCrossentropy(tf.keras.losses.Loss):
    """Categorical cross-entropy of softmax(log p + strength * log prior), p the network's probabilities."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, name: str = "adjusted_crossentropy",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)
        self.log_prior = tf.Variable(tf.zeros(self.num_classes), trainable=False, name="log_prior")
        self.strength = tf.Variable(0.0, trainable=False, name="logit_adjustment")

    def call(self, y_true, y_pred):
        logits = tf.math.log(tf.maximum(y_pred, 1e-7)) + self.strength * self.log_prior
        return tf.keras.losses.categorical_crossentropy(y_true, logits, from_logits=True,
                                                        label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


class LogitAdjustment(tf.keras.callbacks.Callback):
    """Puts the training labels' prior into the model's loss for `fit`'s training batches."""

    def __init__(self, model: tf.keras.Model, num_classes: int):
        super().__init__()
        from fedbrain.privacy.dp_sgd import PrivateModel

        if isinstance(model, PrivateModel):
            raise InputError("train.classifier.logit_adjustment cannot be used with DP-SGD (privacy.mode "
                             "example): the class prior it adds is computed from the private training labels, "
                             "outside what the reported epsilon covers; set it to false")
        previous = model.loss
        smoothing = float(previous.get_config().get("label_smoothing", 0.0)) if hasattr(previous, "get_config") else 0.0
        self.loss = AdjustedCrossentropy(num_classes, smoothing)
        # Same optimizer object: its state (Adam's moments) and learning rate carry on.
        model.compile(optimizer=model.optimizer, loss=self.loss, metrics=["accuracy"])

    def use(self, labels: np.ndarray) -> LogitAdjustment:
        counts = np.bincount(np.asarray(labels, np.int64), minlength=self.loss.num_classes).astype(np.float64)
        # A class absent from these images gets a prior of half an image: finite, and far below the rest.
        prior = np.maximum(counts, 0.5) / max(counts.sum(), 1.0)
        self.loss.log_prior.assign(np.log(prior).astype(np.float32))
        return self

    def on_train_begin(self, logs=None):
        self.loss.strength.assign(1.0)

    def on_test_begin(self, logs=None):
        self.loss.strength.assign(0.0)

    def on_test_end(self, logs=None):
        self.loss.strength.assign(1.0)

    def on_train_end(self, logs=None):
        self.loss.strength.assign(0.0)


def logit_adjustment(model: tf.keras.Model, labels: np.ndarray, num_classes: int) -> LogitAdjustment:
    """The model's LogitAdjustment, made (and the model recompiled) at the first call, set to `labels`' prior."""
    adjustment = model.__dict__.get("_fedbrain_logit_adjustment")
    if adjustment is None:
        # In __dict__: as a Keras attribute the callback's variables would become the model's.
        adjustment = model.__dict__["_fedbrain_logit_adjustment"] = LogitAdjustment(model, num_classes)
    return adjustment.use(labels)
