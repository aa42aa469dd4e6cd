"""The ServerApp: FedAvg over the hospitals, the global model saved and tracked every round.

Each round: wait until `min-available-nodes` SuperNodes are online; send the global model to
the sampled ones (FedAvg's `configure_train`); collect their updates until all replied, failed
or `round-timeout` passed; average them weighted by examples (federated.strategy fedavgm | fedadam:
then a server optimizer's step from that average, server_optimizer.py). A SuperNode that crashes shows
up as a failed reply (the SuperLink reports it once it misses its heartbeats) and the round
goes on with the others; one that joined is sampled from the next round on.

BatchNormalization: FedAvg's average of the hospitals' moving statistics fits none of the models
(with it the global model predicted one class for everything). Instead the hospitals measure each
BatchNormalization layer's input statistics under the averaged weights on their training data,
and the pooled statistics complete the global model.

One exchange per round. Each Flower exchange costs polling and moving the weights, so round
r + 1's train message does three things at each hospital:
  - measure the statistics of round r's average (the weights it trains from);
  - evaluate round r - 1's global model on its validation split: the weights it received with
    the previous message, kept in its ClientApp process, with the pooled statistics sent now;
  - train.
After round r + 1's replies the server pools the statistics into round r's global model; it saves
that model and records round r - 1's federated evaluation (averaged weighted by validation
examples) once round r + 2's message is out, while the hospitals work.
After the last round R, a `query.calibrate` message measures round R's statistics (and evaluates
round R - 1's model) and a `query.evaluate_kept` message, carrying only the pooled statistics,
evaluates round R's with the weights each hospital kept from the calibration message.
A round's figures are logged once its global model is complete, its val_* when they arrive.

Every update is checked before it is averaged (update_checks.py): a rejected one is left out with
its reason (console, MLflow, audit log) and the round goes on with the rest; a round with fewer than
`federated.min_valid_updates` valid updates stops the run, as the privacy budget does, and the last
good global model (the previous round's) is the one calibrated, evaluated and saved.

The loop is Flower's `Strategy.start` written out, so that a round can be resumed from a
checkpoint (`--resume`) and recorded (per-hospital metrics, failures, bytes, times) as it ends.
A resumed run starts with the round after the last saved global model (the round in flight when
it stopped is trained again); an evaluation the stop lost gets an evaluate message (FedAvg's
`configure_evaluate`, the saved model's weights and statistics) at the end.

Writes, under `out`:
  checkpoints/<role>/round_<r>.keras and state.json   every round (resume reads these)
  <role>.keras + <role>.json (the model card)         at the end
  history.json                                        {role: {metric: [value per round]}}
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedbrain.dataset import write_text_atomic
from fedbrain.federated.encrypted import EncryptedAggregation, EncryptionSettings
from fedbrain.federated.global_models import GlobalModels, report_round
from fedbrain.federated.records import Checkpoints, Evaluation, RoundRecord, Tracking, history_of
from fedbrain.federated.phases import is_phase
from fedbrain.federated.server_optimizer import ServerOptimizer
from fedbrain.federated.settings import update_rules
from fedbrain.federated.strategy import HospitalFedAvg, content_bytes
from fedbrain.federated.task import (PREVIOUS_STATISTICS, TEMPERATURE_NLL, VAL_WEIGHT_KEY, WEIGHT_KEY, RunSettings,
                                    batch_norm_layers, build, lr_scale, trainable_positions, weights_record)
from fedbrain.federated.validation import RejectionLog, average_encrypted, record_rejections, stop_reason
from fedbrain.federated.waits import limit_object_pulls, shorten_object_pulls
from fedbrain.privacy.budget import PRIVACY_KEYS, PrivacyLedger
from fedbrain.secure.audit import AuditLog, reply_entry

app = ServerApp()

# How often the ServerApp asks the SuperLink for replies (Flower's own loop waits 3 s).
POLL_S = 0.2
# The ClientApp's @app.query("calibrate") and @app.query("evaluate_kept") handlers.
CALIBRATE = "query.calibrate"
EVALUATE_KEPT = "query.evaluate_kept"


# --- messages ----------------------------------------------------------------------------------

def exchange(grid: Grid, strategy: HospitalFedAvg, messages: list[Message], timeout: float,
             while_waiting: Callable[[], None] | None = None) -> tuple[list[Message], list[Message]]:
    """Push messages, do `while_waiting` (the server's own work, done while the hospitals do
    theirs), pull replies until all arrived or `timeout`: (replies, unanswered).

    Tells the strategy which node each message went to: an error reply the SuperLink writes for
    a node that stopped sending heartbeats does not come from that node.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages)) if messages else []
    if while_waiting is not None:
        while_waiting()
    if not messages:
        return [], []
    pending = {mid: msg for mid, msg in zip(ids, messages) if mid is not None}
    strategy.destinations = {mid: msg.metadata.dst_node_id for mid, msg in pending.items()}
    unsent = [msg for mid, msg in zip(ids, messages) if mid is None]
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        # A reply whose objects never arrive (its SuperNode died in between) must not hold the
        # round past its deadline: see waits.limit_object_pulls.
        limit_object_pulls(deadline - time.monotonic())
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


