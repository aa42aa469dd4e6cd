"""The `scatter` classifier: fixed wavelet features (Kymatio's 2-D scattering) and a linear softmax.

Why: under DP-SGD the noise fills every trained weight, and a CNN learns its features from the
images it must protect. A scattering transform (Morlet wavelets at J scales and L angles, their
modulus, twice, then averaged over 2^J x 2^J pixels) has no weights: nothing in it is learned from
the data, so it costs no privacy, and only the linear head over it trains. Tramer & Boneh,
"Differentially private learning needs better features (or much more data)", ICLR 2021: on small
sets such a head beats end-to-end private CNNs. Measured here (bench/variants.py, bench/README): the
dp variant federated at epsilon 8, 0.78 test accuracy against the width-8 GroupNorm cnn's 0.59.

Kymatio computes the transform (we do not rewrite it). It costs ~55 ms an image on 2 cores, so
training never recomputes it: with augmentation off (the images a step sees are the stored ones),
`fit` and the federated evaluation train and score the head on `features` computed once per
process and split (`training_view`), which is the same mathematics as the whole model on the
images. The saved model is the whole one (images in), loadable wherever this module is imported
(fedbrain.models.load does).
"""

from __future__ import annotations

import hashlib
import weakref

import numpy as np
import tensorflow as tf

from fedbrain.errors import InputError

J_SCALES = 4  # 2^4 = 16: a 128 x 128 image gives 8 x 8 positions of 417 channels (26,688 features)
L_ANGLES = 8
FRONT, HEAD = "scattering", "head"
# Per process: {(front config, image ids digest, shape): features}. A hospital computes its
# splits' features once per run; the centralized run once per split.
_FEATURES: dict[tuple, np.ndarray] = {}
# {full model: its head compiled as the full model was (same optimizer object, loss, privacy)}.
_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def allow_kymatio_import() -> None:
    """Kymatio 0.3.0 (its latest release) imports scipy.special.sph_harm for its 3-D transform at
    package import; SciPy 1.17 removed it. The 2-D transform never calls it: a placeholder that
    raises is set, for that pair of versions only (bench/dp_features.py imports Kymatio this way too)."""
    import scipy
    import scipy.special

    if not hasattr(scipy.special, "sph_harm"):
        from importlib.metadata import version

        if version("kymatio") != "0.3.0" or not scipy.__version__.startswith("1.17"):
            raise RuntimeError(f"fedbrain.scattering: check the sph_harm placeholder against kymatio "
                               f"{version('kymatio')} and SciPy {scipy.__version__}")

        def sph_harm(*args, **kwargs):
            raise NotImplementedError("scipy.special.sph_harm was removed in SciPy 1.17 (Kymatio's 3-D transform)")

        scipy.special.sph_harm = sph_harm


def _kymatio_scattering2d():
    """Kymatio's TensorFlow Scattering2D."""
    allow_kymatio_import()
    from kymatio.tensorflow import Scattering2D

    return Scattering2D


@tf.keras.utils.register_keras_serializable(package="fedbrain")
class Scattering(tf.keras.layers.Layer):
    """Images [N, H, W, C] -> scattering coefficients [N, H/2^J, W/2^J, C x K], standardised per
    image (zero mean, unit variance over all its coefficients: no weights, so no privacy cost and
    nothing for a hospital to send). K = 1 + LJ + L^2 J(J-1)/2 paths (417 at J=4, L=8)."""

    def __init__(self, J: int = J_SCALES, L: int = L_ANGLES, **kwargs):
        kwargs["trainable"] = False  # no weights to train (a saved config repeats it)
        # dynamic: Keras runs it eagerly and takes its output shape from compute_output_shape.
        # Tracing Kymatio's ~2,000 ops into a graph cost 13-17 s on 2 cores at each of building,
        # predicting and evaluating; eagerly an image costs ~55 ms instead of ~31 ms, which is
        # less for any split under ~600 images, and a hospital computes its features once.
        kwargs["dynamic"] = True
        super().__init__(**kwargs)
        self.J, self.L = int(J), int(L)
        self._transform = None

    def build(self, input_shape):
        height, width = int(input_shape[1]), int(input_shape[2])
        check_size(height, width, self.J)
        self._transform = _kymatio_scattering2d()(J=self.J, shape=(height, width), L=self.L)
        super().build(input_shape)

    def paths(self) -> int:
        return 1 + self.L * self.J + self.L ** 2 * self.J * (self.J - 1) // 2

    def call(self, images):
        channels = images.shape[-1]
        height, width = images.shape[1], images.shape[2]
        grey = tf.reshape(tf.transpose(images, (0, 3, 1, 2)), (-1, height, width))  # each channel on its own
        coefficients = self._transform.scattering(grey)  # [N x C, K, h, w]
        h, w = height // 2 ** self.J, width // 2 ** self.J
        coefficients = tf.reshape(coefficients, (-1, channels * self.paths(), h, w))
        coefficients = tf.transpose(coefficients, (0, 2, 3, 1))
        mean, variance = tf.nn.moments(coefficients, axes=(1, 2, 3), keepdims=True)
        return (coefficients - mean) * tf.math.rsqrt(variance + 1e-3)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], input_shape[1] // 2 ** self.J, input_shape[2] // 2 ** self.J,
                               input_shape[3] * self.paths()])

    def get_config(self):
        return {**super().get_config(), "J": self.J, "L": self.L}


