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

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbrain.federated.task import (CALIBRATION_WEIGHT_KEY, PREVIOUS_STATISTICS, STATISTICS, VAL_WEIGHT_KEY,
                                    WEIGHT_KEY, RunSettings, batch_norm_statistics, build, evaluate_locally,
                                    returned_epoch, set_batch_norm_statistics, train_locally,
                                    weights_of, weights_record)

app = ClientApp()

# The run's compiled model, built at this process's first message and reused by every later one:
# building it and tracing its Keras functions again cost ~1 s of every message (cnn, 2 cores).
_MODELS: dict[int, object] = {}
# The weights received with the run's last message and whose global model they are:
# {run_id: (weights round, weights)}. Kept here beside the model rather than in Context.state,
# which travels between the SuperNode and this process with every message (11 MB each way
# for the cnn, ~0.5 s of serialising a message on 2 cores). Both live as long as the process,
# which the launcher starts and stops with the hospital's SuperNode.
_RECEIVED: dict[int, tuple[int, list]] = {}


def _model(settings: RunSettings, run_id: int, learning_rate: float | None = None):
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
        tf.keras.backend.clear_session()
        model = _MODELS[run_id] = build(settings)
    tf.keras.backend.set_value(model.optimizer.learning_rate, learning_rate or settings.learning_rate)
    return model


def _hospital(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _train_name(key: str) -> str:
    return f"local_{key}" if key.startswith("val_") else f"train_{key}"


def _evaluate_previous(model, msg: Message, context: Context, settings: RunSettings, hospital: int) -> dict:
    """val_* of the previous global model, or {} when this hospital did not receive it (it joined
    or restarted since): the server then averages the other hospitals' figures."""
    config = msg.content["config"]
    if PREVIOUS_STATISTICS not in msg.content.array_records or "previous-round" not in config:
        return {}
    seen, weights = _RECEIVED.get(context.run_id, (None, None))
    if seen != int(config["previous-round"]):
        return {}
    start = time.perf_counter()
    model.set_weights(weights)
    set_batch_norm_statistics(model, msg.content[PREVIOUS_STATISTICS].to_numpy_ndarrays())
    results, examples = evaluate_locally(model, settings, hospital)
    # Named as the centralized run's validation metrics (val_loss, val_accuracy | val_dice).
    return {**{f"val_{key}": float(value) for key, value in results.items()}, VAL_WEIGHT_KEY: examples,
            "evaluation-time-s": time.perf_counter() - start}


def _round(msg: Message, context: Context, train: bool) -> Message:
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    # The server's per-round learning-rate share (task.lr_scale), applied to train.<role>'s rate.
    model = _model(settings, context.run_id, settings.learning_rate * float(config.get("lr-scale", 1.0)))
    metrics = {"hospital": hospital, **_evaluate_previous(model, msg, context, settings, hospital)}

    received = weights_of(msg.content["arrays"], model)
    model.set_weights(received)
    stats, images, seconds = batch_norm_statistics(model, settings, hospital)
    metrics.update({CALIBRATION_WEIGHT_KEY: images, "calibration-time-s": seconds})
    content = RecordDict({STATISTICS: ArrayRecord(stats)})
    if train:
        # Training normalises with batch statistics; this hospital's own statistics of the received
        # weights make the local validation of the first epochs meaningful.
        set_batch_norm_statistics(model, stats)
        history, seconds, examples = train_locally(model, settings, hospital, server_round)
        # The epoch whose weights go back (fit keeps the best on local validation): train_loss,
        # train_accuracy|train_dice on this hospital's train split, and local_val_* of that model
        # on its own validation split.
        epoch = returned_epoch(history, settings.train_params)
        metrics.update({_train_name(key): float(values[epoch]) for key, values in history.items()
                        if len(values) > epoch and key != "lr"})
        metrics.update({WEIGHT_KEY: examples, "train-time-s": seconds, "epochs-run": len(history.get("loss", []))})
        content["arrays"] = weights_record(model.get_weights())
    content["metrics"] = MetricRecord(metrics)
    _RECEIVED[context.run_id] = (int(config["weights-round"]), received)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _round(msg, context, train=True)


@app.query("calibrate")
def calibrate(msg: Message, context: Context) -> Message:
    return _round(msg, context, train=False)


@app.query("evaluate_kept")
def evaluate_kept(msg: Message, context: Context) -> Message:
    """The last global model: the weights this hospital kept from the final calibration message,
    with the pooled statistics that arrive now (as in step 1 above), so the weights need not
    travel again. A hospital that did not receive them replies without val_* and is left out."""
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    metrics = {"hospital": hospital,
               **_evaluate_previous(_model(settings, context.run_id), msg, context, settings, hospital)}
    # Weighted as an evaluate reply (FedAvg's aggregate_evaluate): by validation examples.
    metrics[WEIGHT_KEY] = metrics.get(VAL_WEIGHT_KEY, 0)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model as sent (statistics included) on this hospital's validation split."""
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    start = time.perf_counter()
    model = _model(settings, context.run_id)
    model.set_weights(weights_of(msg.content["arrays"], model))
    results, examples = evaluate_locally(model, settings, hospital)
    # The server averages them weighted by examples into the global validation score.
    metrics = {f"val_{key}": float(value) for key, value in results.items()}
    metrics.update({WEIGHT_KEY: examples, VAL_WEIGHT_KEY: examples, "hospital": hospital,
                    "evaluation-time-s": time.perf_counter() - start})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
