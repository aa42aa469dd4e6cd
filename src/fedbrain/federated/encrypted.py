"""Encrypted aggregation in the round loop (`federated.secure_aggregation: paillier`).

Threat model: an honest-but-curious server (SuperLink and ServerApp). It learns the example-weighted
sum of the hospitals' updates (as Flower's SecAgg+ also reveals), never one hospital's update or
BatchNormalization statistics. Example counts and evaluation metrics stay plaintext.

A round, for the server:
  1. counts: the first time it samples a hospital it asks for its number of training images (a
     `query.examples` message); every train message then carries the total D of the sampled ones;
  2. each hospital sends its update (its weights minus the global weights it received) and its
     statistics multiplied by n_k / D, packed and Paillier-encrypted (fedbrain.secure.paillier); the
     server checks each ciphertext array's shape and range (a malformed one is that hospital's
     failure) and multiplies them: the plaintexts add up;
  3. shared decryption: a `query.decrypt` message gives each online hospital an equal range of the
     summed ciphertexts; it decrypts them with the federation's private key, which only the hospitals
     hold, and returns the packed plaintext sums; the server unpacks them and scales by D / (sum of
     n_k over the hospitals that were added), which is FedAvg's weighted average exactly.
The server thus holds the plaintext global model (it writes checkpoints, MLflow and the model), and
decryption, ~2 ms per ciphertext, is split over the hospitals instead of repeated at each.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedbrain.config import get
from fedbrain.errors import InputError
from fedbrain.secure import paillier

MODES = ("none", "paillier")
# Message records and config keys.
UPDATE = "update-ciphertexts"
STATISTICS = "statistics-ciphertexts"
PLAINTEXTS = "plaintexts"
KEY = "paillier-key"            # the public key's fingerprint, in every train message
TOTAL = "weight-total"          # D, the sampled hospitals' training images
EXAMPLES = "query.examples"
CALIBRATION_IMAGES = "calibration-images"  # task.CALIBRATION_WEIGHT_KEY: every reply's n_k
DECRYPT = "query.decrypt"
# BatchNormalization means and second moments can be far larger than weight updates.
STATISTICS_INTEGER_BITS = 20


@dataclass(frozen=True)
class EncryptionSettings:
    """`federated.secure_aggregation` and `federated.paillier` of params.yaml."""

    mode: str = "none"
    key_bits: int = 2048
    fraction_bits: int = 16
    integer_bits: int = 2
    max_hospitals: int = 16

    @classmethod
    def from_params(cls, federated: dict) -> EncryptionSettings:
        where = "federated.paillier"
        sec = federated.get("paillier") or {}
        settings = cls(mode=get(federated, "secure_aggregation", str, "federated", choices=MODES, default="none"),
                       key_bits=get(sec, "key_bits", int, where, choices=(2048, 3072), default=2048),
                       fraction_bits=get(sec, "fraction_bits", int, where, default=16),
                       integer_bits=get(sec, "integer_bits", int, where, default=2),
                       max_hospitals=get(sec, "max_hospitals", int, where, default=16))
        if not 8 <= settings.fraction_bits <= 32 or not 0 <= settings.integer_bits <= 16:
            raise InputError(f"params.yaml: '{where}': fraction_bits {settings.fraction_bits} (use 8-32) or "
                             f"integer_bits {settings.integer_bits} (use 0-16) out of range")
        return settings

    @property
    def enabled(self) -> bool:
        return self.mode == "paillier"

    def packings(self) -> tuple[paillier.Packing, paillier.Packing]:
        """(the updates' packing, the statistics' packing)."""
        return (paillier.Packing(self.key_bits, self.fraction_bits, self.integer_bits, self.max_hospitals),
                paillier.Packing(self.key_bits, self.fraction_bits, STATISTICS_INTEGER_BITS, self.max_hospitals))

    def to_dict(self) -> dict:
        return {"mode": self.mode, "key_bits": self.key_bits, "fraction_bits": self.fraction_bits,
                "integer_bits": self.integer_bits, "max_hospitals": self.max_hospitals}


# --- the hospital's side -------------------------------------------------------------------------

class HospitalCipher:
    """A hospital's private key (from its SuperNode's node config) and the run's packings."""

    def __init__(self, private_key_path: str, settings: EncryptionSettings):
        self.private_key = paillier.load_private_key(Path(private_key_path))
        self.public_key = self.private_key.public_key
        self.fingerprint = paillier.fingerprint(self.public_key)
        self.update_packing, self.statistics_packing = settings.packings()

    def check_key(self, config, hospital: int, server_round: int) -> None:
        expected = str(config.get(KEY, ""))
        if expected != self.fingerprint:
            raise paillier.KeyMismatch(
                f"hospital {hospital}, round {server_round}: this hospital's Paillier key {self.fingerprint[:12]} is "
                f"not the federation's {expected[:12]}; give it the federation's key (paillier_private.json)")

    def encrypt(self, values: np.ndarray, fraction: float, packing, what: str, hospital: int,
                server_round: int) -> ArrayRecord:
        try:
            return ArrayRecord([paillier.encrypt_values(self.public_key, np.asarray(values, np.float64) * fraction,
                                                        packing)])
        except paillier.EncodingError as exc:
            raise paillier.EncodingError(f"hospital {hospital}, round {server_round}, {what}: {exc}") from exc

    def encrypt_reply(self, content: RecordDict, config, update: np.ndarray | None, statistics: list,
                      examples: int, hospital: int, server_round: int) -> None:
        """Put this hospital's encrypted update and statistics into its reply, weighted n_k / D."""
        self.check_key(config, hospital, server_round)
        fraction = examples / float(config[TOTAL])
        if update is not None:
            content[UPDATE] = self.encrypt(update, fraction, self.update_packing, "update", hospital, server_round)
        if statistics:
            flat = np.concatenate([np.ravel(s) for s in _moments(statistics)])
            content[STATISTICS] = self.encrypt(flat, fraction, self.statistics_packing, "statistics", hospital,
                                               server_round)

    def decrypt_share(self, msg: Message, hospital: int) -> RecordDict:
        config = msg.content["config"]
        self.check_key(config, hospital, int(config["server-round"]))
        (ciphertexts,) = msg.content[PLAINTEXTS].to_numpy_ndarrays()
        start = time.perf_counter()
        plaintexts = paillier.decrypt_range(self.private_key, ciphertexts, 0, len(ciphertexts))
        width = (self.public_key.n.bit_length() + 7) // 8
        data = np.frombuffer(b"".join(int(p).to_bytes(width, "big") for p in plaintexts), np.uint8)
        return RecordDict({PLAINTEXTS: ArrayRecord([data.reshape(len(plaintexts), width)]),
                           "metrics": MetricRecord({"decryption-time-s": time.perf_counter() - start,
                                                    "ciphertexts": len(plaintexts)})})


