"""Training: every model builds and takes a training step; fit's pipeline; the centralized stage + MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import tensorflow as tf

from fedbrain.dataset import load_split
from fedbrain.errors import InputError
from fedbrain.models import build_model
from fedbrain.train import (DiceBCELoss, augment_batch, class_weights, compile_model, fit,
                            run_centralized)


def _one_step(name, shape, classes, task):
    model = build_model(name, shape, classes)
    compile_model(model, task, 1e-3)
    x = np.random.default_rng(0).uniform(size=(2, *shape)).astype("float32")
    y = np.eye(classes)[[0, 1]] if task == "classification" else (x[..., :1] > 0.5).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    return model, logs


@pytest.mark.parametrize("channels", [1, 3])
def test_cnn_and_unet_train_one_step(channels):
    model, logs = _one_step("cnn", (32, 32, channels), 4, "classification")
    assert model.output_shape == (None, 4) and "accuracy" in logs
    model, logs = _one_step("unet", (32, 32, channels), 2, "segmentation")
    assert model.output_shape == (None, 32, 32, 1) and "dice" in logs


@pytest.mark.slow
# Gray input (repeated to RGB) for one, 4-channel input (learned 1x1 mix to RGB) for the other.
@pytest.mark.parametrize(("name", "channels"), [("vgg16", 1), ("efficientnet_b0", 4)])
def test_keras_applications_train_one_step(name, channels):
    model, _ = _one_step(name, (32, 32, channels), 3, "classification")
    assert model.output_shape == (None, 3)
    # The paper's head: GAP, BatchNorm, Dropout 0.5, softmax.
    kinds = [type(layer).__name__ for layer in model.layers[-4:]]
    assert kinds == ["GlobalAveragePooling2D", "BatchNormalization", "Dropout", "Dense"]
    assert model.layers[-2].rate == 0.5


def test_bad_weights_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_model("vgg16", (32, 32, 1), 2, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(InputError, match="no pretrained weights"):
        build_model("cnn", (32, 32, 1), 2, weights="imagenet")
    with pytest.raises(InputError, match="unknown model"):
        build_model("resnet", (32, 32, 1), 2)


def test_cnn_width_scales_its_stages_and_is_checked():
    narrow = build_model("cnn", (32, 32, 1), 4, normalization="group", width=8)
    default = build_model("cnn", (32, 32, 1), 4, normalization="group")
    # Four stages of 8, 16, 32, 64 channels instead of 32 .. 256: about 16x fewer weights.
    assert [layer.filters for layer in narrow.layers if type(layer).__name__ == "Conv2D"][-1] == 64
    assert 12 < default.count_params() / narrow.count_params() < 20
    with pytest.raises(InputError, match="no width setting"):
        build_model("unet", (32, 32, 1), 2, width=8)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(InputError, match="positive whole number"):
            build_model("cnn", (32, 32, 1), 4, width=bad)


def test_imagenet_unreachable_is_a_clear_error(monkeypatch):
    # No internet here: make sure the error says what to do rather than leaking a socket trace.
    def offline(*args, **kwargs):
        raise OSError("no network")

    from keras.src.utils import data_utils  # where Keras 2.15's applications fetch weights from

    monkeypatch.setattr(data_utils, "get_file", offline)
    with pytest.raises(InputError, match="ImageNet weights"):
        build_model("efficientnet_b0", (32, 32, 3), 2, weights="imagenet")


def test_models_round_trip_through_keras_files(tmp_path):
    model = compile_model(build_model("unet", (32, 32, 1), 2), "segmentation", 1e-3)
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(tmp_path / "m.keras", compile=False)
    x = np.random.default_rng(1).uniform(size=(1, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), atol=1e-6)


def test_class_weights_balance_and_skip_absent_classes():
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(weights, [4 / 6, 4 / 2, 0.0])


def test_dice_bce_is_zero_for_a_perfect_mask_and_per_example():
    y = np.zeros((2, 8, 8, 1), "float32")
    y[0, 2:5, 2:5] = 1
    loss = DiceBCELoss(reduction=tf.keras.losses.Reduction.NONE)(y, y)
    assert loss.shape == (2,) and np.allclose(loss, 0.0, atol=1e-5)


def test_augmentation_moves_masks_with_their_images():
    images = np.zeros((4, 16, 16, 1), "float32")
    images[:, 2:6, 9:14] = 1.0
    masks = images.copy()
    out_images, out_masks = augment_batch(tf.constant(images), tf.constant(masks), tf.constant([3, 7], tf.int64),
                                          {"rotation_deg": 15, "hflip": True, "vflip": True, "brightness": 0.0})
    out_images, out_masks = out_images.numpy(), out_masks.numpy()
    assert not np.array_equal(out_images, images)  # something moved
    assert set(np.unique(out_masks)) <= {0.0, 1.0}  # masks stay binary (nearest neighbour)
    # Where the (bilinear) image is clearly foreground, the mask is too.
    assert np.all(out_masks[out_images > 0.9] == 1.0)
    assert np.all(out_masks[out_images < 0.1] == 0.0)


def test_fit_learns_and_returns_shared_history_keys(classification_data):
    processed, partition = classification_data
    train, val = load_split(processed, partition, "train"), load_split(processed, partition, "val")
    model = compile_model(build_model("cnn", (32, 32, 1), 4), "classification", 3e-3)
    history = fit(model, train, val, "classification", {"batch_size": 8}, epochs=2, seed=0, verbose=0)
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(history)
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))


def test_fit_refuses_a_negative_intensity_amount_before_training(classification_data):
    processed, partition = classification_data
    train = load_split(processed, partition, "train")
    model = compile_model(build_model("cnn", (32, 32, 1), 4), "classification", 3e-3)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(InputError, match=r"augment\.noise"):
        fit(model, train, None, "classification", {"batch_size": 8, "augment": {"noise": -0.05}}, epochs=1, seed=0,
            verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_default_classifier_predicts_above_chance_after_few_steps(classification_data):
    """A small set (the embedded sample, one hospital): a few steps per epoch. Predictions use the
    BatchNormalization moving statistics, which must have caught up with the weights by then."""
    processed, partition = classification_data
    train, val = load_split(processed, partition, "train"), load_split(processed, partition, "val")
    tf.keras.utils.set_random_seed(0)
    model = compile_model(build_model("cnn", (32, 32, 1), 4), "classification", 3e-3)
    augment = {"rotation_deg": 0, "hflip": False, "vflip": False, "brightness": 0.0}
    fit(model, train, None, "classification", {"batch_size": 8, "augment": augment}, epochs=25, seed=0, verbose=0)
    proba = model.predict(np.concatenate([train.images, val.images]), verbose=0)
    labels = np.concatenate([train.labels, val.labels])
    # 4 classes: chance is 0.25 (and a model judged by lagging statistics predicts one class).
    assert (proba.argmax(axis=1) == labels).mean() >= 0.8


def test_fit_is_reproducible_with_a_seed(segmentation_data):
    processed, partition = segmentation_data
    train = load_split(processed, partition, "train", hospital=0)

    def run():
        tf.keras.utils.set_random_seed(5)
        model = compile_model(build_model("unet", (32, 32, 3), 2), "segmentation", 1e-3)
        return fit(model, train, None, "segmentation", {"batch_size": 8}, epochs=1, seed=5, verbose=0)

    first, second = run(), run()
    assert "dice" in first
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-4)


def test_run_centralized_saves_models_and_one_mlflow_run_each(segmentation_data, tiny_params, tmp_path):
    processed, partition = segmentation_data
    out = tmp_path / "models" / "centralized"
    cards = run_centralized(tiny_params, processed, partition, out)
    assert set(cards) == {"classifier", "segmenter"}
    for role in ("classifier", "segmenter"):
        assert (out / f"{role}.keras").is_file()
        card = json.loads((out / f"{role}.json").read_text())
        assert card["training"] == "centralized" and len(card["history"]["loss"]) == 2
        tf.keras.models.load_model(out / f"{role}.keras", compile=False)
    assert set(json.loads((out / "history.json").read_text())) == {"classifier", "segmenter"}
    assert not list(out.glob(".*tmp*"))
    # The classifier's temperature (fedbrain.reliability), fitted on the validation split; none for a segmenter.
    assert 0.25 <= cards["classifier"]["temperature"] <= 8.0
    assert cards["classifier"]["temperature_fitted_on"] == "validation split (4 images)"
    assert "temperature" not in cards["segmenter"]

    mlflow.set_tracking_uri(tiny_params["mlflow"]["tracking_uri"])
    client = mlflow.MlflowClient()
    run = client.get_run(cards["segmenter"]["run_id"])
    assert run.data.tags["task"] == "segmentation" and run.data.tags["training"] == "centralized"
    assert run.data.tags["model"] == "unet"
    assert run.data.params["train.segmenter.model"] == "unet"
    assert run.data.params["train.seed"] == "1"
    steps = client.get_metric_history(run.info.run_id, "val_dice")
    assert [m.step for m in steps] == [0, 1]
    assert {"train_loss", "train_dice", "val_loss", "learning_rate"} <= set(run.data.metrics)
    run = client.get_run(cards["classifier"]["run_id"])
    assert {"train_accuracy", "val_accuracy"} <= set(run.data.metrics)
    assert run.data.metrics["temperature"] == pytest.approx(cards["classifier"]["temperature"])
    # Lineage: both models name the one training dataset they fit on, and their params' digest.
    digests = {client.get_run(card["run_id"]).inputs.dataset_inputs[0].dataset.digest for card in cards.values()}
    assert len(digests) == 1 and "fedbrain.params_digest" in run.data.tags
    assert run.data.tags["task"] == "classification"
    # The model is logged as an MLflow TensorFlow model and loads back.
    loaded = mlflow.tensorflow.load_model(f"runs:/{run.info.run_id}/model")
    assert loaded.output_shape == (None, 2)


def test_tumour_slices_are_oversampled_for_segmentation_only(segmentation_data):
    from fedbrain.train import epoch_indices

    processed, partition = segmentation_data
    train = load_split(processed, partition, "train")
    tumour = int((train.masks.reshape(len(train), -1).max(axis=1) > 0).sum())
    assert 0 < tumour < len(train)
    assert len(epoch_indices(train, "segmentation", 3)) == len(train) + 2 * tumour
    assert list(epoch_indices(train, "classification", 3)) == list(range(len(train)))


@pytest.mark.parametrize("count, batch_size", [(10, 4), (10, 5), (7, 32)])
def test_training_batches_hold_each_image_once_and_each_epoch_is_one_pass(count, batch_size):
    # DP-SGD's noise covers one clipped gradient per image per step: a batch that ran on into the
    # next epoch's shuffle (or a batch larger than the data) would hold an image twice.
    from fedbrain.dataset import Split
    from fedbrain.train import make_dataset

    images = np.broadcast_to(np.arange(count, dtype=np.float32)[:, None, None, None], (count, 2, 2, 1)).copy()
    split = Split(images, np.zeros(count, np.int64), None, [str(i) for i in range(count)], [None] * count)
    steps = -(-count // batch_size)
    dataset = make_dataset(split, "classification", 2, batch_size, seed=3, training=True, augment={})
    batches = [sorted(int(v) for v in x[:, 0, 0, 0].numpy()) for x, _ in dataset.take(3 * steps)]
    for batch in batches:
        assert len(batch) == len(set(batch))
    epochs = [sum(batches[e * steps:(e + 1) * steps], []) for e in range(3)]
    assert all(sorted(epoch) == list(range(count)) for epoch in epochs)


def test_scanner_intensity_changes_intensities_only_and_keeps_the_geometric_draws():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, (6, 16, 16, 3)).astype("float32")
    masks = (images[..., :1] > 0.5).astype("float32")
    seed = tf.constant([3, 7], tf.int64)
    geometry = {"rotation_deg": 15, "hflip": True, "vflip": True, "brightness": 0.0}
    plain_images, plain_masks = augment_batch(tf.constant(images), tf.constant(masks), seed, geometry)
    scanner = {**geometry, "gamma": 0.5, "contrast": 0.3, "channel_scale": 0.2, "noise": 0.05}
    out_images, out_masks = augment_batch(tf.constant(images), tf.constant(masks), seed, scanner)
    # Same flips and rotations (masks identical), other intensities, still in [0, 1].
    np.testing.assert_array_equal(out_masks.numpy(), plain_masks.numpy())
    assert not np.allclose(out_images.numpy(), plain_images.numpy(), atol=1e-3)
    assert out_images.numpy().min() >= 0.0 and out_images.numpy().max() <= 1.0
    # Gains differ between channels of one image (per-channel scaling, not one factor for all).
    ratios = (out_images.numpy() / np.maximum(plain_images.numpy(), 1e-3)).mean(axis=(1, 2))
    assert np.ptp(ratios, axis=1).max() > 0.02
    # Gamma alone: one exponent per image (the same for all its pixels), drawn anew for each image
    # within [1 / 1.5, 1.5].
    only_gamma = augment_batch(tf.constant(images), None, seed, {"gamma": 0.5})[0].numpy()
    inside = (images > 0.05) & (images < 0.95)
    exponents = [np.log(only_gamma[k][inside[k]]) / np.log(images[k][inside[k]]) for k in range(len(images))]
    assert max(np.ptp(e) for e in exponents) < 1e-3
    gammas = np.array([e.mean() for e in exponents])
    assert np.ptp(gammas) > 0.05 and gammas.min() >= 1 / 1.5 - 1e-4 and gammas.max() <= 1.5 + 1e-4


def test_scanner_intensity_off_is_the_identity_and_a_negative_amount_names_its_key():
    images = tf.constant(np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 1)).astype("float32"))
    from fedbrain.train import scanner_intensity

    same = scanner_intensity(images, tf.constant([1, 2], tf.int64), {"gamma": 0, "noise": 0.0})
    np.testing.assert_array_equal(same.numpy(), images.numpy())
    from fedbrain.train import check_augment

    for bad in (-0.1, float("nan"), float("inf"), "a lot", None, True):
        with pytest.raises(InputError, match=r"augment\.contrast"):
            check_augment({"contrast": bad})
    check_augment({"contrast": 0.2, "gamma": 0})


def test_missing_sequences_copy_flair_over_pre_or_post_contrast_and_leave_the_rest():
    rng = np.random.default_rng(2)
    images = rng.uniform(0.0, 1.0, (60, 8, 8, 3)).astype("float32")
    masks = (images[..., :1] > 0.5).astype("float32")
    seed = tf.constant([5, 9], tf.int64)
    geometry = {"rotation_deg": 10, "hflip": True, "vflip": True}
    plain_images, plain_masks = augment_batch(tf.constant(images), tf.constant(masks), seed, geometry)
    out, out_masks = augment_batch(tf.constant(images), tf.constant(masks), seed, {**geometry, "missing_sequence": 1.0})
    out, plain = out.numpy(), plain_images.numpy()
    # Masks and the geometric draws do not move; FLAIR (channel 1) is untouched.
    np.testing.assert_array_equal(out_masks.numpy(), plain_masks.numpy())
    np.testing.assert_array_equal(out[..., 1], plain[..., 1])
    pre_gone = np.all(out[..., 0] == out[..., 1], axis=(1, 2))
    post_gone = np.all(out[..., 2] == out[..., 1], axis=(1, 2))
    # Every image lost pre-contrast, post-contrast or both; all three patterns occur; a kept channel is its own.
    assert np.all(pre_gone | post_gone)
    assert (pre_gone & ~post_gone).any() and (~pre_gone & post_gone).any() and (pre_gone & post_gone).any()
    np.testing.assert_array_equal(out[~pre_gone][..., 0], plain[~pre_gone][..., 0])
    np.testing.assert_array_equal(out[~post_gone][..., 2], plain[~post_gone][..., 2])
    # A share: about that many images touched; 0 is the identity.
    some = augment_batch(tf.constant(images), None, seed, {"missing_sequence": 0.3})[0].numpy()
    touched = np.any(some != images, axis=(1, 2, 3)).mean()
    assert 0.1 < touched < 0.5
    none = augment_batch(tf.constant(images), None, seed, {"missing_sequence": 0.0})[0].numpy()
    np.testing.assert_array_equal(none, images)


def test_missing_sequence_must_be_a_probability_and_needs_three_sequences():
    from fedbrain.train import check_augment

    for bad in (-0.1, 1.5, float("nan"), "often"):
        with pytest.raises(InputError, match=r"augment\.missing_sequence"):
            check_augment({"missing_sequence": bad}, 3)
    with pytest.raises(InputError, match=r"missing_sequence.*1 channel\(s\).*set it to 0"):
        check_augment({"missing_sequence": 0.2}, 1)
    check_augment({"missing_sequence": 0.0}, 1)
    check_augment({"missing_sequence": 0.2}, 3)
