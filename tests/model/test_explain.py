"""explain: Grad-CAM finds the evidence, on every fedbrain classifier; models without one say why."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fedbrain.explain import GradCam, NotExplainable, gallery_picks, plot_gallery, write_overlay
from fedbrain.models import build_model

SIZE, HALF = 32, 16


def quadrant_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise with a bright 6x6 square in quadrant `label` (0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right), at least 4 pixels from the midlines so the square's evidence is its quadrant's."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.uniform(0.0, 0.05, (n, SIZE, SIZE, 1)).astype(np.float32)
    for i, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        dy, dx = rng.integers(2, HALF - 6 - 4 + 1, size=2)
        y = dy if row == 0 else SIZE - dy - 6
        x = dx if column == 0 else SIZE - dx - 6
        images[i, y:y + 6, x:x + 6] = 0.9
    return images, labels


def test_the_heat_map_puts_most_of_its_mass_in_the_squares_quadrant():
    """A small conv net learns the quadrant; Grad-CAM of its class must point at the square.

    Its head reads the flattened feature maps, as a quadrant needs (global pooling would forget
    where the square is), with non-negative weights: a class is then evidence *for* its square,
    not against squares elsewhere, whose Grad-CAM would rightly point elsewhere."""
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inputs = tf.keras.Input((SIZE, SIZE, 1))
    x = layers.MaxPooling2D(2)(layers.Conv2D(8, 3, padding="same", activation="relu")(inputs))
    x = layers.MaxPooling2D(2)(layers.Conv2D(8, 3, padding="same", activation="relu")(x))
    outputs = layers.Dense(4, activation="softmax",
                           kernel_constraint=tf.keras.constraints.NonNeg())(layers.Flatten()(x))
    model = tf.keras.Model(inputs, outputs)
    model.compile(tf.keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    images, labels = quadrant_images(200, seed=0)
    model.fit(images, labels, epochs=6, batch_size=16, verbose=0)
    test_images, test_labels = quadrant_images(40, seed=1)
    assert model.evaluate(test_images, test_labels, verbose=0)[1] == 1.0

    maps, proba = GradCam(model)(test_images)
    assert maps.shape == (40, SIZE, SIZE) and maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)
    assert np.allclose(proba, model(test_images).numpy(), atol=1e-5)
    shares = []
    for heat, label in zip(maps, test_labels):
        row, column = divmod(int(label), 2)
        shares.append(heat[row * HALF:(row + 1) * HALF, column * HALF:(column + 1) * HALF].sum() / heat.sum())
    assert min(shares) > 0.6 and np.mean(shares) > 0.7, shares


def test_every_fedbrain_classifier_has_a_heat_map(tmp_path):
    """cnn: its last residual block; vgg16 and efficientnet_b0: their nested Keras Applications backbone,
    also after a round trip through a .keras file (the nested model is rebuilt there)."""
    images = np.random.default_rng(0).uniform(size=(3, SIZE, SIZE, 1)).astype(np.float32)
    expected = {"cnn": "activation", "vgg16": "vgg16", "efficientnet_b0": "efficientnetb0"}
    for name, layer in expected.items():
        model = build_model(name, (SIZE, SIZE, 1), 4)
        if name == "vgg16":
            model.save(tmp_path / "vgg16.keras")
            model = tf.keras.models.load_model(tmp_path / "vgg16.keras", compile=False)
        explainer = GradCam(model)
        assert explainer.layer.name.startswith(layer), (name, explainer.layer.name)
        maps, proba = explainer(images, np.array([0, 1, 3]))
        assert maps.shape == (3, SIZE, SIZE) and np.isfinite(maps).all() and 0.0 <= maps.min() <= maps.max() <= 1.0
        assert np.allclose(proba, model(images).numpy(), atol=1e-5)


def test_a_segmenter_or_a_network_without_convolutions_is_not_explainable():
    with pytest.raises(NotExplainable, match="segmenter.*class score"):
        GradCam(build_model("unet", (SIZE, SIZE, 1), 2))
    inputs = tf.keras.Input((SIZE, SIZE, 1))
    flat = tf.keras.layers.Flatten()(tf.keras.layers.Rescaling(2.0)(inputs))
    dense = tf.keras.layers.Dense(3, activation="softmax")(flat)
    with pytest.raises(NotExplainable, match="no convolutional block"):
        GradCam(tf.keras.Model(inputs, dense))


def test_an_overlay_that_fails_to_write_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    image, heat = np.zeros((SIZE, SIZE, 1), np.float32), np.zeros((SIZE, SIZE), np.float32)
    path = write_overlay(image, heat, "glioma p=0.97", tmp_path / "a_gradcam.png")
    assert path.read_bytes().startswith(b"\x89PNG")

    def broken(self, target, **kwargs):
        with open(target, "wb") as half:
            half.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_overlay(image, heat, "glioma p=0.97", tmp_path / "b_gradcam.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_gradcam.png"]


def test_gallery_picks_the_most_confident_correct_and_wrong_per_true_class(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.95, 0.05], [0.4, 0.6]])
    assert gallery_picks(labels, proba, per_kind=1) == {0: {"correct": [0], "wrong": [2]},
                                                       1: {"correct": [3], "wrong": [4]}}
    assert gallery_picks(labels, proba, per_kind=3)[0] == {"correct": [0, 1], "wrong": [2]}
    model = build_model("cnn", (SIZE, SIZE, 1), 2)
    images = np.random.default_rng(0).uniform(size=(6, SIZE, SIZE, 1)).astype(np.float32)
    path = plot_gallery(model, images, labels, proba, ["a", "b"], "test", tmp_path / "explanations.png")
    assert path.stat().st_size > 1000
