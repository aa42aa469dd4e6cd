"""DP-SGD for our Keras models with exact per-example clipping at close to ordinary training cost.

``private_model(model, l2_norm_clip, noise_multiplier)`` returns a Keras model sharing ``model``'s
layers and weights whose ``fit`` step is DP-SGD (Abadi et al. 2016): each example's gradient
clipped to ``l2_norm_clip``, the clipped gradients summed, Gaussian noise of standard deviation
``noise_multiplier * l2_norm_clip`` added once to the sum, the result divided by the batch size
and handed to the compiled (ordinary, non-DP) optimizer. Compile it with
``fedbrain.train.compile_model`` as any model; train it with ``fedbrain.train.fit``. The original
``model`` holds the trained weights and is the one to save (or ``plain_model(private)``).

The step follows TF-Privacy's fast gradient clipping (``DPModel``, ``make_dp_model_class``) and
reuses its graph walk, its registry format and its clip weights, but not its ``train_step``:
- its norm pass replays the layers without ``training=True``, so Dropout is off while the norms
  are measured and on in the pass that makes the gradient (checked on 0.9.0): the norms are of
  another network and a clipped gradient can exceed the clip norm;
- when a layer is not registered, or hides in a nested model, it falls back without a word to
  the vectorized path, which computes conv filter gradients one example at a time;
- it runs the model forward twice.
Here one forward pass (training mode) is recorded on a tape. Backpropagating the summed loss to
each layer's pre-activation output gives the per-example norms (``fedbrain.privacy.clipping``);
each layer then sums its per-example weight gradients times the clip factors from the same
activations and the same Dropout masks (book-keeping: no second backward pass).
"""

from __future__ import annotations

import secrets

from collections import Counter

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping.clip_grads import compute_clip_weights
from tensorflow_privacy.privacy.fast_gradient_clipping.gradient_clipping_utils import (
    has_internal_compute_graph, model_forward_pass)

from fedbrain.errors import InputError
from fedbrain.privacy.clipping import LAYER_REGISTRY, check_clippable

_ZERO = tf.UnconnectedGradients.ZERO


