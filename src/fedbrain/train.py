"""Training: loss and metrics, the tf.data input pipeline, ``fit``, and the centralized baseline.

``compile_model`` and ``fit`` are what every trainer calls: the centralized baseline below and
each hospital's Flower ClientApp. They hold nothing centralized: data in (a ``Split``), weights
and a history out. ``run_centralized`` is the pooled-data stage (``fedbrain train-centralized``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from fedbrain import scattering
from fedbrain.config import get, section
from fedbrain.dataset import Split, load_classes, load_split, write_atomic, write_text_atomic
from fedbrain.errors import InputError

TASKS = ("classification", "segmentation")

# fit's options; a hospital may pass a partial dict (e.g. only epochs differ per round).
FIT_DEFAULTS: dict[str, Any] = {
    "batch_size": 32,
    "lr_schedule": "cosine",  # cosine | constant
    "warmup_epochs": 1,
    "patience": 8,  # early stopping on `monitor`, best weights restored
    "monitor": "val_loss",
    "augment": {"rotation_deg": 15.0, "hflip": True, "vflip": True, "brightness": 0.1},
}


# --------------------------------------------------------------------------- loss and metrics

@tf.keras.utils.register_keras_serializable(package="fedbrain")
class DiceBCELoss(tf.keras.losses.Loss):
    """Binary cross-entropy + (1 - soft Dice), one value per image.

    Per-image values (not a batch mean) so a DP optimizer can clip per example. The Dice term
    counts only for images whose mask has tumour: on an empty mask the soft Dice is ~0 unless the
    summed probabilities stay below ~``smooth``, which taught the network to under-segment and
    miss small tumours (measured: 21 of 80 test tumour slices missed); BCE alone penalises false
    positives on empty slices.
    """

    def __init__(self, smooth: float = 1.0, name: str = "dice_bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, y_pred.dtype)
        axes = tf.range(1, tf.rank(y_pred))
        bce = tf.reduce_mean(tf.keras.backend.binary_crossentropy(y_true, y_pred), axis=axes)
        intersection = tf.reduce_sum(y_true * y_pred, axis=axes)
        total = tf.reduce_sum(y_true, axis=axes) + tf.reduce_sum(y_pred, axis=axes)
        dice = (2.0 * intersection + self.smooth) / (total + self.smooth)
        has_tumour = tf.cast(tf.reduce_sum(y_true, axis=axes) > 0, y_pred.dtype)
        return bce + has_tumour * (1.0 - dice)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@tf.keras.utils.register_keras_serializable(package="fedbrain")
class Dice(tf.keras.metrics.Metric):
    """Dice of the thresholded masks over all pixels seen in an epoch (1.0 when both are empty)."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.intersection = self.add_weight(name="intersection", initializer="zeros")
        self.total = self.add_weight(name="total", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.cast(y_true > 0.5, tf.float32)
        y_pred = tf.cast(y_pred > self.threshold, tf.float32)
        self.intersection.assign_add(tf.reduce_sum(y_true * y_pred))
        self.total.assign_add(tf.reduce_sum(y_true) + tf.reduce_sum(y_pred))

    def result(self):
        return tf.where(self.total > 0, 2.0 * self.intersection / tf.maximum(self.total, 1.0), 1.0)

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


def _is_dp_optimizer(optimizer) -> bool:
    # TF-Privacy's DPKeras* optimizers clip per example: they need one loss value per example.
    return optimizer is not None and hasattr(optimizer, "_num_microbatches")


def compile_model(model: tf.keras.Model, task: str, learning_rate: float, optimizer=None,
                  label_smoothing: float = 0.0) -> tf.keras.Model:
    """Loss, metrics and optimizer for a task; metric names are shared by every trainer.

    classification: categorical cross-entropy (labels are one-hot in ``fit``, which label
    smoothing needs), metric ``accuracy``. segmentation: Dice + BCE, metric ``dice``.
    ``optimizer`` replaces the default Adam (e.g. a TF-Privacy DP optimizer).
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    reduction = (tf.keras.losses.Reduction.NONE if _is_dp_optimizer(optimizer)
                 else tf.keras.losses.Reduction.AUTO)
    if optimizer is None:
        optimizer = tf.keras.optimizers.Adam(learning_rate)
    if task == "classification":
        loss = tf.keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=reduction)
        metric = "accuracy"
    else:
        loss = DiceBCELoss(reduction=reduction)
        metric = Dice()  # one model only: compile_view shares `metric` with the scatter classifier's head alone
    model.compile(optimizer=optimizer, loss=loss, metrics=[metric])
    # The scatter classifier trains its head on features computed once (fedbrain.scattering).
    scattering.compile_view(model, loss, metric)
    return model


# --------------------------------------------------------------------------- input pipeline

def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced weights n / (k * count) for the classes present; absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


def _rotation_transforms(angles, height: float, width: float):
    """Projective transforms (as ImageProjectiveTransformV3 wants them) rotating about the centre."""
    cos, sin = tf.cos(angles), tf.sin(angles)
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    zeros = tf.zeros_like(angles)
    return tf.stack([cos, -sin, x_offset, sin, cos, y_offset, zeros, zeros], axis=1)


def augment_batch(images, masks, seed, augment: dict):
    """Random rotation, flips, brightness, `missing_sequences` and `scanner_intensity` for a batch; masks
    follow the geometry.

    Stateless ops seeded by (fit seed, batch number): the same run gives the same batches.
    Images are interpolated bilinearly, masks with nearest neighbour so they stay binary.
    """
    n = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 4)

    def flip(tensor, do, axis):
        return None if tensor is None else tf.where(do[:, None, None, None], tf.reverse(tensor, [axis]), tensor)

    if augment.get("hflip"):
        do = tf.random.stateless_uniform([n], seeds[0]) < 0.5
        images, masks = flip(images, do, 2), flip(masks, do, 2)
    if augment.get("vflip"):
        do = tf.random.stateless_uniform([n], seeds[1]) < 0.5
        images, masks = flip(images, do, 1), flip(masks, do, 1)
    max_angle = math.radians(float(augment.get("rotation_deg", 0.0)))
    if max_angle > 0:
        angles = tf.random.stateless_uniform([n], seeds[2], -max_angle, max_angle)
        transforms = _rotation_transforms(angles, float(height), float(width))

        def rotate(tensor, interpolation):
            return tf.raw_ops.ImageProjectiveTransformV3(
                images=tensor, transforms=transforms, output_shape=[height, width], fill_value=0.0,
                interpolation=interpolation, fill_mode="CONSTANT")

        images = rotate(images, "BILINEAR")
        masks = None if masks is None else rotate(masks, "NEAREST")
    brightness = float(augment.get("brightness", 0.0))
    if brightness > 0:
        delta = tf.random.stateless_uniform([n, 1, 1, 1], seeds[3], -brightness, brightness)
        images = tf.clip_by_value(images + delta, 0.0, 1.0)
    images = missing_sequences(images, tf.random.experimental.stateless_fold_in(seed, 2),
                               float(augment.get("missing_sequence", 0.0)))
    return scanner_intensity(images, tf.random.experimental.stateless_fold_in(seed, 1), augment), masks


INTENSITY_AUGMENTS = ("gamma", "contrast", "channel_scale", "noise")
# TCGA-LGG's channel order (the dataset's README): pre-contrast, FLAIR, post-contrast.
FLAIR_CHANNEL, SEQUENCES = 1, 3


def missing_sequences(images, seed, probability: float):
    """A hospital that did not acquire every sequence, as TCGA-LGG stores it: "missing sequences are
    replaced with FLAIR" (its README; 9 of its 110 patients lack post-contrast, 6 pre-contrast, and
    TCGA_DU_7013 here has FLAIR in all three channels). With `probability` per image, its
    pre-contrast, its post-contrast or both (one of the three, equally likely) become copies of its
    FLAIR channel; the mask does not change, since the tumour is outlined on FLAIR. 0 leaves the
    images as they are. 3-channel images only (`check_augment` says so before training)."""
    if probability <= 0:
        return images
    n = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    missing = tf.random.stateless_uniform([n], seeds[0]) < probability
    which = tf.random.stateless_uniform([n], seeds[1], 0, 3, dtype=tf.int32)  # 0 pre, 1 post, 2 both
    flair = images[..., FLAIR_CHANNEL:FLAIR_CHANNEL + 1]

    def filled(channel: int, gone):
        return tf.where((missing & gone)[:, None, None, None], flair, images[..., channel:channel + 1])

    return tf.concat([filled(0, which != 1), flair, filled(2, which != 0)], axis=-1)


def scanner_intensity(images, seed, augment: dict):
    """What another scanner or protocol does to a [0, 1] image's intensities (masks do not move):
    gamma, contrast about the image's mean, a gain per channel (MR sequences are scaled
    independently), Gaussian noise. Each setting is the largest change drawn, uniformly per image:
      gamma g:          intensity ** gamma, gamma log-uniform in [1 / (1 + g), 1 + g]
      contrast c:       mean + (x - mean) * k per image and channel, k in [1 - c, 1 + c]
      channel_scale s:  x * k per image and channel, k in [1 - s, 1 + s]
      noise sigma:      x + N(0, sd^2), sd uniform in [0, sigma] per image
    0 (the default) leaves that one out. Seeded apart from the geometric draws (fold_in), so turning
    these on does not change a run's flips and rotations. Clipped to [0, 1] as training expects.
    The amounts are checked by `check_augment` before the input pipeline traces this."""
    gamma, contrast = float(augment.get("gamma", 0.0)), float(augment.get("contrast", 0.0))
    scale, noise = float(augment.get("channel_scale", 0.0)), float(augment.get("noise", 0.0))
    if not (gamma or contrast or scale or noise):
        return images
    n, channels = tf.shape(images)[0], tf.shape(images)[3]
    seeds = tf.random.experimental.stateless_split(seed, 5)
    if gamma > 0:
        log_gamma = tf.random.stateless_uniform([n, 1, 1, 1], seeds[0], -math.log1p(gamma), math.log1p(gamma))
        # The small floor keeps the gradient-free pow away from 0 ** negative; values stay in [0, 1].
        images = tf.pow(tf.maximum(images, 1e-6), tf.exp(log_gamma))
    if contrast > 0:
        factor = tf.random.stateless_uniform([n, 1, 1, channels], seeds[1], 1.0 - contrast, 1.0 + contrast)
        mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = mean + (images - mean) * factor
    if scale > 0:
        images = images * tf.random.stateless_uniform([n, 1, 1, channels], seeds[2], 1.0 - scale, 1.0 + scale)
    if noise > 0:
        sd = tf.random.stateless_uniform([n, 1, 1, 1], seeds[3], 0.0, noise)
        images = images + sd * tf.random.stateless_normal(tf.shape(images), seeds[4])
    return tf.clip_by_value(images, 0.0, 1.0)


def check_augment(augment: dict, channels: int | None = None) -> None:
    """InputError naming the key for an intensity amount that is negative or not a number, or a
    missing_sequence that is not a probability or meets images without TCGA-LGG's three sequences:
    checked once before the input pipeline is built, not inside its traced map."""
    for key in INTENSITY_AUGMENTS:
        value = get(augment, key, float, "train.*.augment", default=0.0)  # names the key if not a number
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"params.yaml: 'train.*.augment.{key}' is {value!r}; use 0 (off) or a "
                             "positive amount")
    missing = get(augment, "missing_sequence", float, "train.*.augment", default=0.0)
    if not 0.0 <= missing <= 1.0:  # NaN fails too
        raise InputError(f"params.yaml: 'train.*.augment.missing_sequence' is {missing!r}; use a probability "
                         "in [0, 1] (0: off)")
    if missing > 0 and channels is not None and channels != SEQUENCES:
        raise InputError(f"params.yaml: 'train.*.augment.missing_sequence' is {missing} but the images have "
                         f"{channels} channel(s); it copies FLAIR (channel {FLAIR_CHANNEL}) over the pre- and "
                         "post-contrast channels of 3-sequence MRI (TCGA-LGG): set it to 0 for this data")


def epoch_indices(split: Split, task: str, oversample_tumour: int = 1) -> np.ndarray:
    """The rows one training epoch visits: all, plus tumour slices (oversample_tumour - 1) more times.

    Most MRI slices hold no tumour; showing each tumour slice more often spends more of the
    CPU budget on the pixels the Dice score is about (segmentation only).
    """
    rows = np.arange(len(split), dtype=np.int64)
    if task != "segmentation" or oversample_tumour <= 1 or split.masks is None:
        return rows
    tumour = rows[np.asarray(split.masks).reshape(len(split), -1).any(axis=1)]
    return np.concatenate([rows] + [tumour] * (oversample_tumour - 1))


def make_dataset(split: Split, task: str, num_classes: int, batch_size: int, seed: int,
                 training: bool, augment: dict | None = None, weights: np.ndarray | None = None,
                 rows: np.ndarray | None = None):
    """Batches of (image, target[, sample weight]); training batches are shuffled, endless, augmented.

    Indices are shuffled and batched, then each batch gathers its images from one in-memory
    tensor: no per-example Python and no shuffle buffer holding image copies. Training batches
    are cut epoch by epoch (the last of an epoch may be smaller; a batch larger than the data is
    all of it once): a batch that ran on into the next epoch's shuffle could hold an image twice,
    and DP-SGD's noise is calibrated to one clipped gradient per image per step.
    """
    images = tf.constant(split.images, tf.float32)
    if task == "classification":
        targets = tf.one_hot(split.labels, num_classes)
    else:
        if split.masks is None:
            raise InputError("segmentation needs masks; this dataset has none (classes.json has_masks false)")
        targets = tf.constant(split.masks, tf.float32)
    sample_weights = None if weights is None else tf.gather(tf.constant(weights), split.labels)
    rows = np.arange(len(split), dtype=np.int64) if rows is None else rows
    batches = tf.data.Dataset.from_tensor_slices(rows)
    if training:
        batches = batches.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    batches = batches.batch(batch_size)
    if training:
        batches = batches.repeat()
    batches = batches.enumerate()
    augment = augment or {}

    def load(step, idx):
        x, y = tf.gather(images, idx), tf.gather(targets, idx)
        if training:
            batch_seed = tf.stack([tf.cast(seed, tf.int64), step])
            x, masks = augment_batch(x, y if task == "segmentation" else None, batch_seed, augment)
            if task == "segmentation":
                y = masks
        if sample_weights is not None:
            return x, y, tf.gather(sample_weights, idx)
        return x, y

    # One batch prepared ahead, by one thread, and tf.data's autotuning off. With AUTOTUNE, a
    # process sharing the cores with others (the hospitals of a federation on one machine) often
    # stalled 5-20 s when fit returned, while the pipeline was torn down: 3 hospitals of the full
    # set on 2 cores lost 0-19 s per 1-epoch fit (bench/README, issue 22); alone it never did.
    # Gathering and augmenting a batch costs a small part of a training step, so one thread keeps up.
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.map(load, num_parallel_calls=1).prefetch(1).with_options(options)


# --------------------------------------------------------------------------- fit

class _CosineSchedule(tf.keras.callbacks.Callback):
    """Per-epoch linear warm-up then cosine decay from the compiled learning rate."""

    def __init__(self, epochs: int, warmup: int, schedule: str):
        super().__init__()
        # A short fit (e.g. one local epoch per federated round) must still reach the full rate.
        self.epochs, self.warmup, self.schedule = epochs, min(warmup, max(0, epochs - 1)), schedule
        self.base = None

    def on_train_begin(self, logs=None):
        self.base = float(tf.keras.backend.get_value(self.model.optimizer.learning_rate))

    def rate(self, epoch: int) -> float:
        if self.schedule == "constant":
            return self.base
        if epoch < self.warmup:
            return self.base * (epoch + 1) / (self.warmup + 1)
        progress = (epoch - self.warmup) / max(1, self.epochs - self.warmup)
        return 0.5 * self.base * (1.0 + math.cos(math.pi * progress))

    def on_epoch_begin(self, epoch, logs=None):
        tf.keras.backend.set_value(self.model.optimizer.learning_rate, self.rate(epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(tf.keras.backend.get_value(self.model.optimizer.learning_rate))

    def on_train_end(self, logs=None):
        # Leave the optimizer as compiled: the next fit (next federated round) starts from it.
        tf.keras.backend.set_value(self.model.optimizer.learning_rate, self.base)


class _BestWeights(tf.keras.callbacks.EarlyStopping):
    """EarlyStopping that also restores the best weights when training runs to the end."""

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self.restore_best_weights and self.best_weights is not None and self.stopped_epoch == 0:
            self.model.set_weights(self.best_weights)


def fit(model: tf.keras.Model, train: Split, val: Split | None, task: str, train_params: dict,
        epochs: int, seed: int, class_weight: bool = True, callbacks=(), verbose: int = 1
        ) -> dict[str, list[float]]:
    """Train a compiled model on one Split (pooled, or one hospital's) and return its history.

    Augmentation for training batches only; class weights for imbalance, or logit adjustment for a
    skewed label mix (classification; fedbrain.logit_adjustment);
    early stopping on the validation split with the best weights restored. `seed` fixes the
    shuffle and the augmentation; the caller seeds TensorFlow's global generator (dropout,
    initialisers) once, when it builds the model. Reseeding it here would make Keras trace its
    train and test functions again at every fit (a new global seed is a new trace): ~0.7 s of
    every federated round per hospital on the sample's cnn, for no change in what is trained.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if len(train) == 0:
        raise InputError("the training split is empty: nothing to fit")
    opts = {**FIT_DEFAULTS, **(train_params or {})}
    opts["augment"] = {**FIT_DEFAULTS["augment"], **(opts.get("augment") or {})}
    check_augment(opts["augment"], int(train.images.shape[-1]))
    if (head := scattering.training_view(model, opts["augment"])) is not None:
        # Without augmentation the whole model on the images and its head on their features are
        # one computation; the features are computed once per process (fedbrain.scattering).
        train, val = scattering.features(model, train), None if val is None else scattering.features(model, val)
        model = head
    where = "train"
    batch_size = get(opts, "batch_size", int, where)
    schedule = get(opts, "lr_schedule", str, where, choices=("cosine", "constant"))

    num_classes = int(model.output_shape[-1]) if task == "classification" else 1
    weights = class_weights(train.labels, num_classes) if (class_weight and task == "classification") else None
    all_callbacks = [_CosineSchedule(epochs, get(opts, "warmup_epochs", int, where), schedule)]
    if task == "classification" and get(opts, "logit_adjustment", bool, where, default=False):
        if weights is not None:
            raise InputError("train.classifier: class_weight and logit_adjustment both correct for the label mix; "
                             "set one of them to false")
        from fedbrain.logit_adjustment import logit_adjustment

        all_callbacks.append(logit_adjustment(model, train.labels, num_classes))
    rows = epoch_indices(train, task, get(opts, "oversample_tumour", int, where, default=1))
    train_ds = make_dataset(train, task, num_classes, batch_size, seed, training=True,
                            augment=opts["augment"], weights=weights, rows=rows)
    steps = math.ceil(len(rows) / batch_size)
    val_ds = None
    if val is not None and len(val) > 0:
        val_ds = make_dataset(val, task, num_classes, batch_size, seed, training=False)
        monitor = get(opts, "monitor", str, where)
        mode = "max" if monitor.endswith(("accuracy", "dice")) else "min"
        all_callbacks.append(_BestWeights(monitor=monitor, mode=mode, patience=get(opts, "patience", int, where),
                                          restore_best_weights=True, verbose=1 if verbose else 0))
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, steps_per_epoch=steps,
                        callbacks=all_callbacks + list(callbacks), verbose=verbose)
    return {key: [float(v) for v in values] for key, values in history.history.items()}


