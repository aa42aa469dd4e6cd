"""The ClientApp: one hospital. It trains, calibrates and evaluates on its own partition only.

Which hospital it is comes from its SuperNode (``--node-config partition-id=<k>``), not from
the server's messages, so the same app bundle runs at every hospital. Each reply carries the
update weighted by the hospital's number of examples, plus what the server records about the
hospital: its number, its examples, its training and calibration time.

One message per round does three things, so that a round costs one exchange with the server
(each exchange waits on Flower's polling; see server_app.py):
  1. evaluate the previous global model on the hospital's validation split: the weights this
     hospital received with the previous message (kept in this process, see _RECEIVED) with the
     BatchNormalization statistics the server pooled for them, which arrive now;
  2. measure the BatchNormalization statistics of the received weights on its training data,
     which the server pools into that global model;
  3. train from the received weights (train messages only; the last round's calibration is a
     ``query.calibrate`` message that does 1 and 2).
Only the last global model needs an evaluation message of its own (``query.evaluate_kept``).
Every message runs in the hospital's one long-lived ClientApp process (see clientapp_runtime.py),
which keeps the run's compiled model (and its optimizer state) from one message to the next.
"""

from __future__ import annotations

import time

import numpy as np

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.differential_privacy_constants import KEY_CLIPPING_NORM

from fedbrain.dataset import hospital_examples
from fedbrain.federated import personal
from fedbrain.federated.encrypted import TOTAL, EncryptionSettings, HospitalCipher
from fedbrain.federated.phases import Phases, fit_timer
from fedbrain.federated.task import (CALIBRATION_WEIGHT_KEY, PREVIOUS_STATISTICS, STATISTICS, VAL_WEIGHT_KEY,
                                    WEIGHT_KEY, RunSettings, batch_norm_statistics, evaluate_locally,
                                    hospital_model, hospital_privacy, set_batch_norm_statistics,
                                    train_locally, trainable_positions, weights_of, weights_record)
from fedbrain.federated.update_checks import check_values
from fedbrain.privacy.budget import HospitalPrivacy
from fedbrain.privacy.client_level import noised_update


def client_level_clipping(msg: Message, context: Context, call_next) -> Message:
    """privacy.mode client: Flower's fixedclipping_mod clips this hospital's round update (reply
    minus received weights) to the norm the server's DifferentialPrivacyClientSideFixedClipping
    sends; other messages and modes pass through (the mod refuses a message without that norm)."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if msg.metadata.message_type == "train" and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[client_level_clipping])

# The run's compiled model, built at this process's first message and reused by every later one:
# building it and tracing its Keras functions again cost ~1 s of every message (cnn, 2 cores).
_MODELS: dict[int, object] = {}
# The weights received with the run's last message and whose global model they are:
# {run_id: (weights round, weights)}. Kept here beside the model rather than in Context.state,
# which travels between the SuperNode and this process with every message (11 MB each way
# for the cnn, ~0.5 s of serialising a message on 2 cores). Both live as long as the process,
# which the launcher starts and stops with the hospital's SuperNode.
_RECEIVED: dict[int, tuple[int, list]] = {}
# privacy.mode example: this hospital's DP-SGD plan for the run (its noise, fixed at the first message).
_PRIVACY: dict[int, HospitalPrivacy] = {}
# federated.personalization: the layers this hospital keeps as its own over the run (personal.py).
_PERSONAL: dict[int, personal.HospitalLayers] = {}


# federated.secure_aggregation paillier: this hospital's private key, from its SuperNode's node config.
_CIPHERS: dict[int, object] = {}


def _cipher(settings: RunSettings, context: Context):
    if not settings.encrypted:
        return None
    if context.run_id not in _CIPHERS:
        path = context.node_config.get("paillier-private-key")
        if not path:
            raise RuntimeError(f"hospital {_hospital(context)}: the run encrypts its updates but this SuperNode has "
                               f"no paillier-private-key in its node config")
        _CIPHERS.clear()
        _CIPHERS[context.run_id] = HospitalCipher(str(path), EncryptionSettings(**settings.encryption))
    return _CIPHERS[context.run_id]


def _privacy(settings: RunSettings, run_id: int, hospital: int) -> HospitalPrivacy | None:
    if settings.privacy.mode != "example":
        return None
    if run_id not in _PRIVACY:
        _PRIVACY.clear()
        _PRIVACY[run_id] = hospital_privacy(settings, hospital)
    return _PRIVACY[run_id]


def _model(settings: RunSettings, run_id: int, learning_rate: float | None = None, hospital: int = 0):
    """This run's model with its learning rate set to `learning_rate` (train.<role>'s by default).
    Weights are the caller's to set.

    Adam's moments and step count carry over from this hospital's previous round: they never
    leave the hospital. Zeroing them each round restarted Adam's bias correction every round
    (its first steps jump by the full rate in every direction) and cost the federated U-Net
    0.01 test Dice at 10 rounds x 5 epochs (0.773 with, 0.782 without; README). A hospital
    that joins or restarts starts with a fresh optimizer."""
    import tensorflow as tf

    model = _MODELS.get(run_id)
    if model is None:
        _MODELS.clear()  # one run at a time: drop an earlier run's model and weights
        _RECEIVED.clear()
        _PERSONAL.clear()
        tf.keras.backend.clear_session()
        model = _MODELS[run_id] = hospital_model(settings, hospital, _privacy(settings, run_id, hospital))
        _PERSONAL[run_id] = personal.HospitalLayers(model, settings.personalization)
    tf.keras.backend.set_value(model.optimizer.learning_rate, learning_rate or settings.learning_rate)
    return model


def _hospital(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _val_metrics(results: dict) -> dict:
    """Named as the centralized run's validation metrics (val_loss, val_accuracy | val_dice); a list
    (the NLL per temperature) stays a list."""
    return {f"val_{key}": value if isinstance(value, list) else float(value) for key, value in results.items()}


def _evaluate_previous(model, msg: Message, context: Context, settings: RunSettings, hospital: int) -> dict:
    """val_* of the previous global model, or {} when this hospital did not receive it (it joined
    or restarted since): the server then averages the other hospitals' figures."""
    config = msg.content["config"]
    if "previous-round" not in config:
        return {}
    seen, weights = _RECEIVED.get(context.run_id, (None, None))
    if seen != int(config["previous-round"]):
        return {}
    start = time.perf_counter()
    model.set_weights(weights)
    if PREVIOUS_STATISTICS in msg.content.array_records:  # none for a model without BatchNormalization
        set_batch_norm_statistics(model, msg.content[PREVIOUS_STATISTICS].to_numpy_ndarrays())
    results, examples = evaluate_locally(model, settings, hospital, temperatures=bool(config.get("temperatures")))
    _save_personalized(model, config, context, settings, hospital)
    return {**_val_metrics(results), VAL_WEIGHT_KEY: examples,
            "evaluation-time-s": time.perf_counter() - start}


