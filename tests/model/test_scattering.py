"""The scatter classifier (fedbrain.scattering): its head on cached features is the whole model on
the images, it saves and loads, and what it cannot do is refused."""

import numpy as np
import pytest
import tensorflow as tf

from fedbrain import scattering
from fedbrain.dataset import Split
from fedbrain.errors import InputError
from fedbrain.models import build_model, load
from fedbrain.privacy.dp_sgd import private_model
from fedbrain.train import compile_model, fit

NO_AUGMENT = {"rotation_deg": 0, "hflip": False, "vflip": False, "brightness": 0.0}


def _split(n: int, seed: int, prefix: str, size: int = 32, channels: int = 1) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size, channels), dtype=np.float32)
    images[: n // 2, : size // 2] += 0.5  # something to learn
    labels = (np.arange(n) >= n // 2).astype(np.int64) * 2
    return Split(np.clip(images, 0, 1), labels, None, [f"{prefix}{i}" for i in range(n)],
                 [f"{prefix}p{i}" for i in range(n)])


def test_scatter_classifier_has_weights_only_in_its_head():
    model = build_model("scatter", (32, 32, 1), 4, normalization="group")
    front, head = scattering.front_and_head(model)
    assert not front.weights
    assert front.compute_output_shape((None, 32, 32, 1)) == (None, 2, 2, 417)  # 1 + 8 x 4 + 64 x 6 paths
    assert [w.shape for w in model.get_weights()] == [(2 * 2 * 417, 4), (4,)]
    assert scattering.front_and_head(build_model("cnn", (32, 32, 1), 4, width=4)) is None


def test_head_on_cached_features_is_the_whole_model_on_the_images():
    """The clipped, summed per-example gradients of DP-SGD (noise off) and the predictions: the
    head over the features equals the whole model over the images."""
    tf.keras.utils.set_random_seed(3)
    model = build_model("scatter", (32, 32, 1), 4)
    private = compile_model(private_model(model, l2_norm_clip=20.0, noise_multiplier=0.0), "classification", 0.01)
    head = scattering.training_view(private)
    data = _split(12, 0, "a")
    features = scattering.features(model, data)
    y = tf.one_hot(data.labels, 4)
    whole, whole_norms, _ = private.clipped_gradient_sum(tf.constant(data.images), y)
    part, part_norms, _ = head.clipped_gradient_sum(tf.constant(features.images), y)
    assert float(tf.reduce_max(whole_norms)) > 20.0 > float(tf.reduce_min(whole_norms))  # some clipped, some not
    np.testing.assert_allclose(part_norms.numpy(), whole_norms.numpy(), rtol=1e-5)
    for a, b in zip(part, whole):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(head.predict(features.images, verbose=0), model.predict(data.images, verbose=0),
                               rtol=1e-5, atol=1e-7)


def test_fit_trains_the_shared_weights_and_features_are_computed_once(tmp_path):
    tf.keras.utils.set_random_seed(4)
    model = compile_model(build_model("scatter", (32, 32, 1), 4), "classification", 0.05)
    train, val = _split(16, 1, "t"), _split(8, 2, "v")
    before = [w.copy() for w in model.get_weights()]
    history = fit(model, train, val, "classification", {"batch_size": 8, "augment": NO_AUGMENT}, epochs=3, seed=0,
                  verbose=0)
    assert len(history["val_loss"]) == 3
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert scattering.features(model, train).images is scattering.features(model, train).images
    # Saved whole (images in) and loaded by fedbrain.models.load: the same predictions.
    path = tmp_path / "scatter.keras"
    model.save(path)
    np.testing.assert_allclose(load(path).predict(val.images, verbose=0), model.predict(val.images, verbose=0),
                               rtol=1e-6)


def test_scatter_classifier_refuses_augmentation_and_odd_sizes():
    model = compile_model(build_model("scatter", (32, 32, 1), 4), "classification", 0.01)
    with pytest.raises(InputError, match=r"hflip: True.*set every train\.classifier\.augment"):
        fit(model, _split(8, 1, "t"), None, "classification", {"batch_size": 8, "augment": {**NO_AUGMENT, "hflip": True}},
            epochs=1, seed=0, verbose=0)
    with pytest.raises(InputError, match="multiples of 16"):
        build_model("scatter", (40, 40, 1), 4)


def _one_private_step(noise: float) -> np.ndarray:
    """The head's weights after one DP-SGD step from the same start (seeded model, fresh Adam)."""
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(5)
    model = build_model("scatter", (32, 32, 1), 4)
    private = compile_model(private_model(model, l2_norm_clip=1.0, noise_multiplier=noise), "classification", 0.01)
    data = _split(8, 3, "n")
    scattering.training_view(private).train_on_batch(scattering.features(model, data).images,
                                                     tf.one_hot(data.labels, 4))
    return model.get_weights()[0]


def test_under_dp_the_head_that_trains_is_noised_at_the_planned_multiplier():
    """The DP claim of the scatter classifier: what fit trains is a PrivateModel at the model's clip and
    noise (not a plain view) sharing its optimizer, and its steps carry noise: two steps from the same
    start differ with noise, and are equal without it."""
    from fedbrain.privacy.dp_sgd import PrivateModel

    model = build_model("scatter", (32, 32, 1), 4)
    private = compile_model(private_model(model, l2_norm_clip=1.0, noise_multiplier=2.0), "classification", 0.01)
    head = scattering.training_view(private)
    assert isinstance(head, PrivateModel) and (head.l2_norm_clip, head.noise_multiplier) == (1.0, 2.0)
    assert head.optimizer is private.optimizer
    assert not isinstance(scattering.training_view(compile_model(build_model("scatter", (32, 32, 1), 4),
                                                                  "classification", 0.01)), PrivateModel)
    np.testing.assert_array_equal(_one_private_step(0.0), _one_private_step(0.0))
    assert not np.allclose(_one_private_step(2.0), _one_private_step(2.0))