# --------------------------------------------------------------------------- saving

def save_model(model: tf.keras.Model, path: Path, card: dict) -> None:
    """``<name>.keras`` plus its card ``<name>.json`` (what evaluate and predict read).

    The card's keys: task, model, training (centralized | federated), privacy, epsilon,
    classes, run_id (the MLflow run to add test metrics to), history (per epoch or round), and a
    classifier's temperature (with temperature_fitted_on; fedbrain.reliability).
    """
    path = Path(path)
    write_atomic(path, lambda tmp: model.save(tmp))
    write_text_atomic(path.with_suffix(".json"), json.dumps(card, indent=2))


def load_card(model_path: Path) -> dict:
    card_path = Path(model_path).with_suffix(".json")
    return json.loads(card_path.read_text()) if card_path.is_file() else {}


# --------------------------------------------------------------------------- centralized baseline

def train_model(params: dict, role: str, classes: dict, train: Split, val: Split, out: Path,
                dataset=None) -> dict:
    """Train, save and track one model: role "classifier" or "segmenter" (params train.<role>).

    ``dataset``: the MLflow dataset of ``train`` and ``val`` (``tracking.training_dataset``), the
    run's lineage."""
    from fedbrain import tracking
    from fedbrain.models import build_model, task_of

    where = f"train.{role}"
    opts = section(section(params, "train"), role)
    name = get(opts, "model", str, where)
    task = task_of(name)
    expected = "segmentation" if role == "segmenter" else "classification"
    if task != expected:
        raise InputError(f"params.yaml: '{where}.model' is {name!r}, a {task} model; the {role} needs a {expected} model")
    seed = get(section(params, "train"), "seed", int, "train")
    epochs = get(opts, "epochs", int, where)
    learning_rate = get(opts, "learning_rate", float, where)

    tf.keras.utils.set_random_seed(seed)
    input_shape = train.images.shape[1:]
    model = build_model(name, input_shape, len(classes["classes"]), get(opts, "weights", str, where, default="none"),
                        normalization=get(opts, "normalization", str, where, default="batch"),
                        width=get(opts, "width", (int, type(None)), where, default=None))
    privacy, plan = _privacy_plan(params, opts, role, len(train), epochs)
    trainable = model
    if plan is not None:
        from fedbrain.privacy.dp_sgd import private_model

        trainable = private_model(model, privacy.l2_norm_clip, plan.noise_multiplier, role=role)
        print(f"privacy: centralized {role}: {plan.describe(rounds=1)}", flush=True)
    compile_model(trainable, task, learning_rate,
                  label_smoothing=get(opts, "label_smoothing", float, where, default=0.0))
    run_name = f"centralized-{role}" + ("-dp" if plan is not None else "")
    tags = {"task": task, "model": name, "training": "centralized", "privacy": privacy.mode}
    with tracking.start_run(params, run_name, tags) as run:
        tracking.log_lineage(params, dataset, tracking.CENTRALIZED_SECTIONS)
        tracking.log_params({"data.train_images": len(train), "data.val_images": len(val),
                             "model.parameters": model.count_params()})
        start = time.perf_counter()
        history = fit(trainable, train, val, task, opts, epochs, seed,
                      class_weight=get(opts, "class_weight", bool, where, default=True) and plan is None,
                      verbose=1 if sys.stdout.isatty() else 2)
        seconds = time.perf_counter() - start
        tracking.log_history(history)
        tracking.log_metrics({"train_time_s": seconds, "epochs_run": len(history.get("loss", []))})
        privacy_card = {"privacy": "none", "epsilon": None}
        if plan is not None:
            from fedbrain.privacy.accountant import SAMPLING

            # Early stopping may end sooner than planned: the epochs run are what was spent.
            spent = dataclasses.replace(plan, epochs_per_round=len(history.get("loss", [])))
            privacy_card = {"privacy": "example", "epsilon": spent.epsilon_after(1), "delta": plan.delta,
                            "noise_multiplier": plan.noise_multiplier, "l2_norm_clip": privacy.l2_norm_clip,
                            "epsilon_accounting": f"{SAMPLING}, {privacy.accountant.upper()}"}
            tracking.log_metrics({"epsilon": privacy_card["epsilon"]})
        card = {"task": task, "model": name, "training": "centralized", **privacy_card,
                "classes": classes["classes"], "run_id": run.info.run_id, "train_time_s": seconds,
                "history": history, **_temperature_card(model, task, val, get(opts, "batch_size", int, where))}
        if "temperature" in card:
            tracking.log_metrics({"temperature": card["temperature"]})
        path = out / f"{role}.keras"
        save_model(model, path, card)
        tracking.log_keras_model(params, model, path)
    return card


