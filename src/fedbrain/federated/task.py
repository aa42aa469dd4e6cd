"""What the ServerApp and every hospital's ClientApp share: the run's settings, the model, the data.

The run's settings arrive as Flower run config (keys in ``app/pyproject.toml``, values from the
launcher); a hospital's identity arrives as its SuperNode's node config (``partition-id``).
Training goes through ``fedbrain.train`` exactly as the centralized baseline does.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbrain.config import get
from fedbrain.dataset import Split, load_classes, load_split
from fedbrain.errors import InputError
from fedbrain.federated.settings import StrategySettings
from fedbrain.privacy.budget import PRIVACY_KEYS
from fedbrain.privacy.settings import PrivacySettings

ROLES = {"classifier": "classification", "segmenter": "segmentation"}
# Keys of a MetricRecord that describe the reply rather than the model: never averaged.
WEIGHT_KEY = "num-examples"
# val_* metrics are averaged weighted by each hospital's validation examples instead.
VAL_WEIGHT_KEY = "val-examples"
# Message records: a hospital's BatchNormalization statistics of the weights it received
# (hospital -> server), and the pooled statistics of the previous global model (server -> hospital).
STATISTICS = "statistics"
PREVIOUS_STATISTICS = "previous-statistics"
# BatchNormalization statistics are pooled weighted by the training images they stand for.
CALIBRATION_WEIGHT_KEY = "calibration-images"
# A classifier's last evaluation: its mean validation NLL per candidate temperature (a list, reply key
# val_<this>), which the server pools to fit the model's temperature (fedbrain.reliability).
TEMPERATURE_NLL = "nll_by_temperature"
META_KEYS = (WEIGHT_KEY, VAL_WEIGHT_KEY, CALIBRATION_WEIGHT_KEY, "hospital", "train-time-s", "epochs-run",
             "calibration-time-s", "evaluation-time-s", "encryption-time-s", "decryption-time-s", "ciphertexts",
             "steady-epoch-s",
             *PRIVACY_KEYS)


@dataclass(frozen=True)
class RunSettings:
    processed: Path
    partition: Path
    out: Path
    role: str
    task: str
    model: str
    weights: str
    rounds: int
    local_epochs: int
    seed: int
    train_params: dict
    params: dict
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    round_timeout: float
    node_wait_timeout: float
    resume: bool
    run_name: str
    secure: bool
    calibration_images: int
    lr_decay: str
    privacy: PrivacySettings
    encryption: dict          # federated.secure_aggregation + federated.paillier (encrypted.EncryptionSettings)
    paillier_public_key: str  # the public key's file, or its JSON text (kubernetes); nothing more
    # The dataset's classes.json when the run config carries it (the kubernetes launcher: the ServerApp's
    # pod has no data); None: read from `processed`.
    classes: dict | None = None
    # tracking.dataset_reference of the train and val examples when the run config carries it (the
    # kubernetes launcher computes it where the data is); "": the ServerApp reads the data itself.
    training_dataset: str = ""
    # federated.strategy and its parameters (settings.StrategySettings); FedAvg when the config has none.
    strategy: StrategySettings = StrategySettings()
    # federated.personalization: none | fedbn | local_head (personal.py).
    personalization: str = "none"
    # Where each hospital's ClientApp saves its personalized models (personal.save) when the run config
    # says (the kubernetes launcher: a volume of the hospital's own pod, `out` being the SuperLink pod's);
    # None: in `out`, as under the local launcher, where every process shares one filesystem.
    hospital_out: Path | None = None

    @classmethod
    def from_run_config(cls, cfg) -> RunSettings:
        cfg = dict(cfg)
        role = str(cfg["role"])
        if role not in ROLES:
            raise InputError(f"run config 'role' is {role!r}; expected one of {', '.join(ROLES)}")
        train_params = json.loads(str(cfg["train-params"]))
        return cls(
            processed=Path(str(cfg["processed"])),
            partition=Path(str(cfg["partition"])),
            out=Path(str(cfg["out"])),
            role=role,
            task=ROLES[role],
            model=str(train_params.get("model", "cnn" if role == "classifier" else "unet")),
            weights=str(train_params.get("weights", "none")),
            rounds=int(cfg["rounds"]),
            local_epochs=int(cfg["local-epochs"]),
            seed=int(cfg["seed"]),
            train_params=train_params,
            params=json.loads(str(cfg["params"])),
            fraction_train=float(cfg["fraction-train"]),
            fraction_evaluate=float(cfg["fraction-evaluate"]),
            min_train_nodes=int(cfg["min-train-nodes"]),
            min_evaluate_nodes=int(cfg["min-evaluate-nodes"]),
            min_available_nodes=int(cfg["min-available-nodes"]),
            round_timeout=float(cfg["round-timeout"]),
            node_wait_timeout=float(cfg["node-wait-timeout"]),
            resume=bool(cfg["resume"]),
            run_name=str(cfg["run-name"]),
            secure=bool(cfg["secure"]),
            calibration_images=int(cfg["calibration-images"]),
            lr_decay=str(cfg["lr-decay"]),
            privacy=PrivacySettings.from_dict(json.loads(str(cfg.get("privacy", "{}")))),
            encryption=json.loads(str(cfg.get("secure-aggregation", "{}"))),
            paillier_public_key=str(cfg.get("paillier-public-key", "")),
            classes=json.loads(str(cfg["classes"])) if cfg.get("classes") else None,
            training_dataset=str(cfg.get("training-dataset", "")),
            strategy=StrategySettings.from_dict(json.loads(str(cfg.get("strategy") or "{}"))),
            personalization=str(cfg.get("personalization", "none")),
            hospital_out=Path(str(cfg["hospital-out"])) if cfg.get("hospital-out") else None,
        )

    def class_info(self) -> dict:
        """classes.json of the data: class names, has_masks, channels, size."""
        return self.classes if self.classes is not None else load_classes(self.processed)

    @property
    def encrypted(self) -> bool:
        return self.encryption.get("mode", "none") == "paillier"

    @property
    def learning_rate(self) -> float:
        return get(self.train_params, "learning_rate", float, f"train.{self.role}")


def lr_scale(settings: RunSettings, server_round: int) -> float:
    """The share of train.<role>.learning_rate a hospital starts round `server_round` with.

    'cosine' decays it over the rounds (1 in round 1, ~0 by the last), as the centralized run's
    schedule does over its epochs: late rounds then move every hospital only a little from the
    global model, so their average stays close to each of them. 'none': every round at full rate.
    """
    if settings.lr_decay == "none":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / settings.rounds))


def build(settings: RunSettings, compiled: bool = True, learning_rate: float | None = None,
          noise_multiplier: float | None = None):
    """The role's network for this dataset's image shape and classes (compiled as the baseline is;
    with `noise_multiplier`, for DP-SGD at privacy.l2_norm_clip)."""
    from fedbrain.models import build_model
    from fedbrain.train import compile_model

    info = settings.class_info()
    shape = (int(info["size"]), int(info["size"]), int(info["channels"]))
    if ":" in settings.model:
        # `package.module:function(input_shape, num_classes)`: a network of your own (tests use a
        # tiny one); it must be importable wherever the SuperLink and SuperNodes run.
        module, function = settings.model.split(":", 1)
        model = getattr(importlib.import_module(module), function)(shape, len(info["classes"]))
    else:
        model = build_model(settings.model, shape, len(info["classes"]), settings.weights,
                            normalization=str(settings.train_params.get("normalization", "batch")),
                            width=settings.train_params.get("width"))
    if noise_multiplier is not None:
        from fedbrain.privacy.dp_sgd import private_model

        model = private_model(model, settings.privacy.l2_norm_clip, noise_multiplier, role=settings.role)
    if compiled:
        compile_model(model, settings.task, learning_rate or settings.learning_rate,
                      label_smoothing=float(settings.train_params.get("label_smoothing", 0.0)))
    return model


def hospital_privacy(settings: RunSettings, hospital: int):
    """privacy.mode example: this hospital's DP-SGD plan for the run (its noise, from its own number
    of training images, batch, local epochs and rounds); None otherwise."""
    if settings.privacy.mode != "example":
        return None
    from fedbrain.dataset import hospital_examples
    from fedbrain.privacy.budget import HospitalPrivacy

    return HospitalPrivacy.plan_for(settings.privacy, hospital_examples(settings.partition, hospital),
                                    int(settings.train_params.get("batch_size", 32)), settings.local_epochs,
                                    settings.rounds)


def hospital_model(settings: RunSettings, hospital: int, privacy=None):
    """A hospital's model for the run, seeded once per run (train.fit says why not per round) and per
    hospital, so that dropout differs between hospitals; DP-SGD at `privacy`'s noise when given."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(settings.seed + hospital)
    return build(settings, noise_multiplier=privacy.plan.noise_multiplier if privacy is not None else None)


