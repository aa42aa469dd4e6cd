"""The round loop's seam for update checks (the checks themselves are update_checks.py).

What the ServerApp does with a rejected update: leave it out of the round, say so on the console,
in MLflow and in the audit log (`RejectionLog`), keep it in the round's record (`record_rejections`),
and stop the run when a round is left with fewer than `federated.min_valid_updates` valid updates
(`stop_reason`). Under Paillier the server sees ciphertexts only and checks what it can of them
(`check_encrypted_updates`).
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from fedbrain.federated.encrypted import UPDATE, EncryptedAggregation
from fedbrain.federated.records import RoundRecord
from fedbrain.federated.strategy import HospitalFedAvg
from fedbrain.federated.task import WEIGHT_KEY
from fedbrain.federated.update_checks import Rejection, check_ciphertexts


class RejectionLog:
    """Where a rejection goes as it is made: the console, an MLflow tag with the reason, the audit log."""

    def __init__(self, role: str, tracking, audit, known: dict[int, int], aggregation: str):
        self.role, self.tracking, self.audit, self.known, self.aggregation = role, tracking, audit, known, aggregation

    def __call__(self, rejection: Rejection) -> None:
        hospital = rejection.hospital if rejection.hospital is not None else self.known.get(rejection.node_id)
        log(WARNING, "[%s] round %d: hospital %s (node %s): %s rejected: %s", self.role, rejection.round,
            hospital, rejection.node_id, rejection.what, rejection.reason)
        suffix = "" if rejection.what == "update" else f"/{rejection.what}"
        self.tracking.mlflow.set_tag(f"rejected/round_{rejection.round}/hospital_{hospital}{suffix}",
                                     rejection.reason)
        self.audit.append({**rejection.audit_entry(self.aggregation), "hospital": hospital})


def check_encrypted_updates(strategy: HospitalFedAvg, encrypted: EncryptedAggregation,
                            received: list[tuple[int, Message]], server_round: int, size: int) -> None:
    """Paillier: the checks the server can make on ciphertexts (update_checks.py): their number and the
    example count, at most what the hospital announced. A rejected update is taken out of its reply
    (its statistics still pool). With fewer valid updates than `min_valid_updates` none is added:
    the server would decrypt a sum of too few hospitals for nothing."""
    rules = strategy.rules
    expected = encrypted.packings[UPDATE].ciphertexts(size)
    valid = []
    for node, reply in received:
        if UPDATE not in reply.content.array_records:
            continue
        update = reply.content[UPDATE]
        metrics = next(iter(reply.content.metric_records.values()), {})
        announced = None if encrypted.unweighted else encrypted.examples.get(node)
        limits = [n for n in (announced, rules.max_examples) if n is not None]
        rows = next(iter(update.values())).shape[0] if len(update) == 1 else -1
        reason = (f"update has {len(update)} ciphertext arrays; expected 1" if rows < 0 else
                  check_ciphertexts(rows, expected, metrics.get(WEIGHT_KEY, 0), min(limits, default=None)))
        if reason is not None:
            strategy.reject(node, server_round, reason)
            del reply.content[UPDATE]
        else:
            valid.append(reply)
    if len(valid) < rules.min_valid_updates:
        for reply in valid:
            del reply.content[UPDATE]


def average_encrypted(strategy: HospitalFedAvg, encrypted: EncryptedAggregation, side_exchange,
                      replies: list[Message], arrays: ArrayRecord, server_round: int, train: bool
                      ) -> tuple[ArrayRecord | None, list | None]:
    """Paillier: record the replies, check the encrypted updates (`check_encrypted_updates`), add them and
    have the hospitals open the sum (encrypted.py): (the new global weights, or None without training or
    with fewer than `min_valid_updates` updates added; the pooled statistics, or None)."""
    strategy.collect("train" if train else "calibrate", replies, server_round)
    received = [(strategy.node_of(m), m) for m in replies if not m.has_error()]
    (flat,) = arrays.to_numpy_ndarrays()
    if train:
        check_encrypted_updates(strategy, encrypted, received, server_round, flat.size)
    failed_before = len(strategy.phase.failures)
    update, pooled = encrypted.aggregate(side_exchange, received, server_round, flat.size,
                                         strategy.phase.failures, strategy.phase.name)
    failed = {f["node_id"] for f in strategy.phase.failures[failed_before:]}
    strategy.phase.averaged = 0 if update is None else sum(
        1 for node, m in received if UPDATE in m.content.array_records and node not in failed)
    if not train or update is None or strategy.phase.averaged < strategy.rules.min_valid_updates:
        return None, pooled
    return ArrayRecord([flat + update.astype(np.float32)]), pooled


def record_rejections(strategy: HospitalFedAvg, record: RoundRecord, known: dict[int, int]) -> set[str]:
    """Store the phase's rejections in the round's record; the hospitals whose update was rejected."""
    rejected = set()
    for rejection in strategy.phase.rejections:
        hospital = rejection.hospital if rejection.hospital is not None else known.get(rejection.node_id)
        record.rejections.append({**rejection.as_dict(), "hospital": hospital})
        name = "rejected" if rejection.what == "update" else f"{rejection.what}_rejected"
        record.hospitals.setdefault(str(hospital), {})[name] = 1.0
        if rejection.what == "update":
            rejected.add(str(hospital))
    return rejected


def stop_reason(role: str, strategy: HospitalFedAvg, record: RoundRecord, rounds: int, tracking) -> dict:
    """A round left with too few valid updates: say why on the console and in MLflow (tag
    `stopped_by_validation`, the round's rejection figures); the run's record of the stop."""
    reason = (f"round {record.round}: {strategy.phase.averaged} valid update(s), fewer than "
              f"federated.min_valid_updates={strategy.rules.min_valid_updates} ({len(record.rejections)} "
              f"rejected, {len(record.failures)} failed)")
    log(WARNING, "[%s] too few valid updates: stopping after round %d of %d, keeping its global model: %s",
        role, record.round - 1, rounds, reason)
    tracking.mlflow.set_tag("stopped_by_validation", reason)
    tracking.log({"nodes_rejected": len(record.rejections), "nodes_failed": len(record.failures),
                  **{f"hospital_{k}/{name}": v for k, h in record.hospitals.items()
                     for name, v in h.items() if name.endswith("rejected")}}, record.round)
    return {"round": record.round, "reason": reason, "rejections": record.rejections, "failures": record.failures}
