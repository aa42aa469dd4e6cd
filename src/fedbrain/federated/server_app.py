"""The ServerApp: FedAvg over the hospitals, the global model saved and tracked every round.

Each round: wait until `min-available-nodes` SuperNodes are online; send the global model to
the sampled ones (FedAvg's `configure_train`); collect their updates until all replied, failed
or `round-timeout` passed; average them weighted by examples. A SuperNode that crashes shows
up as a failed reply (the SuperLink reports it once it misses its heartbeats) and the round
goes on with the others; one that joined is sampled from the next round on.

BatchNormalization: after averaging, the hospitals measure each BatchNormalization layer's input
statistics under the new global weights on their training data (a `query.bn_statistics`
message) and the pooled statistics replace FedAvg's average of the hospitals' moving statistics,
which fit none of the models (with them the global model predicted one class for everything).

Federated evaluation: each hospital evaluates the global model it receives on its validation
split before training on it, so round r+1's replies carry the validation metrics of round r's
global model (averaged weighted by validation examples); the last round's global model gets
a separate evaluate message (FedAvg's `configure_evaluate`). That saves a message exchange
(Flower's polling, a model build) per round.

The loop is Flower's `Strategy.start` written out, so that a round can be resumed from a
checkpoint (`--resume`) and recorded (per-hospital metrics, failures, bytes, times) as it ends.

Writes, under `out`:
  checkpoints/<role>/round_<r>.keras and state.json   every round (resume reads these)
  <role>.keras + <role>.json (the model card)         at the end
  history.json                                        {role: {metric: [value per round]}}
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedbrain.federated.strategy import HospitalFedAvg, content_bytes
from fedbrain.federated.task import (VAL_WEIGHT_KEY, WEIGHT_KEY, RunSettings, batch_norm_layers, build,
                                    lr_scale)

app = ServerApp()

# How often the ServerApp asks the SuperLink for replies (Flower's own loop waits 3 s).
POLL_S = 0.5
# The ClientApp's @app.query("bn_statistics") handler.
CALIBRATE = "query.bn_statistics"


# --- messages ----------------------------------------------------------------------------------

def exchange(grid: Grid, strategy: HospitalFedAvg, messages: list[Message], timeout: float
             ) -> tuple[list[Message], list[Message]]:
    """Push messages, pull replies until all arrived or `timeout`: (replies, unanswered).

    Tells the strategy which node each message went to: an error reply the SuperLink writes for
    a node that stopped sending heartbeats does not come from that node.
    """
    messages = list(messages)
    if not messages:
        return [], []
    ids = list(grid.push_messages(messages))
    pending = {mid: msg for mid, msg in zip(ids, messages) if mid is not None}
    strategy.destinations = {mid: msg.metadata.dst_node_id for mid, msg in pending.items()}
    unsent = [msg for mid, msg in zip(ids, messages) if mid is None]
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            if pending.pop(reply.metadata.reply_to_message_id, None) is not None:
                replies.append(reply)
        if pending:
            time.sleep(POLL_S)
    return replies, unsent + list(pending.values())


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Online SuperNodes once there are at least `minimum`; RuntimeError after `timeout` s."""
    deadline = time.monotonic() + timeout
    announced = False
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} SuperNode(s) online, fewer than min-available-nodes="
                               f"{minimum}, for {timeout:.0f} s: stopping the run")
        if not announced:
            log(INFO, "waiting for SuperNodes: %d online, %d needed", len(nodes), minimum)
            announced = True
        time.sleep(1.0)
    return nodes


# --- one round ---------------------------------------------------------------------------------