def hospital_data(settings: RunSettings, hospital: int, split: str) -> Split:
    """One hospital's own train or val examples: nothing else is readable from a ClientApp."""
    return load_split(settings.processed, settings.partition, split, hospital=hospital)


def train_locally(model, settings: RunSettings, hospital: int, server_round: int, callbacks=()
                  ) -> tuple[dict, float, int]:
    """`local_epochs` of the baseline's `fit` on this hospital's data: (history, seconds, examples).
    The last epoch's weights go back: no validation after each local epoch and no best-epoch restore
    inside a round (the hospital validates what it sends once, `evaluate_locally`). Validating every
    epoch was the largest fixed cost of a round (bench/round_cost.py: ~6 s of a ~110 s full-set
    round), and a round's local rate decays to ~0 by its last epoch (cosine), where the best one was.
    Under fedprox the model holds the received (global) weights when this is called: they anchor the
    proximal term."""
    from fedbrain.train import fit

    train = hospital_data(settings, hospital, "train")
    # A different shuffle and augmentation stream per hospital and round, reproducible per run.
    seed = settings.seed + 1000 * server_round + hospital
    if settings.strategy.name == "fedprox":  # mu/2 ||w - w_received||^2 in the local loss (proximal.py)
        from fedbrain.federated.proximal import proximal_term

        callbacks = [*callbacks, proximal_term(model, settings.strategy.proximal_mu)]
    start = time.perf_counter()
    history = fit(model, train, None, settings.task, settings.train_params, epochs=settings.local_epochs,
                  seed=seed, class_weight=bool(settings.train_params.get("class_weight", True)), callbacks=callbacks,
                  verbose=0)
    return history, time.perf_counter() - start, len(train)