def _moments(statistics: list) -> list:
    """[mean, var, ...] -> [mean, var + mean^2, ...]: sums of these pool by the law of total variance."""
    out = []
    for mean, var in zip(statistics[0::2], statistics[1::2]):
        mean = np.asarray(mean, np.float64)
        out += [mean, np.asarray(var, np.float64) + mean ** 2]
    return out


# --- the server's side ---------------------------------------------------------------------------

class EncryptedAggregation:
    """The server's part: counts, the encrypted sum, shared decryption. Holds only the public key.

    `statistics_sizes`: the values per BatchNormalization layer (channels), twice per layer (means,
    second moments), in the order hospitals send them; [] for a model without BatchNormalization."""

    def __init__(self, public_key_path: str, settings: EncryptionSettings, statistics_sizes: list[int],
                 unweighted: bool = False):
        # unweighted: client-level DP, where the mean counts every hospital once (each sends 1 / m of
        # its clipped, noised update; privacy/client_level.py) and no count exchange is needed.
        self.unweighted = unweighted
        self.noise_share = 1.0  # client level: sqrt(replied / sampled) of the last aggregation
        self.public_key = paillier.load_public_key(public_key_path)  # a path, or the key's JSON text
        self.fingerprint = paillier.fingerprint(self.public_key)
        self.packings = dict(zip((UPDATE, STATISTICS), settings.packings()))
        self.statistics_sizes = statistics_sizes
        self.examples: dict[int, int] = {}   # node id -> training images (plaintext, as in FedAvg)
        self.hospitals: dict[int, int] = {}  # node id -> hospital number, from the same replies
        self.total = 0
        self.seconds: dict[str, float] = {}  # the last aggregation's add and decryption seconds

    def prepare(self, exchange, messages: list[Message]) -> list[Message]:
        """Ask newly sampled hospitals for their counts (one `query.examples` exchange); give each
        message D and the key's fingerprint. Returns the messages to send (those whose count is known)."""
        if self.unweighted:
            self.examples.update({m.metadata.dst_node_id: 1 for m in messages})
        unknown = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.examples]
        if unknown:
            queries = [Message(RecordDict({"config": ConfigRecord({})}), message_type=EXAMPLES, dst_node_id=node)
                       for node in unknown]
            replies, _ = exchange(queries, "examples")
            for reply in replies:
                if not reply.has_error():
                    metrics = reply.content["metrics"]
                    self.examples[reply.metadata.src_node_id] = int(metrics["num-examples"])
                    self.hospitals[reply.metadata.src_node_id] = int(metrics["hospital"])
        sent = [m for m in messages if m.metadata.dst_node_id in self.examples]
        self.total = sum(self.examples[m.metadata.dst_node_id] for m in sent)
        for m in sent:  # the messages may share one content
            m.content["config"][KEY] = self.fingerprint
            m.content["config"][TOTAL] = self.total
        return sent

    def aggregate(self, exchange, replies: list[tuple[int, Message]], server_round: int, update_size: int,
                  failures: list[dict], phase: str = "train") -> tuple[np.ndarray | None, list | None]:
        """(the examples-weighted mean update, the pooled statistics) from the hospitals' encrypted
        replies [(node, reply)], each None when no reply carried it. A reply that is malformed or
        reports another count than it was weighted with is recorded in `failures` and left out."""
        start = time.perf_counter()
        parts: dict[str, list[tuple[int, np.ndarray]]] = {UPDATE: [], STATISTICS: []}
        for node, reply in replies:
            found = {}
            try:
                for key in parts:
                    if key in reply.content.array_records:
                        (found[key],) = reply.content[key].to_numpy_ndarrays()
                        paillier.from_array(found[key], self.public_key)  # shape, width, range
            except paillier.CiphertextError as exc:
                failures.append({"node_id": node, "phase": phase, "reason": f"malformed ciphertexts: {exc}"})
                continue
            reported = 1 if self.unweighted else int(reply.content["metrics"].get(CALIBRATION_IMAGES, -1))
            if reported != self.examples.get(node):
                failures.append({"node_id": node, "phase": phase, "reason": f"reports {reported} training "
                                 f"images, its update was weighted for {self.examples.get(node)}"})
                continue
            for key, array in found.items():
                parts[key].append((node, array))
        sums = {key: paillier.add_encrypted([a for _, a in got], self.public_key) for key, got in parts.items() if got}
        self.noise_share = math.sqrt(len(parts[UPDATE]) / self.total) if self.total else 0.0
        self.seconds = {"add_s": time.perf_counter() - start}
        if not sums:
            return None, None
        helpers = sorted({node for got in parts.values() for node, _ in got})
        plaintexts = self.decrypt(exchange, helpers, np.concatenate(list(sums.values())), server_round)
        sizes = {UPDATE: update_size, STATISTICS: sum(self.statistics_sizes)}
        results, offset = {}, 0
        for key, summed in sums.items():
            chunk, offset = plaintexts[offset:offset + len(summed)], offset + len(summed)
            added = [node for node, _ in parts[key]]
            # Each hospital sent its values times n_k / D: D / sum(n_k) turns the sum into the mean.
            scale = self.total / sum(self.examples[node] for node in added)
            try:
                results[key] = paillier.unpack(chunk, self.packings[key], sizes[key], len(added)) * scale
            except paillier.CiphertextError as exc:
                # The sum cannot say which hospital's ciphertexts were altered (the server sees no
                # single update): every hospital in it is named, and nothing of it is used.
                for node in added:
                    failures.append({"node_id": node, "phase": phase, "reason": (
                        f"round {server_round}: the encrypted sum of {key} failed its integrity check ({exc}); "
                        f"one of the hospitals (node ids {added}) sent altered ciphertexts; the round's "
                        f"{key} is discarded")[:400]})
                return None, None
        pooled = None
        if STATISTICS in results:
            pooled = []
            moments = np.split(results[STATISTICS], np.cumsum(self.statistics_sizes)[:-1])
            for mean, second in zip(moments[0::2], moments[1::2]):
                pooled += [mean.astype(np.float32), np.maximum(second - mean ** 2, 0.0).astype(np.float32)]
        return results.get(UPDATE), pooled

    def decrypt(self, exchange, online: list[int], ciphertexts: np.ndarray, server_round: int) -> list[int]:
        """Shared decryption: each online hospital decrypts one range; a range whose hospital failed
        goes to the next one that answered, until none is left or no hospital answers."""
        start = time.perf_counter()
        pending = list(paillier.share_ranges(len(ciphertexts), max(1, len(online))))
        plaintexts: dict[tuple[int, int], list[int]] = {}
        nodes = list(online)
        while pending and nodes:
            assigned = dict(zip(nodes, pending))  # node -> the range it decrypts in this pass
            messages = [Message(RecordDict({"config": ConfigRecord({KEY: self.fingerprint, "server-round": server_round}),
                                            PLAINTEXTS: ArrayRecord([ciphertexts[lo:hi]])}),
                                message_type=DECRYPT, dst_node_id=node) for node, (lo, hi) in assigned.items()]
            replies, _ = exchange(messages, "decrypt")
            answered = []
            for reply in replies:
                share = assigned.get(reply.metadata.src_node_id)
                if reply.has_error() or share is None:
                    continue
                (data,) = reply.content[PLAINTEXTS].to_numpy_ndarrays()
                if len(data) != share[1] - share[0]:
                    continue
                plaintexts[share] = [int.from_bytes(row.tobytes(), "big") for row in data]
                answered.append(reply.metadata.src_node_id)
            pending = [r for r in pending if r not in plaintexts]
            nodes = answered
        if pending:
            raise RuntimeError(f"round {server_round}: no hospital decrypted ciphertexts {pending}: the encrypted "
                               f"sum cannot be opened; stopping the run")
        self.seconds["decryption_s"] = time.perf_counter() - start
        log(INFO, "round %d: %d ciphertexts decrypted by %d hospital(s) in %.1f s", server_round, len(ciphertexts),
            len(online), self.seconds["decryption_s"])
        return [p for key in sorted(plaintexts) for p in plaintexts[key]]