@dataclass
class RoundRecord:
    round: int
    nodes_online: int
    wall_time_s: float = 0.0
    train_phase_s: float = 0.0
    calibration_phase_s: float = 0.0  # BatchNormalization statistics of the new global model
    evaluate_phase_s: float = 0.0  # only the last round has a phase of its own
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: dict = field(default_factory=dict)     # train_*, local_val_*, val_*: averaged over hospitals
    hospitals: dict = field(default_factory=dict)   # "<k>" -> examples, train_time_s, its metrics
    failures: list = field(default_factory=list)    # {hospital, node_id, phase, reason}

    @property
    def slowest_training_s(self) -> float:
        return max((h.get("train_time_s", 0.0) for h in self.hospitals.values()), default=0.0)

    @property
    def overhead(self) -> float:
        """Share of the round not spent in the slowest hospital's training: orchestration cost."""
        return (self.wall_time_s - self.slowest_training_s) / self.wall_time_s if self.wall_time_s else 0.0

    def round_metrics(self) -> dict[str, float]:
        """What is known when the round's training ends (its val_* arrive with the next round)."""
        flat = {k: v for k, v in self.metrics.items() if not k.startswith("val_")}
        flat.update({"round_time_s": self.wall_time_s, "train_phase_s": self.train_phase_s,
                     "calibration_phase_s": self.calibration_phase_s,
                     "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                     "nodes_online": self.nodes_online,
                     "nodes_trained": sum(1 for h in self.hospitals.values() if "train_time_s" in h),
                     "nodes_failed": len(self.failures), "slowest_training_s": self.slowest_training_s,
                     "orchestration_overhead": self.overhead})
        for k, values in self.hospitals.items():
            flat.update({f"hospital_{k}/{name}": value for name, value in values.items()
                         if not name.startswith("val_")})
        return flat

    def val_metrics(self) -> dict[str, float]:
        flat = {k: v for k, v in self.metrics.items() if k.startswith("val_")}
        for k, values in self.hospitals.items():
            flat.update({f"hospital_{k}/{name}": value for name, value in values.items()
                         if name.startswith("val_")})
        return flat


def _reports_by_hospital(strategy: HospitalFedAvg, known: dict[int, int]) -> dict[str, dict]:
    """{hospital: its report} for the phase that just ended (node ids mapped to hospitals)."""
    reports = {}
    for node, report in strategy.phase.reports.items():
        if "hospital" in report:
            known[node] = int(report["hospital"])
        reports[str(known.get(node))] = report
    return reports


def _failures(strategy: HospitalFedAvg, unanswered: list[Message], known: dict[int, int],
              settings: RunSettings, server_round: int) -> list[dict]:
    failures = [*strategy.phase.failures,
                *({"node_id": m.metadata.dst_node_id, "phase": strategy.phase.name,
                   "reason": f"no reply within round-timeout={settings.round_timeout:.0f} s"} for m in unanswered)]
    for failure in failures:
        failure["hospital"] = known.get(failure["node_id"])
        log(WARNING, "round %d %s: hospital %s (node %s) failed: %s", server_round, failure["phase"],
            failure["hospital"], failure["node_id"], failure["reason"])
    return failures


def _metric_values(report: dict, prefixes: tuple[str, ...]) -> dict[str, float]:
    return {name: float(v) for name, v in report.items() if name.startswith(prefixes)}


def train_round(grid: Grid, strategy: HospitalFedAvg, settings: RunSettings, server_round: int,
                arrays: ArrayRecord, known: dict[int, int]) -> tuple[ArrayRecord, RoundRecord, RoundRecord]:
    """One round of FedAvg: (new global arrays, this round's record, the previous model's evaluation).

    The evaluation record holds the val_* metrics the hospitals measured on the global model
    they received, i.e. the previous round's (or, in round 1, the initial model's).
    """
    # FedAvg's own sampling would wait for these forever; we wait with a deadline.
    online = wait_for_nodes(grid, max(settings.min_available_nodes, settings.min_train_nodes),
                            settings.node_wait_timeout)
    record = RoundRecord(round=server_round, nodes_online=len(online))
    previous = RoundRecord(round=server_round - 1, nodes_online=len(online))
    start = time.perf_counter()
    scale = lr_scale(settings, server_round)
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"lr-scale": scale}), grid))
    record.bytes_down = sum(content_bytes(m) for m in messages)
    replies, unanswered = exchange(grid, strategy, messages, settings.round_timeout)
    new_arrays, averaged = strategy.aggregate_train(server_round, replies)
    record.train_phase_s = record.wall_time_s = time.perf_counter() - start
    record.bytes_up = strategy.phase.bytes_up
    record.failures = _failures(strategy, unanswered, known, settings, server_round)
    for k, report in _reports_by_hospital(strategy, known).items():
        record.hospitals[k] = {"examples": int(report.get(WEIGHT_KEY, 0)),
                               "train_time_s": float(report.get("train-time-s", 0.0)),
                               "epochs_run": int(report.get("epochs-run", 0)),
                               **_metric_values(report, ("train_", "local_val_"))}
        previous.hospitals[k] = {"val_examples": int(report.get(VAL_WEIGHT_KEY, 0)),
                                 **_metric_values(report, ("val_",))}
    averaged = {k: float(v) for k, v in (averaged or {}).items()}
    record.metrics = {k: v for k, v in averaged.items() if not k.startswith("val_")}
    record.metrics["learning_rate"] = settings.learning_rate * scale
    previous.metrics = {k: v for k, v in averaged.items() if k.startswith("val_")}
    if new_arrays is None:
        log(WARNING, "round %d: no hospital returned an update; the global model is unchanged", server_round)
        new_arrays = arrays
    return new_arrays, record, previous