def _save_personalized(model, config, context: Context, settings: RunSettings, hospital: int) -> None:
    """With personalization, the run's last global model with this hospital's own layers is its
    personalized model: saved at the hospital (personal.save) when the server marks the last model."""
    layers = _PERSONAL.get(context.run_id)
    if layers is None or not layers.active or not config.get("last-model"):
        return
    privacy = _privacy(settings, context.run_id, hospital)
    report = privacy.report(layers.trained_round) if privacy is not None and layers.trained_round else {}
    path = personal.save(model.get_weights(), settings, hospital, layers.trained_round, report)
    print(f"hospital {hospital}: personalized model ({settings.personalization}) saved to {path}", flush=True)


def _round(msg: Message, context: Context, train: bool) -> Message:
    phases = Phases()  # every step below is timed: bench/round_cost.py takes the round apart
    with phases("settings"):
        settings = RunSettings.from_run_config(context.run_config)
        hospital = _hospital(context)
        config = msg.content["config"]
        server_round = int(config["server-round"])
        cipher = _cipher(settings, context)
        privacy = _privacy(settings, context.run_id, hospital)
    with phases("model"):
        # The server's per-round learning-rate share (task.lr_scale), applied to train.<role>'s rate.
        model = _model(settings, context.run_id, settings.learning_rate * float(config.get("lr-scale", 1.0)), hospital)
    with phases("evaluate-previous"):
        metrics = {"hospital": hospital, **_evaluate_previous(model, msg, context, settings, hospital)}
    layers = _PERSONAL[context.run_id]
    with phases("decode"):
        received = weights_of(msg.content["arrays"], model)
        local = layers.localize(received)  # this hospital's own layers in place (personalization)
        model.set_weights(local)
    content = RecordDict()
    with phases("calibration"):
        if layers.pools_statistics:
            stats, images, seconds = batch_norm_statistics(model, settings, hospital)
        else:  # fedbn: the statistics are this hospital's own layers'; none are pooled
            stats, images, seconds = [], hospital_examples(settings.partition, hospital), 0.0
    metrics.update({CALIBRATION_WEIGHT_KEY: images, "calibration-time-s": seconds})
    if stats and cipher is None:  # a model without BatchNormalization (the DP forms) has none to send
        content[STATISTICS] = ArrayRecord(stats)
    if train and privacy is not None and privacy.refuses(server_round):
        # Training would cross privacy.epsilon_budget: no update, the server stops the run.
        metrics.update({**privacy.report(server_round, trained=False), WEIGHT_KEY: 0})
        train = False
    timer = None
    if train:
        # Training normalises with batch statistics; this hospital's own statistics of the received
        # weights make the local validation of the first epochs meaningful.
        with phases("set-statistics"):
            set_batch_norm_statistics(model, stats)
        timer = fit_timer()
        start = time.perf_counter()  # fit and the reading of this hospital's images, which fit-setup holds
        history, seconds, examples = train_locally(model, settings, hospital, server_round, callbacks=[timer])
        phases.add_fit(timer, time.perf_counter() - start)
        with phases("local-validation"):
            local_val, _ = evaluate_locally(model, settings, hospital)
        # The last epoch's weights go back: train_loss, train_accuracy|train_dice of that epoch on this
        # hospital's train split, and local_val_* of those weights on its own validation split. Under
        # DP-SGD train_* are left out: they are computed on the training images without noise,
        # outside what the epsilon covers.
        with phases("results"):
            metrics.update({f"local_val_{key}": float(value) for key, value in local_val.items()})
            if privacy is None:
                metrics.update({f"train_{key}": float(values[-1]) for key, values in history.items() if key != "lr"})
            metrics.update({WEIGHT_KEY: examples, "train-time-s": seconds, "epochs-run": len(history.get("loss", []))})
            if privacy is not None:
                metrics.update(privacy.report(server_round))
        with phases("encode"):
            # Personal layers stay here; they leave as received (personal.py).
            trained = model.get_weights()
            layers.keep(trained, server_round)
            outgoing = layers.outgoing(trained, received)
            if cipher is None:
                content["arrays"] = weights_record(outgoing)
    if cipher is not None:
        # Only ciphertexts of this hospital's update and statistics leave it (encrypted.py).
        with phases("encryption"):
            update, weight = None, images
            if train:
                (trained,), (sent,) = (weights_record(w).to_numpy_ndarrays() for w in (outgoing, received))
                update = trained.astype(np.float64) - sent
                # Moving statistics travel as encrypted statistics (above), not as part of the update.
                update[~trainable_positions(model)] = 0.0
                # The server sees ciphertexts only and cannot check values: this hospital does, before
                # encrypting (update_checks.py). Raising sends an error reply with the reason instead.
                if (reason := check_values([update])) is not None:
                    raise ValueError(f"hospital {hospital}, round {server_round}: {reason}; not encrypted or sent")
                if settings.privacy.mode == "client":  # clipped, with this hospital's share of the noise
                    update = noised_update(sent.astype(np.float64), trained, settings.privacy.l2_norm_clip,
                                           settings.privacy.client_noise(settings.rounds), int(config[TOTAL]))
                    weight = 1  # an unweighted mean: each hospital sends 1 / m of its update
            if stats and (reason := check_values(stats, "statistics")) is not None:
                raise ValueError(f"hospital {hospital}, round {server_round}: {reason}; not encrypted or sent")
            cipher.encrypt_reply(content, config, update, stats, weight, hospital, server_round)
        metrics["encryption-time-s"] = phases.seconds["encryption"]
    # The global model this message carried, as this hospital uses it (its own layers in place).
    _RECEIVED[context.run_id] = (int(config["weights-round"]), local)
    content["metrics"] = MetricRecord({**metrics, **phases.metrics(timer)})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _round(msg, context, train=True)