def _add_times(hospital: dict, report: dict) -> None:
    """Add a reply's calibration, evaluation and phase seconds (phases.py) to the hospital's
    figures for the round (the last round has more than one message)."""
    for name, value in report.items():
        if name.endswith("-time-s") or is_phase(name):
            key = name.replace("-time-s", "_time_s").replace("-", "_")
            hospital[key] = hospital.get(key, 0.0) + float(value)
    if "steady-epoch-s" in report:
        hospital["steady_epoch_s"] = float(report["steady-epoch-s"])


def _metric_values(report: dict, prefixes: tuple[str, ...]) -> dict[str, float]:
    return {name: float(v) for name, v in report.items() if name.startswith(prefixes) and not isinstance(v, list)}


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


def hospital_round(grid: Grid, strategy: HospitalFedAvg, settings: RunSettings, record: RoundRecord,
                   arrays: ArrayRecord, previous: tuple[int, list] | None, known: dict[int, int],
                   train: bool, while_waiting: Callable[[], None] | None = None,
                   encrypted: EncryptedAggregation | None = None
                   ) -> tuple[ArrayRecord | None, list | None, Evaluation | None]:
    """One exchange with the hospitals (see the module docstring): send `arrays` (the global
    weights before BatchNormalization calibration) and `previous` (round, pooled statistics) of the
    last global model, do `while_waiting` while the hospitals work; returns (the averaged updates,
    or None without training; the pooled statistics of `arrays`, or None if no hospital sent any;
    the evaluation of `previous`). `encrypted`: the hospitals send ciphertexts (encrypted.py), which
    take one more exchange to open (and one to learn the counts of hospitals not seen before).
    """
    start = time.perf_counter()

    def side_exchange(messages: list[Message], phase: str) -> tuple[list[Message], list[Message]]:
        record.bytes_down += sum(content_bytes(m) for m in messages)
        got, missing = exchange(grid, strategy, messages, settings.round_timeout)
        for reply in got:
            record.bytes_up += content_bytes(reply)
            if strategy.on_reply is not None:
                strategy.on_reply(record.round, phase, reply.metadata.src_node_id, reply)
        return got, missing

    # weights-round: whose global model `arrays` are (round r's average trains in round r + 1).
    config = ConfigRecord({"server-round": record.round, "lr-scale": lr_scale(settings, record.round),
                           "weights-round": record.round - 1 if train else record.round})
    if previous is not None:
        config["previous-round"] = previous[0]
    if train:
        messages = list(strategy.configure_train(record.round, arrays, config, grid))
    else:
        online = wait_for_nodes(grid, settings.min_available_nodes, settings.node_wait_timeout)
        content = RecordDict({"arrays": arrays, "config": config})
        messages = [Message(content=content, message_type=CALIBRATE, dst_node_id=node) for node in online]
    if previous is not None and previous[1] and messages:
        messages[0].content[PREVIOUS_STATISTICS] = ArrayRecord(previous[1])  # the messages share one content
    if encrypted is not None:
        messages = encrypted.prepare(side_exchange, messages)
        known.update(encrypted.hospitals)
    record.bytes_down += sum(content_bytes(m) for m in messages)
    replies, unanswered = exchange(grid, strategy, messages, settings.round_timeout, while_waiting)
    pooled_secure = None
    if encrypted is not None:
        clock = time.perf_counter()
        new_arrays, pooled_secure = average_encrypted(strategy, encrypted, side_exchange, replies, arrays,
                                                      record.round, train)
        record.decryption_phase_s += time.perf_counter() - clock
        averaged = strategy.phase.averaged_metrics()
    elif train:
        new_arrays, averaged = strategy.aggregate_train(record.round, replies)
    else:
        strategy.collect("calibrate", replies, record.round)
        new_arrays, averaged = None, strategy.phase.averaged_metrics()
    record.bytes_up += strategy.phase.bytes_up
    record.failures += _failures(strategy, unanswered, known, settings, record.round)
    evaluation = Evaluation(previous[0]) if previous is not None else None
    reports = _reports_by_hospital(strategy, known)
    rejected = record_rejections(strategy, record, known)
    for k, report in reports.items():
        hospital = record.hospitals.setdefault(k, {})
        # Time spent in this round's messages (the last round calibrates and evaluates more than once).
        _add_times(hospital, report)
        if train and k in rejected:
            # Not averaged: none of its training figures either; the privacy it spent training counts.
            hospital.update({key: float(report[key]) for key in PRIVACY_KEYS if key in report})
        elif train:
            hospital.update({"examples": int(report.get(WEIGHT_KEY, 0)),
                             "train_time_s": float(report.get("train-time-s", 0.0)),
                             "epochs_run": int(report.get("epochs-run", 0)),
                             **_metric_values(report, ("train_", "local_val_")),
                             **{key: float(report[key]) for key in PRIVACY_KEYS if key in report}})
        if evaluation is not None and report.get(VAL_WEIGHT_KEY, 0) > 0:
            evaluation.hospitals[k] = {"val_examples": int(report[VAL_WEIGHT_KEY]),
                                       **_metric_values(report, ("val_",))}
    if train:
        record.metrics.update({k: v for k, v in averaged.items() if not k.startswith("val_")})
        record.metrics["learning_rate"] = settings.learning_rate * lr_scale(settings, record.round)
        record.train_phase_s = time.perf_counter() - start
    else:
        record.calibration_phase_s = time.perf_counter() - start
    if evaluation is not None:
        evaluation.metrics = {k: v for k, v in averaged.items() if k.startswith("val_")}
    statistics = list(strategy.phase.statistics.values())
    if statistics and sum(n for n, _ in statistics):
        pooled = pool_batch_norm_statistics(statistics)
    elif pooled_secure is not None:
        pooled = pooled_secure
    else:  # [] for a model without BatchNormalization (hospitals replied, sending none); None: nobody did
        has_statistics = encrypted.statistics_sizes if encrypted is not None else statistics
        pooled = [] if strategy.phase.reports and not has_statistics else None
    # None when training gave too few valid updates: the caller decides (main).
    return new_arrays, pooled, evaluation