def pool_batch_norm_statistics(replies: list[tuple[int, list]]) -> list:
    """[(images, [mean_1, var_1, ...]) per hospital] -> the pooled [mean_1, var_1, ...].

    Law of total variance: the spread between hospitals' means (label skew moves them apart)
    belongs in the global variance, not only the average of the hospitals' variances.
    """
    total = sum(n for n, _ in replies)
    pooled = []
    for i in range(0, len(replies[0][1]), 2):
        mean = sum(n * stats[i] for n, stats in replies) / total
        second = sum(n * (stats[i + 1] + stats[i] ** 2) for n, stats in replies) / total
        pooled += [mean, np.maximum(second - mean ** 2, 0.0)]
    return pooled


def calibrate(grid: Grid, strategy: HospitalFedAvg, settings: RunSettings, record: RoundRecord,
              model, arrays: ArrayRecord, known: dict[int, int]) -> ArrayRecord:
    """The new global model with BatchNormalization statistics measured on the hospitals' data.

    FedAvg's average of moving statistics describes no model that exists; measured under the
    averaged weights, pooled over hospitals, they do (see task.batch_norm_statistics).
    """
    layers = batch_norm_layers(model)
    if not layers:
        return arrays
    start = time.perf_counter()
    online = wait_for_nodes(grid, settings.min_available_nodes, settings.node_wait_timeout)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": record.round})})
    messages = [Message(content=content, message_type=CALIBRATE, dst_node_id=node) for node in online]
    record.bytes_down += sum(content_bytes(m) for m in messages)
    replies, unanswered = exchange(grid, strategy, messages, settings.round_timeout)
    usable = strategy.collect("calibrate", replies)
    record.bytes_up += strategy.phase.bytes_up
    record.failures += _failures(strategy, unanswered, known, settings, record.round)
    for k, report in _reports_by_hospital(strategy, known).items():
        record.hospitals.setdefault(k, {})["calibration_time_s"] = float(report.get("calibration-time-s", 0.0))
    if usable:
        pooled = pool_batch_norm_statistics(
            [(int(next(iter(m.content.metric_records.values()))[WEIGHT_KEY]),
              next(iter(m.content.array_records.values())).to_numpy_ndarrays()) for m in usable])
        model.set_weights(arrays.to_numpy_ndarrays())
        for layer, mean, var in zip(layers, pooled[0::2], pooled[1::2]):
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(var.astype(np.float32))
        arrays = ArrayRecord(model.get_weights())
    else:
        log(WARNING, "round %d: no hospital returned BatchNormalization statistics; keeping FedAvg's average",
            record.round)
    record.calibration_phase_s = time.perf_counter() - start
    record.wall_time_s += record.calibration_phase_s
    return arrays


def final_evaluation(grid: Grid, strategy: HospitalFedAvg, settings: RunSettings, record: RoundRecord,
                     arrays: ArrayRecord, known: dict[int, int]) -> None:
    """The last global model on every hospital's validation split, into the last round's record."""
    wait_for_nodes(grid, max(settings.min_available_nodes, settings.min_evaluate_nodes), settings.node_wait_timeout)
    start = time.perf_counter()
    messages = list(strategy.configure_evaluate(record.round, arrays, ConfigRecord(), grid))
    record.bytes_down += sum(content_bytes(m) for m in messages)
    replies, unanswered = exchange(grid, strategy, messages, settings.round_timeout)
    averaged = strategy.aggregate_evaluate(record.round, replies)
    record.evaluate_phase_s = time.perf_counter() - start
    record.wall_time_s += record.evaluate_phase_s
    record.bytes_up += strategy.phase.bytes_up
    record.failures += _failures(strategy, unanswered, known, settings, record.round)
    for k, report in _reports_by_hospital(strategy, known).items():
        record.hospitals.setdefault(k, {}).update({"val_examples": int(report.get(VAL_WEIGHT_KEY, 0)),
                                                   **_metric_values(report, ("val_",))})
    record.metrics.update({k: float(v) for k, v in (averaged or {}).items()})


