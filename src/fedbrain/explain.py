"""Grad-CAM (Selvaraju et al. 2017): where in the image a classifier found the evidence for its class.

The heat map is the last convolutional block's feature maps, each weighted by the mean gradient of
the class score with respect to it, summed, ReLU'd, scaled to [0, 1] and resized to the image.
The class score is the pre-softmax logit, as in the paper: fedbrain's classifiers end in a softmax
Dense layer, whose logits are recomputed from its input and kernel (the probability itself
saturates near 1, and its gradient with it).

The last convolutional block is the last layer with a spatial (4-D) output before the classifier's
pooling: the final residual block's ReLU in the ``cnn``; for ``vgg16`` and ``efficientnet_b0``, whose
Keras Applications backbone is one nested model inside ours, the backbone's output (VGG16's
``block5_pool``, EfficientNet-B0's ``top_activation``), the last block's output, as pytorch-grad-cam
also takes for VGG. At 128x128 pixels all three give a 4x4 map: the heat map is coarse by design.

A segmenter has no class score to explain, and a network without a convolutional layer has no
feature maps: both are ``NotExplainable``, with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedbrain.errors import InputError

GALLERY_PER_KIND = 3  # evaluate's gallery: per class, this many confident correct and as many wrong images
_BATCH = 32


class NotExplainable(InputError):
    """This model has no Grad-CAM explanation; the message says why."""


def _is_conv(layer) -> bool:
    import tensorflow as tf

    if isinstance(layer, tf.keras.Model):
        return any(_is_conv(inner) for inner in layer.layers)
    return isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.SeparableConv2D,
                              tf.keras.layers.DepthwiseConv2D))


def _only_output(layer):
    """The layer's output in the model that holds it; a nested model's ``.output`` is its own inner one."""
    if len(layer.inbound_nodes) != 1:
        raise NotExplainable(f"layer {layer.name!r} is called {len(layer.inbound_nodes)} times: "
                             "its feature maps are ambiguous")
    return layer.get_output_at(0)


def feature_layer(model):
    """The last convolutional block's output layer (see the module's docstring)."""
    import tensorflow as tf

    if len(model.output_shape) != 2:
        raise NotExplainable("it is a segmenter (a probability per pixel): Grad-CAM explains a class score, "
                             "and a segmenter has none")
    for position in range(len(model.layers) - 1, -1, -1):
        layer = model.layers[position]
        try:
            shape = layer.output_shape
        except AttributeError:  # a layer called on several inputs of different shapes
            continue
        if isinstance(layer, tf.keras.layers.InputLayer) or not (isinstance(shape, tuple) and len(shape) == 4):
            continue
        if any(_is_conv(earlier) for earlier in model.layers[:position + 1]):
            return layer
        break
    raise NotExplainable(f"{model.name} has no convolutional block: Grad-CAM needs feature maps that a "
                         "convolutional layer made")


class GradCam:
    """Grad-CAM heat maps of one classifier; build once, then call for batches of images."""

    def __init__(self, model):
        import tensorflow as tf

        self.model = model
        self.layer = feature_layer(model)
        last = model.layers[-1]
        self._dense = (last if isinstance(last, tf.keras.layers.Dense)
                       and getattr(last.activation, "__name__", "") == "softmax" else None)
        # Without a softmax Dense on top, log p stands in for the logits: it is the logits minus their
        # log-sum-exp, so its gradient also subtracts the other classes' (weighted by their p).
        head = model.output if self._dense is None else self._dense.get_input_at(0)
        self._grad_model = tf.keras.Model(model.inputs, [_only_output(self.layer), head])
        self._step = tf.function(self._heatmaps, input_signature=[
            tf.TensorSpec((None, *model.input_shape[1:]), tf.float32), tf.TensorSpec((None,), tf.int32)])
        self._step.get_concrete_function()  # traced now: a score that ignores the layer fails here, not later

    def _heatmaps(self, images, classes):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            features, head = self._grad_model(images, training=False)
            if self._dense is not None:
                logits = tf.matmul(head, self._dense.kernel)
                logits = logits + self._dense.bias if self._dense.use_bias else logits
            else:
                logits = tf.math.log(tf.maximum(head, 1e-12))
            score = tf.gather(logits, classes, axis=1, batch_dims=1)
        gradients = tape.gradient(score, features)
        if gradients is None:
            raise NotExplainable(f"the class score does not depend on layer {self.layer.name!r}")
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, tf.shape(images)[1:3], method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return tf.math.divide_no_nan(cam, peak), tf.nn.softmax(logits) if self._dense is not None else head

    def __call__(self, images: np.ndarray, classes=None) -> tuple[np.ndarray, np.ndarray]:
        """(heat maps (n, H, W) in [0, 1], probabilities (n, classes)) for ``images`` (n, H, W, C);
        each map explains ``classes[i]``, by default the predicted class."""
        images = np.asarray(images, dtype=np.float32)
        maps, probabilities = [], []
        for start in range(0, len(images), _BATCH):
            batch = images[start:start + _BATCH]
            if classes is None:
                wanted = np.asarray(self.model(batch, training=False)).argmax(axis=1)
            else:
                wanted = np.asarray(classes)[start:start + _BATCH]
            cam, proba = self._step(batch, wanted.astype(np.int32))
            maps.append(cam.numpy())
            probabilities.append(proba.numpy())
        return np.concatenate(maps), np.concatenate(probabilities)


def _gray(image: np.ndarray) -> np.ndarray:
    # FLAIR is the middle channel of the TCGA/LGG layout (as plots.plot_overlays shows it).
    return image[..., 1 if image.shape[-1] == 3 else 0]


def draw(ax, image: np.ndarray, heatmap: np.ndarray):
    """The image in gray with the heat map over it; returns the heat map's artist (for a colour bar)."""
    ax.imshow(_gray(image), cmap="gray", vmin=0.0, vmax=1.0)
    artist = ax.imshow(heatmap, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def write_overlay(image: np.ndarray, heatmap: np.ndarray, title: str, path: Path) -> Path:
    """One explained image: the model's input, its Grad-CAM heat map over it, ``title`` above."""
    from fedbrain.plots import figure, save

    fig = figure(4.0, 3.6)
    ax = fig.subplots()
    artist = draw(ax, image, heatmap)
    ax.set_title(title, fontsize=10)
    fig.colorbar(artist, ax=ax, shrink=0.8, label="Grad-CAM (relative)")
    return save(fig, path)


def gallery_picks(labels: np.ndarray, proba: np.ndarray, per_kind: int = GALLERY_PER_KIND) -> dict:
    """Per true class: its ``per_kind`` most confident correct images and its most confident wrong ones."""
    labels, proba = np.asarray(labels), np.asarray(proba)
    predicted, confidence = proba.argmax(axis=1), proba.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    picks = {}
    for k in range(proba.shape[1]):
        mine = order[labels[order] == k]
        picks[k] = {"correct": mine[predicted[mine] == k][:per_kind].tolist(),
                    "wrong": mine[predicted[mine] != k][:per_kind].tolist()}
    return picks


def plot_gallery(model, images: np.ndarray, labels: np.ndarray, proba: np.ndarray, classes: list[str],
                 title: str, path: Path, per_kind: int = GALLERY_PER_KIND) -> Path | None:
    """One figure per model: a row per class, its most confident correct test images, then its wrong
    ones, each with the Grad-CAM of the class predicted. ``proba``: the probabilities to show
    (temperature-scaled, as predict prints them). None when there is no test image; NotExplainable
    for a model without a Grad-CAM."""
    from fedbrain.plots import figure, save

    explainer = GradCam(model)
    picks = gallery_picks(labels, proba, per_kind)
    chosen = sorted({i for p in picks.values() for i in p["correct"] + p["wrong"]})
    if not chosen:
        return None
    maps = dict(zip(chosen, explainer(images[chosen], np.asarray(proba)[chosen].argmax(axis=1))[0]))
    fig = figure(1.7 * 2 * per_kind, 1.9 * len(classes) + 0.4)
    axes = np.asarray(fig.subplots(len(classes), 2 * per_kind, squeeze=False))
    for k, name in enumerate(classes):
        cells = [("correct", i) for i in picks[k]["correct"]] + [None] * (per_kind - len(picks[k]["correct"]))
        cells += [("wrong", i) for i in picks[k]["wrong"]] + [None] * (per_kind - len(picks[k]["wrong"]))
        for column, (ax, cell) in enumerate(zip(axes[k], cells)):
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(f"true {name}", fontsize=8)
            if cell is None:
                ax.set_frame_on(False)
                continue
            kind, i = cell
            draw(ax, images[i], maps[i])
            said = int(np.argmax(proba[i]))
            label = f"p={proba[i][said]:.2f}" if kind == "correct" else f"said {classes[said]} p={proba[i][said]:.2f}"
            ax.set_title(label, fontsize=7, color="black" if kind == "correct" else "C3")
    fig.suptitle(f"{title}: Grad-CAM; per true class its {per_kind} most confident correct test images, "
                 f"then its most confident wrong ones", fontsize=8)
    return save(fig, path)