def evaluate_locally(model, settings: RunSettings, hospital: int, temperatures: bool = False) -> tuple[dict, int]:
    """The global model on this hospital's validation split: ({loss, accuracy|dice}, examples).
    `temperatures` (a classifier's last global model): also its mean NLL at each of
    reliability.TEMPERATURES under TEMPERATURE_NLL, from which the server fits the model's temperature."""
    from fedbrain import scattering
    from fedbrain.train import make_dataset

    val = hospital_data(settings, hospital, "val")
    if len(val) == 0:
        return {}, 0
    if (head := scattering.training_view(model)) is not None:  # its features, computed once per run
        val, model = scattering.features(model, val), head
    num_classes = int(model.output_shape[-1]) if settings.task == "classification" else 1
    batch_size = int(settings.train_params.get("batch_size", 32))
    dataset = make_dataset(val, settings.task, num_classes, batch_size, settings.seed, training=False)
    results = model.evaluate(dataset, verbose=0, return_dict=True)
    if temperatures and settings.task == "classification":
        from fedbrain.reliability import nll_by_temperature

        proba = model.predict(dataset, verbose=0)
        # A mean, not a sum: the server averages replies weighted by validation examples (Flower's
        # aggregate_metricrecords), which makes the means the pooled split's mean NLL.
        results[TEMPERATURE_NLL] = (nll_by_temperature(proba, val.labels) / len(val)).tolist()
    return results, len(val)


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer, nested backbones included, in a fixed order."""
    import tensorflow as tf

    return [m for m in model.submodules if isinstance(m, tf.keras.layers.BatchNormalization)]


def weights_record(weights: list[np.ndarray]):
    """A model's weights as the ArrayRecord that travels: one flat float32 vector.

    Why not one array per layer variable: Flower 1.23 moves every array as objects of its own,
    one request per object at each of the three hops between ServerApp and ClientApp (the cnn
    has 102 variables); one vector is a few 5 MB chunks. FedAvg's weighted mean is the same,
    element by element."""
    from flwr.app import ArrayRecord

    return ArrayRecord([np.concatenate([np.asarray(w, dtype=np.float32).ravel() for w in weights])])


def trainable_positions(model) -> np.ndarray:
    """A mask over the `weights_record` vector: True where a trainable weight sits. The rest are
    BatchNormalization moving statistics, which the server replaces by the pooled statistics of
    every round's global model (the hospitals' own drift far from it: deltas of 20-140 were seen)."""
    trainable = {id(v) for v in model.trainable_weights}
    return np.concatenate([np.full(math.prod(tuple(v.shape)), id(v) in trainable) for v in model.weights])


def weights_of(record, model) -> list[np.ndarray]:
    """The model's weights from a `weights_record` (shapes and dtypes from `model`)."""
    (flat,) = record.to_numpy_ndarrays()
    shapes = [tuple(v.shape) for v in model.weights]
    sizes = [math.prod(shape) for shape in shapes]
    if flat.size != sum(sizes):
        raise ValueError(f"received {flat.size} weights; the model has {sum(sizes)}: not this run's model")
    parts = np.split(flat, np.cumsum(sizes)[:-1])
    return [part.reshape(shape).astype(v.dtype.as_numpy_dtype, copy=False)
            for part, shape, v in zip(parts, shapes, model.weights)]