def merge_evaluation(target: dict, evaluation: RoundRecord) -> None:
    """Add an evaluation's val_* (metrics and per hospital) to a stored round record."""
    target["metrics"].update(evaluation.metrics)
    for k, values in evaluation.hospitals.items():
        target["hospitals"].setdefault(k, {}).update(values)


# --- checkpoints -------------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpoints:
    """`out/checkpoints/<role>/`: the global model of every round and the run's state so far."""

    def __init__(self, out: Path, role: str):
        self.dir = out / "checkpoints" / role
        self.state_path = self.dir / "state.json"

    def model_path(self, server_round: int) -> Path:
        return self.dir / f"round_{server_round}.keras"

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def latest(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        return state if self.model_path(state["round"]).is_file() else None

    def save(self, model, server_round: int, state: dict) -> None:
        """The round's model first, then the state naming it: a crash leaves the previous pair valid."""
        path = self.model_path(server_round)
        tmp = path.with_name(f".round_{server_round}.tmp.keras")
        model.save(tmp)
        os.replace(tmp, path)
        self.save_state(state)

    def save_state(self, state: dict) -> None:
        _atomic_write_text(self.state_path, json.dumps(state, indent=1))


# --- tracking ----------------------------------------------------------------------------------

class Tracking:
    """One MLflow run per federated training, through fedbrain.tracking (the centralized run's names)."""

    def __init__(self, settings: RunSettings, run_id: str | None, tags: dict[str, str]):
        import mlflow

        from fedbrain import tracking

        self.mlflow, self.tracking, self.settings = mlflow, tracking, settings
        tracking.configure(settings.params)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(run_name=settings.run_name, tags=tags)
            tracking.log_params({k: v for k, v in tracking.flatten(settings.params).items()
                                 if not k.startswith("mlflow.")})

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_params(self, values: dict) -> None:
        self.tracking.log_params(values)

    def log(self, metrics: dict, step: int) -> None:
        self.tracking.log_metrics(metrics, step=step)

    def finish_run(self, model, path: Path, failures: list[dict], state: dict) -> None:
        """Failures as a metric, a tag and a file; the rounds' records; the model and its card."""
        self.tracking.log_metrics({"failures": len(failures)})
        self.mlflow.set_tag("failures", str(len(failures)))
        self.mlflow.log_dict({"failures": failures, "initial": state["initial"], "rounds": state["rounds"]},
                             "federation/rounds.json")
        if self.settings.params.get("mlflow", {}).get("log_models", True):
            self.tracking.log_keras_model(self.settings.params, model, path)
        else:
            self.mlflow.log_artifact(str(path.with_suffix(".json")), artifact_path="card")

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


# --- the ServerApp -----------------------------------------------------------------------------

def history_of(records: list[dict]) -> dict[str, list[float]]:
    """{metric: [value per round]}, the shape of the centralized run's per-epoch history."""
    names = sorted({k for r in records for k in r["metrics"]})
    return {name: [r["metrics"].get(name) for r in records] for name in names}


@app.main()
def main(grid: Grid, context: Context) -> None:
    import tensorflow as tf

    from fedbrain.dataset import load_classes
    from fedbrain.train import save_model

    settings = RunSettings.from_run_config(context.run_config)
    checkpoints = Checkpoints(settings.out, settings.role)
    tf.keras.utils.set_random_seed(settings.seed)
    model = build(settings, compiled=False)

    state = checkpoints.latest() if settings.resume else None
    if state is not None:
        first = state["round"] + 1
        model.set_weights(tf.keras.models.load_model(checkpoints.model_path(state["round"]),
                                                     compile=False).get_weights())
        log(INFO, "resuming %s after round %d of %d", settings.role, state["round"], settings.rounds)
    else:
        checkpoints.clear()
        first = 1
        state = {"round": 0, "run_id": None, "rounds": [], "node_hospital": {},
                 "initial": {"metrics": {}, "hospitals": {}}}
    known = {int(node): k for node, k in state["node_hospital"].items()}

    tags = {"task": settings.task, "model": settings.model, "training": "federated", "privacy": "none",
            "strategy": "fedavg", "secure": str(settings.secure).lower(), "role": settings.role}
    tracking = Tracking(settings, state["run_id"], tags)
    state["run_id"] = tracking.run_id
    if first == 1:
        tracking.log_params({"federated.rounds": settings.rounds, "federated.local_epochs": settings.local_epochs,
                             "federated.min_available_nodes": settings.min_available_nodes,
                             "federated.min_train_nodes": settings.min_train_nodes,
                             "federated.fraction_train": settings.fraction_train,
                             "federated.secure": settings.secure,
                             "model.parameters": model.count_params()})

    strategy = HospitalFedAvg(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                              min_train_nodes=settings.min_train_nodes,
                              min_evaluate_nodes=settings.min_evaluate_nodes,
                              min_available_nodes=settings.min_available_nodes)
    arrays = ArrayRecord(model.get_weights())
    try:
        for server_round in range(first, settings.rounds + 1):
            log(INFO, "[%s] round %d/%d", settings.role, server_round, settings.rounds)
            arrays, record, evaluation = train_round(grid, strategy, settings, server_round, arrays, known)
            arrays = calibrate(grid, strategy, settings, record, model, arrays, known)
            # The previous global model's federated evaluation came back with this round's updates.
            merge_evaluation(state["rounds"][-1] if state["rounds"] else state["initial"], evaluation)
            if evaluation.round >= 1:
                tracking.log(evaluation.val_metrics(), evaluation.round)
            model.set_weights(arrays.to_numpy_ndarrays())
            state["round"] = server_round
            state["rounds"].append(asdict(record))
            state["node_hospital"] = {str(n): k for n, k in known.items()}
            checkpoints.save(model, server_round, state)
            if server_round < settings.rounds:  # the last round's figures wait for its evaluation
                tracking.log(record.round_metrics(), server_round)
                _log_round(settings, state)
        last = RoundRecord(**state["rounds"][-1])
        if not any(k.startswith("val_") for k in last.metrics):
            # Nothing comes after the last round to carry its evaluation: ask for it.
            final_evaluation(grid, strategy, settings, last, ArrayRecord(model.get_weights()), known)
            state["rounds"][-1] = asdict(last)
            checkpoints.save_state(state)
            tracking.log(last.round_metrics() | last.val_metrics(), last.round)
        _log_round(settings, state)
    except BaseException:
        tracking.finish("FAILED")
        raise

    failures = [f | {"round": r["round"]} for r in state["rounds"] for f in r["failures"]]
    history = history_of(state["rounds"])
    info = load_classes(settings.processed)
    card = {"task": settings.task, "model": settings.model, "training": "federated", "privacy": "none",
            "epsilon": None, "classes": info["classes"], "run_id": tracking.run_id, "strategy": "fedavg",
            "rounds": settings.rounds, "local_epochs": settings.local_epochs, "history": history,
            "initial": state["initial"], "round_records": state["rounds"], "failures": failures}
    path = settings.out / f"{settings.role}.keras"
    save_model(model, path, card)
    tracking.finish_run(model, path, failures, state)
    histories_path = settings.out / "history.json"
    histories = json.loads(histories_path.read_text()) if histories_path.is_file() else {}
    histories[settings.role] = history
    _atomic_write_text(histories_path, json.dumps(histories, indent=2))
    tracking.finish()
    log(INFO, "[%s] global model saved to %s", settings.role, path)


def _log_round(settings: RunSettings, state: dict) -> None:
    record = RoundRecord(**state["rounds"][-1])
    previous = state["rounds"][-2] if len(state["rounds"]) > 1 else state["initial"]
    log(INFO, "[%s] round %d done in %.1f s (slowest hospital trained %.1f s, overhead %.1f%%): %s; "
        "previous global model: %s; hospitals %s; failures %d", settings.role, record.round, record.wall_time_s,
        record.slowest_training_s, 100 * record.overhead, _fmt(record.metrics), _fmt(previous["metrics"], "val_"),
        sorted(record.hospitals), len(record.failures))


def _fmt(metrics: dict, prefix: str = "") -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(prefix)) or "-"