class PrivateModel(tf.keras.Model):
    """A functional model whose train_step is DP-SGD; built by ``private_model``."""

    def __init__(self, inputs, outputs, l2_norm_clip: float, noise_multiplier: float,
                 layer_registry=LAYER_REGISTRY, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = float(noise_multiplier)
        self._layer_registry = layer_registry
        self._per_example_loss = None
        # The noise must not follow train.seed: tf.random.normal does (fit seeds TensorFlow), and
        # anyone who knows the seed in params.yaml could regenerate the noise and subtract it.
        # Philox keyed from the OS's CSPRNG instead (an assumption: Philox output is unpredictable
        # without its key). Set in __dict__ so Keras does not track its state as a model weight.
        self.__dict__["_noise"] = tf.random.Generator.from_state(
            [secrets.randbits(63) for _ in range(3)], alg=tf.random.Algorithm.PHILOX)

    def compile(self, optimizer="rmsprop", loss=None, *args, **kwargs):
        # TF-Privacy's DP optimizers carry _num_microbatches (as fedbrain.train._is_dp_optimizer
        # checks): with one here every gradient would be clipped and noised twice.
        if hasattr(optimizer, "_num_microbatches"):
            raise InputError("a private model clips and noises its gradients itself: compile it with an "
                             "ordinary optimizer, not a TF-Privacy DP optimizer")
        if not isinstance(loss, tf.keras.losses.Loss):
            raise InputError(f"a private model needs one tf.keras.losses.Loss object, got {loss!r}")
        super().compile(optimizer, loss, *args, **kwargs)
        # Clipping needs one loss per example whatever the compiled reduction (which only
        # shapes the reported loss); the step divides by the batch size itself.
        self._per_example_loss = type(loss).from_config(
            {**loss.get_config(), "reduction": tf.keras.losses.Reduction.NONE})

    def _registry_generator(self, tape):
        """TF-Privacy's registry generator (clip_grads.get_registry_generator_fn), in training mode."""
        def generator(layer, args, kwargs):
            if not layer.trainable_weights:
                if kwargs.get("training") is None:
                    kwargs = {**kwargs, "training": True}
                return layer(*args, **kwargs), None
            base_vars, outputs, sqr_norm_fn = self._layer_registry.lookup(layer)(layer, args, kwargs, tape, None)
            return outputs, (base_vars, sqr_norm_fn)

        return generator

    def clipped_gradient_sum(self, x, y, sample_weight=None):
        """(sum over the batch of each example's gradient clipped to l2_norm_clip, one tensor per
        trainable variable; each example's unclipped gradient norm [B]; the predictions).

        With ``sample_weight`` an example's gradient is that of its weighted loss, then clipped.
        """
        if self._per_example_loss is None:
            raise InputError("compile the private model first (fedbrain.train.compile_model)")
        tape = tf.GradientTape(persistent=True)
        with tape:
            y_pred, records = model_forward_pass(self, x, self._registry_generator(tape))
            losses = self._per_example_loss(y, y_pred, sample_weight)
        if losses.shape.rank != 1:
            raise InputError(f"the loss gives shape {losses.shape} per batch; DP-SGD needs one value per example")
        records = [record for record in records if record is not None]
        output_grads = tape.gradient(losses, [base_vars for base_vars, _ in records], unconnected_gradients=_ZERO)
        norms = tf.sqrt(tf.add_n([sqr_norm_fn(grads) for (_, sqr_norm_fn), grads in zip(records, output_grads)]))
        clip_weights = tf.stop_gradient(compute_clip_weights(self.l2_norm_clip, norms))
        clipped = {}
        for (_, sqr_norm_fn), grads in zip(records, output_grads):
            if hasattr(sqr_norm_fn, "clipped_sum"):
                clipped.update((variable.ref(), g) for variable, g in sqr_norm_fn.clipped_sum(grads, clip_weights))
        rest = [v for v in self.trainable_variables if v.ref() not in clipped]
        if rest:  # registry functions that give norms only (TF-Privacy's): backprop the clip-weighted losses
            rest_grads = tape.gradient(losses, rest, output_gradients=clip_weights, unconnected_gradients=_ZERO)
            clipped.update((v.ref(), g) for v, g in zip(rest, rest_grads))
        grads = [clipped[v.ref()] for v in self.trainable_variables]
        del tape
        return grads, norms, y_pred

    def train_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        clipped_sum, norms, y_pred = self.clipped_gradient_sum(x, y, sample_weight)
        batch_size = tf.cast(tf.shape(norms)[0], clipped_sum[0].dtype)
        stddev = self.noise_multiplier * self.l2_norm_clip
        grads = [((g + self._noise.normal(tf.shape(g), stddev=stddev, dtype=g.dtype)) if stddev > 0 else g)
                 / batch_size for g in clipped_sum]
        if self.losses:  # weight regularisers: data-independent, so outside the clipping
            with tf.GradientTape() as tape:
                regularization = tf.add_n(self.losses)
            grads = [g + r for g, r in zip(grads, tape.gradient(regularization, self.trainable_variables,
                                                                unconnected_gradients=_ZERO))]
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.compute_loss(x, y, y_pred, sample_weight)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def save(self, *args, **kwargs):
        raise InputError("save the plain model (fedbrain.privacy.dp_sgd.plain_model(private), or the model "
                         "given to private_model): a PrivateModel file would need fedbrain to load")


def _graph_layers(model):
    """Every layer TF-Privacy's graph walk calls (nested functional models opened), and how often."""
    calls = Counter()
    layers = {}
    for nodes in model._nodes_by_depth.values():  # the walk model_forward_pass itself makes
        for node in nodes:
            if node.is_input:
                continue
            calls[id(node.layer)] += 1
            layers[id(node.layer)] = node.layer
    for key, layer in list(layers.items()):
        if has_internal_compute_graph(layer):
            del layers[key]
            for inner, count in _graph_layers(layer):
                layers[id(inner)] = inner
                calls[id(inner)] += count * calls[key]
    return [(layer, calls[key]) for key, layer in layers.items()]


def check_private_trainable(model: tf.keras.Model, role: str = "classifier", layer_registry=LAYER_REGISTRY) -> None:
    """InputError unless every trainable layer of ``model`` has an exact per-example norm in the registry."""
    for module in [model, *model.submodules]:
        # By name along the class tree: Keras 2 has BatchNormalization, its V1 form and
        # SyncBatchNormalization on a private base class.
        if any("BatchNormalization" in cls.__name__ for cls in type(module).__mro__):
            raise InputError(f"model {model.name!r}: layer {module.name!r} is BatchNormalization, which mixes the "
                             f"examples of a batch, so per-example clipping cannot bound one example's influence "
                             f"(DP-SGD); set train.{role}.normalization: group (cnn and unet have a GroupNorm form)")
    if not has_internal_compute_graph(model):
        raise InputError(f"model {model.name!r} is a subclassed Keras model; DP-SGD needs a functional one")
    for layer, calls in _graph_layers(model):
        where = f"layer {layer.name!r} ({type(layer).__name__})"
        if getattr(layer, "activity_regularizer", None) is not None:
            raise InputError(f"{where} has an activity regulariser, a loss on the data outside the clipping")
        if not layer.trainable_weights:
            continue
        if not layer_registry.is_elem(layer):
            raise InputError(f"{where} has trainable weights but no per-example gradient norm in "
                             f"fedbrain.privacy.clipping.LAYER_REGISTRY; replace it or add a registry function")
        if calls > 1:
            raise InputError(f"{where} is called {calls} times in the model; per-example norms of shared "
                             f"layers are not supported")
        check_clippable(layer)


def private_model(model: tf.keras.Model, l2_norm_clip: float, noise_multiplier: float, *,
                  role: str = "classifier", layer_registry=LAYER_REGISTRY) -> PrivateModel:
    """``model`` (uncompiled or not; it is not changed) as a DP-SGD model sharing its layers and weights.

    ``role`` names the params.yaml section (train.<role>) in the error a BatchNorm model gets.
    """
    if not l2_norm_clip > 0:
        raise InputError(f"l2_norm_clip must be positive, got {l2_norm_clip}")
    if not noise_multiplier >= 0:
        raise InputError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    check_private_trainable(model, role, layer_registry)
    return PrivateModel(model.inputs, model.outputs, l2_norm_clip, noise_multiplier, layer_registry,
                        name=model.name)


def plain_model(private: tf.keras.Model) -> tf.keras.Model:
    """A stock functional model over the same layers (and so the trained weights), to save or evaluate."""
    return tf.keras.Model(private.inputs, private.outputs, name=private.name)