def set_batch_norm_statistics(model, stats: list) -> None:
    """Make [mean_1, var_1, mean_2, ...] (batch_norm_statistics' order) the moving statistics."""
    for layer, mean, var in zip(batch_norm_layers(model), stats[0::2], stats[1::2]):
        layer.moving_mean.assign(np.asarray(mean, dtype=np.float32))
        layer.moving_variance.assign(np.asarray(var, dtype=np.float32))


def batch_norm_statistics(model, settings: RunSettings, hospital: int) -> tuple[list, int, float]:
    """Per BatchNormalization layer, the mean and variance of its input over this hospital's
    training images (a sample of `calibration_images`, 0 = all) under the given weights:
    ([mean_1, var_1, mean_2, ...], training images they stand for, seconds).

    The count is the whole training split's, sample or not: the server weighs each hospital's
    statistics by it, so the pooled ones describe all the federation's training images as the
    centralized model's do (weighing by sample size would shrink the largest hospital's share).

    Why: FedAvg averages each hospital's moving statistics, but those describe the hospital's
    own model, not the averaged one; a global model with them predicts one class for everything.
    Each batch runs in training mode with momentum 0, so every layer's moving statistics become
    that batch's (upstream layers normalising with batch statistics, as in training), and the
    batches are pooled: variance = E[var_b + mean_b^2] - mean^2.
    """
    from fedbrain.train import make_dataset

    start = time.perf_counter()
    data = hospital_data(settings, hospital, "train")
    population = len(data)
    if 0 < settings.calibration_images < len(data):
        # A seeded random sample: the split is stored in label order, its head is one class.
        keep = np.sort(np.random.default_rng(settings.seed).choice(len(data), settings.calibration_images,
                                                                   replace=False))
        data = Split(data.images[keep], data.labels[keep], None if data.masks is None else data.masks[keep],
                     [data.image_ids[i] for i in keep], [data.patient_ids[i] for i in keep])
    layers = batch_norm_layers(model)
    if not layers:
        return [], population, time.perf_counter() - start
    num_classes = int(model.output_shape[-1]) if settings.task == "classification" else 1
    batch_size = int(settings.train_params.get("batch_size", 32))
    sums = [[0.0, 0.0] for _ in layers]
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        measure = _batch_statistics_step(model, layers)
        seen = 0
        for batch in make_dataset(data, settings.task, num_classes, batch_size, settings.seed, training=False):
            images = batch[0]
            n = int(images.shape[0])
            for total, (mean, var) in zip(sums, measure(images)):
                mean, var = mean.numpy(), var.numpy()
                total[0] = total[0] + n * mean
                total[1] = total[1] + n * (var + mean ** 2)
            seen += n
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    stats = []
    for first, second in sums:
        mean = first / max(seen, 1)
        stats += [mean, second / max(seen, 1) - mean ** 2]
    return stats, population, time.perf_counter() - start


# The compiled measuring step of the last model measured: the ClientApp reuses its model every
# round, so it is traced once per run. (Only the last: the step holds its model, and a cache of
# every model would keep every earlier run's alive.) Compiled, a hospital's calibration is 1.4x
# as fast as with eager model calls (U-Net, 713 LGG slices: 5.6 s vs 8.0 s on 2 cores; cnn, 128
# images: 0.30 vs 0.49 s; bench/calibration.py), with the same statistics to the last bit; that
# time is part of every round's overhead (bench/federated.py).
_LAST_STEP: dict = {}


def _batch_statistics_step(model, layers: list):
    """images -> [(moving_mean, moving_variance) per layer] after one forward pass in training
    mode. Only call it with every layer's momentum at 0: a compiled step keeps the momentum it
    was traced with, which then makes the moving statistics the batch's own."""
    import tensorflow as tf

    if _LAST_STEP.get("model") is not model:
        @tf.function(reduce_retracing=True)
        def step(images):
            model(images, training=True)
            return [(layer.moving_mean, layer.moving_variance) for layer in layers]

        _LAST_STEP.update(model=model, step=step)
    return _LAST_STEP["step"]
