"""The ClientApp: one hospital. It trains and evaluates on its own partition only.

Which hospital it is comes from its SuperNode (``--node-config partition-id=<k>``), not from
the server's messages, so the same app bundle runs at every hospital. Each reply carries the
update (train) or metrics (evaluate) weighted by the hospital's number of examples, plus what
the server records about the hospital: its number, its examples and its training time.

A train message also evaluates the global model it brings, on the hospital's validation split,
before training on it: that is the federated evaluation of the previous round's global model,
and it saves a message exchange per round (Flower's polling, a model build). Only the last
round's global model needs an evaluate message of its own. Every message runs in the hospital's
one long-lived ClientApp process (see clientapp_runtime.py).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbrain.federated.task import (VAL_WEIGHT_KEY, WEIGHT_KEY, RunSettings, batch_norm_statistics, build,
                                    evaluate_locally, returned_epoch, train_locally)

app = ClientApp()


def _hospital(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _train_name(key: str) -> str:
    return f"local_{key}" if key.startswith("val_") else f"train_{key}"


def _model(msg: Message, settings: RunSettings, learning_rate: float | None = None):
    model = build(settings, learning_rate=learning_rate)
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    # The server's per-round learning-rate share (task.lr_scale), applied to train.<role>'s rate.
    model = _model(msg, settings, settings.learning_rate * float(config.get("lr-scale", 1.0)))
    evaluation, val_examples = evaluate_locally(model, settings, hospital)
    history, seconds, examples = train_locally(model, settings, hospital, server_round)
    # The epoch whose weights go back (fit keeps the best on local validation): train_loss,
    # train_accuracy|train_dice on this hospital's train split, and local_val_* of that model on
    # its own validation split. val_* is the received global model, measured before training.
    epoch = returned_epoch(history, settings.train_params)
    metrics = {_train_name(key): float(values[epoch]) for key, values in history.items()
               if len(values) > epoch and key != "lr"}
    metrics.update({f"val_{key}": float(value) for key, value in evaluation.items()})
    metrics.update({WEIGHT_KEY: examples, VAL_WEIGHT_KEY: val_examples, "hospital": hospital,
                    "train-time-s": seconds, "epochs-run": len(history.get("loss", []))})
    content = RecordDict({"arrays": ArrayRecord(model.get_weights()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    model = _model(msg, settings)
    results, examples = evaluate_locally(model, settings, hospital)
    # Named as the centralized run's validation metrics (val_loss, val_accuracy | val_dice);
    # the server averages them weighted by examples into the global validation score.
    metrics = {f"val_{key}": float(value) for key, value in results.items()}
    metrics.update({WEIGHT_KEY: examples, VAL_WEIGHT_KEY: examples, "hospital": hospital})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("bn_statistics")
def bn_statistics(msg: Message, context: Context) -> Message:
    """The new global model's BatchNormalization input statistics on this hospital's training data,
    which the server pools into the global model's moving statistics (see task.batch_norm_statistics)."""
    settings = RunSettings.from_run_config(context.run_config)
    hospital = _hospital(context)
    stats, examples, seconds = batch_norm_statistics(_model(msg, settings), settings, hospital)
    metrics = MetricRecord({WEIGHT_KEY: examples, "hospital": hospital, "calibration-time-s": seconds})
    return Message(content=RecordDict({"arrays": ArrayRecord(stats), "metrics": metrics}), reply_to=msg)