def check_size(height: int, width: int, J: int) -> None:
    if height % 2 ** J or width % 2 ** J:
        raise InputError(f"the scatter classifier needs images whose sides are multiples of {2 ** J} "
                         f"(J={J}); got {height} x {width}: set preprocess.size accordingly")


def scatter_classifier(input_shape, num_classes: int, J: int = J_SCALES, L: int = L_ANGLES) -> tf.keras.Model:
    """Images -> `Scattering` (named FRONT) -> a nested model HEAD: Flatten -> Dense softmax."""
    check_size(int(input_shape[0]), int(input_shape[1]), J)
    images = tf.keras.Input(input_shape)
    front = Scattering(J, L, name=FRONT)
    # Built now: Keras builds a dynamic layer only when it first sees data, and a SavedModel of a
    # model never called would lack the input shape that rebuilding the layer from its config needs.
    front.build(images.shape)
    features = front(images)
    head_in = tf.keras.Input(features.shape[1:])
    logits = tf.keras.layers.Dense(num_classes, activation="softmax", name="predictions")(
        tf.keras.layers.Flatten()(head_in))
    head = tf.keras.Model(head_in, logits, name=HEAD)
    return tf.keras.Model(images, head(features), name="scatter")


def front_and_head(model) -> tuple[Scattering, tf.keras.Model] | None:
    """(the scattering layer, the head model) of a scatter classifier (a private one too), else None."""
    names = {layer.name: layer for layer in getattr(model, "layers", [])}
    front, head = names.get(FRONT), names.get(HEAD)
    if isinstance(front, Scattering) and isinstance(head, tf.keras.Model):
        return front, head
    return None


def compile_view(model, loss, metric) -> None:
    """After `model` (a scatter classifier, private or not) is compiled: its head as the model
    `fit` trains, a model of the same kind over the head's layers (the same weights), compiled with
    `loss`, `metric` and the full model's optimizer object, so the learning rate a federated
    hospital sets and Adam's moments are one. Other models: nothing."""
    parts = front_and_head(model)
    if parts is None:
        return
    _, head = parts
    from fedbrain.privacy.dp_sgd import PrivateModel

    if isinstance(model, PrivateModel):
        view = PrivateModel(head.inputs, head.outputs, model.l2_norm_clip, model.noise_multiplier,
                            model._layer_registry, name=f"{model.name}_head")
    else:
        view = tf.keras.Model(head.inputs, head.outputs, name=f"{model.name}_head")
    view.compile(optimizer=model.optimizer, loss=loss, metrics=[metric])
    _VIEWS[model] = view


def training_view(model, augment: dict | None = None):
    """The compiled head to train and score on `features` in place of `model`, or None for other
    models. A scatter classifier with augmentation on is refused: its features are computed once."""
    view = _VIEWS.get(model)
    if view is not None and augment and any(bool(v) for v in augment.values()):
        on = ", ".join(f"{k}: {v}" for k, v in augment.items() if v)
        raise InputError(f"the scatter classifier trains on wavelet features computed once per image, so its "
                         f"training images cannot be augmented ({on}): set every train.classifier.augment "
                         f"value to 0 / false")
    return view


def features(model, split):
    """`split` with its images replaced by the model's scattering features (computed once per
    process for these image ids; the ids name stored images, so the features cannot go stale)."""
    from fedbrain.dataset import Split

    front, _ = front_and_head(model)
    digest = hashlib.sha256("\n".join(map(str, split.image_ids)).encode()).hexdigest()
    key = (front.J, front.L, split.images.shape, digest)
    if key not in _FEATURES:
        batches = [front(tf.constant(split.images[i:i + 64], tf.float32)).numpy() for i in range(0, len(split), 64)]
        _FEATURES[key] = np.concatenate(batches) if batches else np.zeros((0, *front.output.shape[1:]), np.float32)
    return Split(_FEATURES[key], split.labels, split.masks, split.image_ids, split.patient_ids)
