"""FedProx's proximal term in a hospital's local training (`federated.strategy: fedprox`).

Li et al. 2020 ("Federated Optimization in Heterogeneous Networks"): each hospital minimises its
loss plus mu/2 * ||w - w_global||^2 over the trainable weights, w_global being the weights it
received this round, so that under non-IID data its local weights drift less from the global model.
Flower's FedProx strategy only sends `proximal_mu` in the train config; the term is the client's
job. Here mu comes with the run config, and the term is a Keras loss (`model.add_loss`) over
tf.Variables holding w_global, so that the baseline's `fit` trains with it unchanged (early stopping,
best weights, class weights) and so does DP-SGD: PrivateModel.train_step adds the gradient of
`model.losses`, mu * (w - w_global), after clipping and noising, as it does for any
data-independent loss; it depends on no example, so the privacy accounting is unchanged.

The term counts only in training steps: the callback sets mu for `fit`'s training batches and 0
for its validation passes and afterwards, so val_* (early stopping's monitor) and every evaluation
of a global model are the plain loss. `train_loss` is the local objective FedProx minimises, term
included. With mu = 0 the term adds exact zeros: training is bit for bit FedAvg's.
"""

from __future__ import annotations

import tensorflow as tf


class ProximalTerm(tf.keras.callbacks.Callback):
    """mu/2 * ||w - w_global||^2 as a loss of `model`; a `fit` callback that takes w_global from the
    weights the model holds when training starts (the received ones) and switches the term on.
    Made once per model (`proximal_term`): Keras cannot take a loss away again."""

    def __init__(self, model: tf.keras.Model, mu: float):
        super().__init__()
        self.mu = float(mu)
        self.weights = list(model.trainable_weights)
        # Outside the model (not Keras-tracked): its weights, and so the vector that travels, stay the same.
        self.anchors = [tf.Variable(w, trainable=False, name="proximal_anchor") for w in self.weights]
        self.strength = tf.Variable(0.0, trainable=False, name="proximal_mu")
        model.add_loss(self.loss)
        # Keras traces the loss into its train and test functions: any made before it must be remade.
        model.train_function = model.test_function = None

    def loss(self):
        return 0.5 * self.strength * tf.add_n([tf.reduce_sum(tf.square(w - a))
                                                for w, a in zip(self.weights, self.anchors)])

    def on_train_begin(self, logs=None):
        for anchor, weight in zip(self.anchors, self.weights):
            anchor.assign(weight)
        self.strength.assign(self.mu)

    def on_test_begin(self, logs=None):
        self.strength.assign(0.0)

    def on_test_end(self, logs=None):
        self.strength.assign(self.mu)

    def on_train_end(self, logs=None):
        self.strength.assign(0.0)


def proximal_term(model: tf.keras.Model, mu: float) -> ProximalTerm:
    """The model's ProximalTerm, made at the first call (a hospital keeps its model all run)."""
    term = model.__dict__.get("_fedbrain_proximal")
    if term is None:
        # In __dict__: as a Keras attribute the callback's variables would become the model's.
        term = model.__dict__["_fedbrain_proximal"] = ProximalTerm(model, mu)
    term.mu = float(mu)
    return term