def evaluate_global_model(grid: Grid, strategy: HospitalFedAvg, settings: RunSettings, record: dict,
                          known: dict[int, int], *, arrays: ArrayRecord | None = None,
                          statistics: list | None = None, while_waiting: Callable[[], None] | None = None,
                          temperatures: bool = False) -> Evaluation:
    """A global model on every hospital's validation split, with its own exchange: a saved one
    (`arrays`: weights and statistics), or the one whose weights the hospitals kept from the last
    message (its pooled `statistics` only: the weights need not travel again). `while_waiting`:
    as in `exchange`. `temperatures`: the hospitals also send their NLL per candidate temperature
    (the run's last model: GlobalModels fits its temperature from the pooled NLL)."""
    online = wait_for_nodes(grid, max(settings.min_available_nodes, settings.min_evaluate_nodes),
                            settings.node_wait_timeout)
    start = time.perf_counter()
    # The run's last model: hospitals also fit its temperature, and save their personalized models of it.
    config = {"last-model": True} if temperatures else {}
    if temperatures and settings.task == "classification":
        config["temperatures"] = True
    if arrays is not None:
        messages = list(strategy.configure_evaluate(record["round"], arrays, ConfigRecord(config), grid))
    else:
        content = RecordDict({"config": ConfigRecord({"previous-round": record["round"], **config}),
                              PREVIOUS_STATISTICS: ArrayRecord(statistics)})
        messages = [Message(content=content, message_type=EVALUATE_KEPT, dst_node_id=node) for node in online]
    record["bytes_down"] += sum(content_bytes(m) for m in messages)
    replies, unanswered = exchange(grid, strategy, messages, settings.round_timeout, while_waiting)
    averaged = strategy.aggregate_evaluate(record["round"], replies)
    record["bytes_up"] += strategy.phase.bytes_up
    record["failures"] += _failures(strategy, unanswered, known, settings, record["round"])
    averaged = dict(averaged or {})
    nll = averaged.pop(f"val_{TEMPERATURE_NLL}", None)
    evaluation = Evaluation(record["round"], {k: float(v) for k, v in averaged.items()}, nll_by_temperature=nll)
    for k, report in _reports_by_hospital(strategy, known).items():
        evaluation.hospitals[k] = {"val_examples": int(report.get(VAL_WEIGHT_KEY, 0)),
                                   **_metric_values(report, ("val_",))}
        _add_times(record["hospitals"].setdefault(k, {}), report)
    seconds = time.perf_counter() - start
    record["evaluate_phase_s"] += seconds
    record["wall_time_s"] += seconds
    return evaluation