def _temperature_card(model: tf.keras.Model, task: str, val: Split, batch_size: int) -> dict:
    """A classifier's temperature (fedbrain.reliability), fitted on the validation split: the card's
    ``temperature`` and ``temperature_fitted_on``; nothing for a segmenter or an empty split."""
    if task != "classification" or len(val) == 0:
        return {}
    from fedbrain import reliability

    return {"temperature": reliability.model_temperature(model, val, batch_size),
            "temperature_fitted_on": f"validation split ({len(val)} images)"}


def _privacy_plan(params: dict, opts: dict, role: str, examples: int, epochs: int):
    """(privacy settings, the DP-SGD plan or None): params' privacy section for the pooled run.

    Class weights are off under DP, as at the federated hospitals (federated.train.class_weight): the
    weight scales an example's loss before its gradient is clipped, so privacy would hold, but an
    example whose gradient is clipped gets the same norm whatever its weight, and the comparison
    with the federated DP runs stays like for like."""
    from fedbrain.privacy.settings import PrivacySettings

    privacy = PrivacySettings.from_params(params)
    if not privacy.enabled:
        return privacy, None
    if privacy.mode == "client":
        raise InputError("params.yaml: privacy.mode client protects a hospital's whole update and has no meaning "
                         "for the pooled run; use mode example (DP-SGD) or none for train-centralized")
    privacy.check_training(opts, role)
    batch = get(opts, "batch_size", int, f"train.{role}")
    return privacy, privacy.example_plan(examples, batch, epochs, rounds=1)


def run_centralized(params: dict, processed: Path, partition: Path, out: Path) -> dict:
    """Train the pooled baseline: the classifier, and the U-Net when the dataset has masks."""
    processed, partition, out = Path(processed), Path(partition), Path(out)
    classes = load_classes(processed)
    from fedbrain import tracking

    train, val = load_split(processed, partition, "train"), load_split(processed, partition, "val")
    dataset = tracking.training_dataset(params, processed, partition)  # once: both models fit on it
    cards = {"classifier": train_model(params, "classifier", classes, train, val, out, dataset)}
    if classes.get("has_masks"):
        cards["segmenter"] = train_model(params, "segmenter", classes, train, val, out, dataset)
    histories = {role: card["history"] for role, card in cards.items()}
    write_text_atomic(out / "history.json", json.dumps(histories, indent=2))
    return cards
