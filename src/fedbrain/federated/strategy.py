"""FedAvg, plus a record of who took part in each round and what each hospital reported.

Flower's FedAvg samples the SuperNodes online at the start of a phase (so one that joined
during the run is in the next round) and averages the arrays weighted by ``num-examples``.
This subclass adds bookkeeping: the per-hospital values (examples, training time, local
metrics) are kept and left out of the averages, replies that failed are kept with their
reason, each hospital's BatchNormalization statistics are set aside for the server to pool,
and metrics are averaged over the hospitals that have them (a hospital without validation data,
or one that joined after the model it would evaluate was sent, has no val_* to average).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedbrain.federated.phases import is_phase
from fedbrain.federated.task import CALIBRATION_WEIGHT_KEY, META_KEYS, STATISTICS, VAL_WEIGHT_KEY, WEIGHT_KEY


def average_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted averages of the model metrics (hospital number, time... left out).

    val_* (the global model on each hospital's validation split) is weighted by validation
    examples, everything else by training examples (`weight_key`), with Flower's own averaging.
    """
    groups: dict[str, tuple[list[RecordDict], str]] = {"train": ([], weight_key), "val": ([], VAL_WEIGHT_KEY)}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        for group, (kept, key) in groups.items():
            values = {k: v for k, v in metrics.items()
                      if k not in META_KEYS and not is_phase(k) and k.startswith("val_") == (group == "val")}
            if values and metrics.get(key, 0) > 0:
                kept.append(RecordDict({"metrics": MetricRecord({**values, key: metrics[key]})}))
    averaged = MetricRecord()
    for kept, key in groups.values():
        if kept:
            averaged.update(aggregate_metricrecords(kept, key))
    return averaged


def content_bytes(message: Message) -> int:
    """Bytes of a message's records (arrays, metrics, config) as Flower counts them."""
    if not message.has_content():
        return 0
    content = message.content
    records = [*content.array_records.values(), *content.metric_records.values(),
               *content.config_records.values()]
    return sum(record.count_bytes() for record in records)


@dataclass
class Phase:
    """One train or evaluate exchange: who replied with what, who failed and why."""

    name: str
    reports: dict[int, dict] = field(default_factory=dict)  # node id -> its MetricRecord
    failures: list[dict] = field(default_factory=list)      # {node_id, phase, reason}
    bytes_up: int = 0
    statistics: dict[int, tuple[int, list]] = field(default_factory=dict)  # node id -> (images, [mean, var, ...])

    def averaged_metrics(self) -> dict[str, float]:
        """The reports' model metrics averaged over the hospitals that have them."""
        records = [RecordDict({"metrics": MetricRecord(report)}) for report in self.reports.values()]
        return {k: float(v) for k, v in average_metrics(records, WEIGHT_KEY).items()}


class HospitalFedAvg(FedAvg):
    """FedAvg that remembers each hospital's report and each failure of the current phase.

    `client_dp=(noise_multiplier, clipping_norm)`: client-level DP through Flower's
    DifferentialPrivacyClientSideFixedClipping (the hospitals clip their round update with
    fixedclipping_mod, the server adds Gaussian noise of std noise_multiplier * clip / m to the
    mean of the m updates). Two choices keep that noise sufficient: the mean is unweighted (with
    examples-weighting one hospital could move it by more than clip / m), and m is the number of
    updates actually averaged that round, not the number sampled (a hospital that failed would
    otherwise leave the noise scaled for more updates than there are).
    """

    def __init__(self, client_dp: tuple[float, float] | None = None, **kwargs):
        super().__init__(weighted_by_key=WEIGHT_KEY, train_metrics_aggr_fn=average_metrics,
                         evaluate_metrics_aggr_fn=average_metrics, **kwargs)
        self.phase = Phase("idle")
        # message id -> the node it was sent to, set by whoever pushes the messages
        self.destinations: dict[str, int] = {}
        # Called with (round, phase, node, reply) for every reply collected: the audit log.
        self.on_reply: Callable[[int, str, int, Message], None] | None = None
        self.client_dp = None
        if client_dp is not None:
            inner = FedAvg(weighted_by_key=WEIGHT_KEY, **kwargs)
            self.client_dp = DifferentialPrivacyClientSideFixedClipping(inner, client_dp[0], client_dp[1], 1)

    def configure_train(self, server_round, arrays, config, grid):
        if self.client_dp is not None:  # sends the clipping norm with the weights
            return self.client_dp.configure_train(server_round, arrays, config, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def collect(self, phase: str, replies: Iterable[Message], server_round: int = 0) -> list[Message]:
        """Record a phase's reports and failures; return the replies that carry examples."""
        self.phase = Phase(phase)
        usable = []
        for msg in replies:
            node = self.destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if self.on_reply is not None:
                self.on_reply(server_round, phase, node, msg)
            if msg.has_error():
                self.phase.failures.append({"node_id": node, "phase": phase, "reason": msg.error.reason})
                continue
            self.phase.bytes_up += content_bytes(msg)
            content = msg.content
            metrics = dict(next(iter(content.metric_records.values())))
            self.phase.reports[node] = metrics
            if STATISTICS in content.array_records:
                self.phase.statistics[node] = (int(metrics.get(CALIBRATION_WEIGHT_KEY, 0)),
                                               content.array_records[STATISTICS].to_numpy_ndarrays())
            # No examples, no weight: nothing to average (and FedAvg would divide by zero).
            if metrics.get(WEIGHT_KEY, 0) > 0:
                usable.append(msg)
        return usable

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """(The examples-weighted average of the updates, the averaged metrics)."""
        updates = []
        for msg in self.collect("train", replies, server_round):
            # FedAvg wants one ArrayRecord and the same metric keys in every reply: give it the
            # update and its weight; the metrics are averaged from the reports (Phase.averaged_metrics).
            examples = next(iter(msg.content.metric_records.values()))[WEIGHT_KEY]
            if self.client_dp is not None:
                examples = 1  # the unweighted mean (see the class docstring)
            msg.content = RecordDict({"arrays": msg.content.array_records["arrays"],
                                      "metrics": MetricRecord({WEIGHT_KEY: examples})})
            updates.append(msg)
        if self.client_dp is not None:
            if not updates:
                return None, self.phase.averaged_metrics()
            self.client_dp.num_sampled_clients = len(updates)
            arrays, _ = self.client_dp.aggregate_train(server_round, updates)
        else:
            arrays, _ = super().aggregate_train(server_round, updates)
        return arrays, self.phase.averaged_metrics()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_evaluate(server_round, self.collect("evaluate", replies, server_round))