@app.main()
def main(grid: Grid, context: Context) -> None:
    import tensorflow as tf

    from fedbrain.models import load as load_model
    from fedbrain.train import save_model

    shorten_object_pulls()  # this process (flwr-serverapp) runs only this app: replies are pulled sooner
    settings = RunSettings.from_run_config(context.run_config)
    checkpoints = Checkpoints(settings.out, settings.role)
    tf.keras.utils.set_random_seed(settings.seed)
    model = build(settings, compiled=False)

    state = checkpoints.latest() if settings.resume else None
    if state is not None:
        first = state["round"] + 1
        state.pop("stopped", None)  # a run stopped for too few valid updates goes on from its last good model
        model.set_weights(load_model(checkpoints.model_path(state["round"])).get_weights())
        log(INFO, "resuming %s after round %d of %d", settings.role, state["round"], settings.rounds)
    else:
        checkpoints.clear()
        first = 1
        state = {"round": 0, "run_id": None, "rounds": [], "node_hospital": {},
                 "initial": {"metrics": {}, "hospitals": {}}}
    known = {int(node): k for node, k in state["node_hospital"].items()}
    # FedAvgM / FedAdam: a server step on each round's average (a resumed run continues its state).
    optimizer = ServerOptimizer.for_run(settings.strategy, trainable_positions(model), checkpoints.dir, first - 1)

    tags = {"task": settings.task, "model": settings.model, "training": "federated", "privacy": settings.privacy.mode,
            "strategy": settings.strategy.name, "secure": str(settings.secure).lower(), "role": settings.role,
            "aggregation": "paillier" if settings.encrypted else "plaintext",
            "personalization": settings.personalization}
    rules = update_rules(settings.params)
    tracking = Tracking(settings, state["run_id"], tags)
    state["run_id"] = tracking.run_id
    if first == 1:
        tracking.log_params({"federated.rounds": settings.rounds, "federated.local_epochs": settings.local_epochs,
                             "federated.min_available_nodes": settings.min_available_nodes,
                             "federated.min_train_nodes": settings.min_train_nodes,
                             "federated.fraction_train": settings.fraction_train,
                             "federated.secure": settings.secure,
                             "federated.hospital_threads_resolved": int(context.run_config.get("hospital-threads", 0)),
                             "model.parameters": model.count_params(), **settings.strategy.as_params(settings.params),
                             # The update checks' defaults (the ones params.yaml sets are logged as written).
                             **{f"federated.{key}": value for key, value in rules.as_params().items()
                                if key not in (settings.params.get("federated") or {})}})

    ledger = PrivacyLedger(settings.privacy, rounds=settings.rounds)
    # Client level: the server adds the noise (Flower's wrapper), or under Paillier the hospitals do.
    client_dp = ((settings.privacy.client_noise(settings.rounds), settings.privacy.l2_norm_clip)
                 if settings.privacy.mode == "client" and not settings.encrypted else None)
    strategy = HospitalFedAvg(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                              min_train_nodes=settings.min_train_nodes,
                              min_evaluate_nodes=settings.min_evaluate_nodes,
                              min_available_nodes=settings.min_available_nodes, client_dp=client_dp, rules=rules)
    global_models = GlobalModels(settings, model, checkpoints, tracking, state)
    # One line per reply received, hash-chained (fedbrain audit verify); a resumed run continues it.
    audit_path = settings.out / "audit" / f"{settings.role}.jsonl"
    if first == 1:
        audit_path.unlink(missing_ok=True)
    audit = AuditLog(audit_path)
    encryption = None
    aggregation = "fedavg"
    if settings.encrypted:
        # fedbn: the statistics are the hospitals' own (personal.py), none are pooled.
        sizes = [int(v.shape[-1]) for layer in batch_norm_layers(model) for v in (layer.moving_mean,) * 2
                 if settings.personalization != "fedbn"]
        encryption = EncryptedAggregation(settings.paillier_public_key, EncryptionSettings(**settings.encryption), sizes,
                                          unweighted=settings.privacy.mode == "client")
        aggregation = "paillier"
    strategy.on_reply = lambda server_round, phase, node, reply: audit.append(
        reply_entry(server_round, phase, node, known.get(node), reply, aggregation))

    strategy.on_rejection = RejectionLog(settings.role, tracking, audit, known, aggregation)
    # The weights the hospitals get next (the initial or resumed model, then each round's average)
    # and the last finished global model the next message lets them evaluate: (round, statistics).
    arrays = weights_record(model.get_weights())
    previous: tuple[int, list] | None = None
    pending: RoundRecord | None = None  # the round whose average awaits its statistics
    # The last exchange's records and checkpoint, done while the next exchange is out: the
    # hospitals need not wait for the server's bookkeeping.
    finish: Callable[[], None] | None = None
    try:
        for server_round in range(first, settings.rounds + 1):
            if (reason := ledger.stop_before(server_round)) is not None:
                global_models.last_round = server_round - 1
                log(WARNING, "[%s] privacy budget: stopping after round %d of %d: %s", settings.role,
                    server_round - 1, settings.rounds, reason)
                tracking.mlflow.set_tag("stopped_by_budget", reason)
                break
            log(INFO, "[%s] round %d/%d", settings.role, server_round, settings.rounds)
            start = time.perf_counter()
            # FedAvg's own sampling would wait for these forever; we wait with a deadline.
            online = wait_for_nodes(grid, max(settings.min_available_nodes, settings.min_train_nodes),
                                    settings.node_wait_timeout)
            record = RoundRecord(round=server_round, nodes_online=len(online))
            new_arrays, pooled, evaluation = hospital_round(grid, strategy, settings, record, arrays, previous,
                                                            known, train=True, while_waiting=finish, encrypted=encryption)
            record.metrics.update(ledger.record(server_round, record.hospitals,
                                                encryption.noise_share if encryption is not None else 1.0))
            state["node_hospital"] = {str(n): k for n, k in known.items()}
            if new_arrays is None and ledger.refused:
                # The hospitals refused to cross their privacy budget: the budget stops the run next round.
                log(WARNING, "round %d: no hospital returned an update; the global model is unchanged", server_round)
                new_arrays = arrays
            elif new_arrays is None:
                state["stopped"] = stop_reason(settings.role, strategy, record, settings.rounds, tracking)
                global_models.last_round = server_round - 1
                # This round's exchange still measured the statistics of round r - 1's average and
                # evaluated round r - 2's model: complete and save round r - 1's (the last good) model
                # now; it is evaluated below with an evaluate message.
                global_models.finish(evaluation, pending, arrays, pooled, server_round - 1)
                pending, finish = None, None
                break
            else:
                new_arrays = optimizer.step(arrays, new_arrays, server_round)
            finish = functools.partial(global_models.finish, evaluation, pending, arrays, pooled, server_round - 1)
            previous = (server_round - 1, pooled or [])
            arrays, pending = new_arrays, record
            record.wall_time_s = time.perf_counter() - start
        # The last round's figures are logged with its evaluation (its wall time includes it).
        last_unevaluated = pending is not None or (bool(state["rounds"]) and not _has_val(state["rounds"][-1])
                                                    and state["rounds"][-1]["round"] == global_models.last_round)
        if pending is not None:
            # Nothing comes after the last round to calibrate its average: ask for it, then evaluate
            # it with the weights the hospitals kept from that message.
            start = time.perf_counter()
            _, pooled, evaluation = hospital_round(grid, strategy, settings, pending, arrays, previous, known,
                                                   train=False, while_waiting=finish, encrypted=encryption)
            pending.wall_time_s += time.perf_counter() - start
            global_models.evaluated(evaluation)
            global_models.complete(pending, arrays, pooled, global_models.last_round)
            save_last = functools.partial(global_models.save, global_models.last_round, log_round=False)
            if pooled is not None:
                global_models.evaluated(evaluate_global_model(grid, strategy, settings, state["rounds"][-1], known,
                                                              statistics=pooled, while_waiting=save_last,
                                                              temperatures=True))
            else:
                save_last()
        # Any global model still without val_* (one whose evaluation a resume lost, or the last if
        # no hospital kept its weights): an evaluate message with its saved model.
        for record in state["rounds"]:
            if not _has_val(record):
                saved = load_model(checkpoints.model_path(record["round"]))
                global_models.evaluated(evaluate_global_model(
                    grid, strategy, settings, record, known, arrays=weights_record(saved.get_weights()),
                    temperatures=record["round"] == global_models.last_round))
        if last_unevaluated:
            tracking.log(RoundRecord(**state["rounds"][-1]).round_metrics(), global_models.last_round)
        checkpoints.save_state(state)
        if state["rounds"]:  # none when round 1 already had too few valid updates
            report_round(settings, state)
    except BaseException:
        tracking.finish("FAILED")
        raise

    failures = [f | {"round": r["round"]} for r in state["rounds"] for f in r["failures"]]
    history = history_of(state["rounds"])
    info = settings.class_info()
    card = {"task": settings.task, "model": settings.model, "training": "federated", **ledger.card(),
            "classes": info["classes"], "run_id": tracking.run_id, "strategy": settings.strategy.name,
            "strategy_parameters": settings.strategy.parameters(), "aggregation": aggregation,
            "personalization": settings.personalization,
            "rounds": global_models.last_round, "rounds_planned": settings.rounds,
            "local_epochs": settings.local_epochs, "history": history,
            "initial": state["initial"], "round_records": state["rounds"], "failures": failures,
            **global_models.temperature,
            "rejections": [r for record in state["rounds"] for r in record.get("rejections", [])]}
    if "stopped" in state:
        card["stopped_by_validation"] = state["stopped"]
    card["audit_log"] = audit.path.relative_to(settings.out).as_posix()
    card["audit_entries"], card["audit_last_sha256"] = audit.head()
    path = settings.out / f"{settings.role}.keras"
    save_model(model, path, card)
    tracking.finish_run(model, path, failures, state, audit)
    histories_path = settings.out / "history.json"
    histories = json.loads(histories_path.read_text()) if histories_path.is_file() else {}
    histories[settings.role] = history
    write_text_atomic(histories_path, json.dumps(histories, indent=2))
    tracking.finish()
    log(INFO, "[%s] global model saved to %s", settings.role, path)


def _has_val(record: dict) -> bool:
    return any(k.startswith("val_") for k in record["metrics"])