@app.query("calibrate")
def calibrate(msg: Message, context: Context) -> Message:
    return _round(msg, context, train=False)


@app.query("examples")
def examples(msg: Message, context: Context) -> Message:
    """This hospital's number of training images (encrypted aggregation weighs updates by it)."""
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    count = hospital_examples(settings.partition, hospital)
    return Message(content=RecordDict({"metrics": MetricRecord({WEIGHT_KEY: count, "hospital": hospital})}),
                   reply_to=msg)


@app.query("decrypt")
def decrypt(msg: Message, context: Context) -> Message:
    """Decrypt this hospital's share of the summed ciphertexts (encrypted.py: only the sum opens)."""
    settings = RunSettings.from_run_config(context.run_config)
    content = _cipher(settings, context).decrypt_share(msg, _hospital(context))
    return Message(content=content, reply_to=msg)


@app.query("evaluate_kept")
def evaluate_kept(msg: Message, context: Context) -> Message:
    """The last global model: the weights this hospital kept from the final calibration message,
    with the pooled statistics that arrive now (as in step 1 above), so the weights need not
    travel again. A hospital that did not receive them replies without val_* and is left out."""
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    metrics = {"hospital": hospital,
               **_evaluate_previous(_model(settings, context.run_id, hospital=hospital), msg, context, settings,
                                    hospital)}
    # Weighted as an evaluate reply (FedAvg's aggregate_evaluate): by validation examples.
    metrics[WEIGHT_KEY] = metrics.get(VAL_WEIGHT_KEY, 0)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model as sent (statistics included) on this hospital's validation split."""
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    start = time.perf_counter()
    model = _model(settings, context.run_id, hospital=hospital)
    model.set_weights(_PERSONAL[context.run_id].localize(weights_of(msg.content["arrays"], model)))
    config = msg.content.config_records.get("config", {})
    results, examples = evaluate_locally(model, settings, hospital, temperatures=bool(config.get("temperatures")))
    _save_personalized(model, config, context, settings, hospital)
    # The server averages them weighted by examples into the global validation score.
    metrics = _val_metrics(results)
    metrics.update({WEIGHT_KEY: examples, VAL_WEIGHT_KEY: examples, "hospital": hospital,
                    "evaluation-time-s": time.perf_counter() - start})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
