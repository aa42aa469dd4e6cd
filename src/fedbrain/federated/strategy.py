"""FedAvg, plus a record of who took part in each round and what each hospital reported.

Flower's FedAvg samples the SuperNodes online at the start of a phase (so one that joined
during the run is in the next round) and averages the arrays weighted by ``num-examples``.
This subclass adds bookkeeping: the per-hospital values (examples, training time, local
metrics) are kept and left out of the averages, replies that failed are kept with their
reason, each hospital's BatchNormalization statistics are set aside for the server to pool,
and metrics are averaged over the hospitals that have them (a hospital without validation data,
or one that joined after the model it would evaluate was sent, has no val_* to average).
Before averaging, each update is checked (update_checks.py): a rejected one is left out with its
reason, and a round with fewer than `min_valid_updates` valid updates averages nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedbrain.federated.phases import is_phase
from fedbrain.federated.task import CALIBRATION_WEIGHT_KEY, META_KEYS, STATISTICS, VAL_WEIGHT_KEY, WEIGHT_KEY
from fedbrain.federated.update_checks import Rejection, UpdateRules, check_update, check_values, layout, norm_outliers

# A rejected update's own figures (its training and local validation): left out of the averages.
UPDATE_METRICS = ("train_", "local_val_")


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
    rejections: list[Rejection] = field(default_factory=list)
    averaged: int = 0  # updates averaged (train)

    @property
    def rejected_updates(self) -> set[int]:
        """Node ids whose update was rejected."""
        return {r.node_id for r in self.rejections if r.what == "update"}

    def averaged_metrics(self) -> dict[str, float]:
        """The reports' model metrics averaged over the hospitals that have them (a rejected update's
        training figures left out; its evaluation of the previous global model counts)."""
        rejected = self.rejected_updates
        records = [RecordDict({"metrics": MetricRecord({k: v for k, v in report.items()
                                                        if node not in rejected or not k.startswith(UPDATE_METRICS)})})
                   for node, report in self.reports.items()]
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

    def __init__(self, client_dp: tuple[float, float] | None = None, rules: UpdateRules | None = None, **kwargs):
        super().__init__(weighted_by_key=WEIGHT_KEY, train_metrics_aggr_fn=average_metrics,
                         evaluate_metrics_aggr_fn=average_metrics, **kwargs)
        self.phase = Phase("idle")
        # message id -> the node it was sent to, set by whoever pushes the messages
        self.destinations: dict[str, int] = {}
        # Called with (round, phase, node, reply) for every reply collected: the audit log.
        self.on_reply: Callable[[int, str, int, Message], None] | None = None
        # Called with each Rejection as it is made: the console, MLflow and the audit log.
        self.on_rejection: Callable[[Rejection], None] | None = None
        self.rules = rules or UpdateRules()
        self.global_layout: list = []  # [(shape, dtype)] of the last train message's global arrays: every update's
        self.global_arrays: list = []  # and those arrays, for the norm rule
        self.client_dp = None
        if client_dp is not None:
            inner = FedAvg(weighted_by_key=WEIGHT_KEY, **kwargs)
            self.client_dp = DifferentialPrivacyClientSideFixedClipping(inner, client_dp[0], client_dp[1], 1)

    def configure_train(self, server_round, arrays, config, grid):
        self.global_arrays = arrays.to_numpy_ndarrays()
        self.global_layout = layout(self.global_arrays)
        if self.client_dp is not None:  # sends the clipping norm with the weights
            return self.client_dp.configure_train(server_round, arrays, config, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def node_of(self, msg: Message) -> int:
        return self.destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def reject(self, node: int, server_round: int, reason: str, what: str = "update") -> Rejection:
        """Leave a hospital's update (or statistics) out of this round, with the reason."""
        hospital = self.phase.reports.get(node, {}).get("hospital")
        rejection = Rejection(None if hospital is None else int(hospital), server_round, reason, node, what)
        self.phase.rejections.append(rejection)
        if what == "statistics":
            self.phase.statistics.pop(node, None)
        if self.on_rejection is not None:
            self.on_rejection(rejection)
        return rejection

    def collect(self, phase: str, replies: Iterable[Message], server_round: int = 0) -> list[Message]:
        """Record a phase's reports and failures; return the replies that carry examples."""
        self.phase = Phase(phase)
        usable = []
        for msg in replies:
            node = self.node_of(msg)
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
                # NaN statistics (e.g. from corrupt images) would spoil the pooled ones of every hospital.
                if (reason := check_values(self.phase.statistics[node][1], "statistics")) is not None:
                    self.reject(node, server_round, reason, "statistics")
            # No examples, no weight: nothing to average (and FedAvg would divide by zero).
            if metrics.get(WEIGHT_KEY, 0) > 0:
                usable.append(msg)
        return usable

    def valid_updates(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies whose update passes update_checks (values, layout, examples, then the norm rule
        over those); the others are rejected with their reason."""
        checked = {}
        for msg in replies:
            node = self.node_of(msg)
            arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
            examples = next(iter(msg.content.metric_records.values())).get(WEIGHT_KEY, 0)
            reason = check_update(arrays, self.global_layout, examples, self.rules.max_examples)
            if reason is not None:
                self.reject(node, server_round, reason)
            else:
                checked[node] = (msg, arrays)
        far = norm_outliers({node: arrays for node, (_, arrays) in checked.items()}, self.global_arrays,
                            self.rules.norm_factor)
        for node, reason in far.items():
            self.reject(node, server_round, reason)
        return [msg for node, (msg, _) in checked.items() if node not in far]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """(The examples-weighted average of the valid updates, or None with fewer than
        `rules.min_valid_updates` of them; the averaged metrics)."""
        replies = list(replies)
        self.collect("train", replies, server_round)
        # Every update is checked, also one whose examples are 0 or negative (which FedAvg would
        # otherwise skip without a word); a reply without arrays (a hospital that did not train, e.g.
        # it refused to cross its privacy budget) has no update to check.
        sent = [msg for msg in replies if not msg.has_error() and "arrays" in msg.content.array_records]
        updates = []
        for msg in self.valid_updates(server_round, sent):
            # FedAvg wants one ArrayRecord and the same metric keys in every reply: give it the
            # update and its weight; the metrics are averaged from the reports (Phase.averaged_metrics).
            examples = next(iter(msg.content.metric_records.values()))[WEIGHT_KEY]
            if self.client_dp is not None:
                examples = 1  # the unweighted mean (see the class docstring)
            msg.content = RecordDict({"arrays": msg.content.array_records["arrays"],
                                      "metrics": MetricRecord({WEIGHT_KEY: examples})})
            updates.append(msg)
        self.phase.averaged = len(updates)
        if not updates or len(updates) < self.rules.min_valid_updates:
            return None, self.phase.averaged_metrics()
        if self.client_dp is not None:
            self.client_dp.num_sampled_clients = len(updates)
            arrays, _ = self.client_dp.aggregate_train(server_round, updates)
        else:
            arrays, _ = super().aggregate_train(server_round, updates)
        return arrays, self.phase.averaged_metrics()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_evaluate(server_round, self.collect("evaluate", replies, server_round))
