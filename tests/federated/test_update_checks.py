"""The checks on the hospitals' updates before averaging (federated/update_checks.py), without a SuperLink."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedbrain.errors import InputError
from fedbrain.federated.settings import FederatedSettings, update_rules
from fedbrain.federated.strategy import HospitalFedAvg
from fedbrain.federated.update_checks import (Rejection, UpdateRules, check_ciphertexts, check_update, check_values,
                                              layout, norm_outliers)
from fedbrain.secure.audit import AuditLog, verify

from federated_data import federated_params

GLOBAL = [np.zeros(6, np.float32)]
EXPECTED = layout(GLOBAL)


def _update(*values) -> list[np.ndarray]:
    return [np.array(values, np.float32)]


# --- one update ----------------------------------------------------------------------------------

def test_a_sound_update_passes():
    assert check_update(_update(1, 2, 3, 4, 5, 6), EXPECTED, 12) is None
    assert check_update(_update(1, 2, 3, 4, 5, 6), EXPECTED, 12, max_examples=12) is None


@pytest.mark.parametrize("arrays, examples, max_examples, reason", [
    (_update(1, np.nan, 3, 4, 5, 6), 12, None, "1 NaN or infinite value(s) of 6"),
    (_update(1, np.inf, -np.inf, 4, 5, 6), 12, None, "2 NaN or infinite value(s) of 6"),
    (_update(1, 2, 3, 4, 5, 6) * 2, 12, None, "update has 2 array(s); the global model has 1"),
    ([], 12, None, "update has 0 array(s)"),
    (_update(1, 2, 3, 4, 5), 12, None, "shape (5,); the global model's is (6,)"),
    ([np.zeros((2, 3), np.float32)], 12, None, "shape (2, 3)"),
    ([np.zeros(6, np.float64)], 12, None, "update array 0 is float64; the global model's is float32"),
    (_update(1, 2, 3, 4, 5, 6), 0, None, "num-examples is 0"),
    (_update(1, 2, 3, 4, 5, 6), -5, None, "num-examples is -5"),
    (_update(1, 2, 3, 4, 5, 6), 2.5, None, "not a whole number"),
    (_update(1, 2, 3, 4, 5, 6), float("nan"), None, "not a whole number"),
    (_update(1, 2, 3, 4, 5, 6), 10 ** 9, 500, "more than the plausible maximum 500"),
])
def test_each_reason_to_reject_an_update(arrays, examples, max_examples, reason):
    found = check_update(arrays, EXPECTED, examples, max_examples)
    assert found is not None and reason in found, found


def test_hospitals_check_their_values_and_statistics_alike():
    assert check_values([np.ones(3), np.zeros((2, 2))]) is None
    assert check_values([np.ones(3), np.array([[np.nan, 1.0]])], "statistics") == \
        "statistics has 1 NaN or infinite value(s) of 5"


def test_ciphertexts_checked_by_count_and_examples():
    assert check_ciphertexts(4, 4, 12, 12) is None
    assert "3 ciphertext(s); the global model's size takes 4" in check_ciphertexts(3, 4, 12, 12)
    assert "more than the plausible maximum 12" in check_ciphertexts(4, 4, 13, 12)
    assert "num-examples is 0" in check_ciphertexts(4, 4, 0, 12)


# --- the norm rule -------------------------------------------------------------------------------

def test_an_update_100_times_farther_than_the_others_is_rejected_the_rest_kept():
    rng = np.random.default_rng(0)
    updates = {k: [rng.normal(0, 0.01, 6).astype(np.float32)] for k in range(4)}
    updates[3] = [updates[3][0] * 100]
    found = norm_outliers(updates, GLOBAL, factor=10)
    assert list(found) == [3]
    assert "update_norm_factor=10 x the round's median distance" in found[3]


def test_distances_within_the_factor_are_kept():
    updates = {0: _update(1, 0, 0, 0, 0, 0), 1: _update(0, 2, 0, 0, 0, 0), 2: _update(0, 0, 9, 0, 0, 0)}
    assert norm_outliers(updates, GLOBAL, factor=10) == {}   # 9 <= 10 x median 2
    assert list(norm_outliers(updates, GLOBAL, factor=4)) == [2]  # 9 > 4 x 2


def test_fewer_than_three_updates_skip_the_median_rule():
    updates = {0: _update(0.01, 0, 0, 0, 0, 0), 1: _update(1000, 0, 0, 0, 0, 0)}
    assert norm_outliers(updates, GLOBAL, factor=10) == {}
    assert norm_outliers({0: _update(1e6, 0, 0, 0, 0, 0)}, GLOBAL, factor=10) == {}


def test_a_round_where_most_hospitals_did_not_move_skips_the_rule():
    updates = {0: _update(0, 0, 0, 0, 0, 0), 1: _update(0, 0, 0, 0, 0, 0), 2: _update(1, 0, 0, 0, 0, 0)}
    assert norm_outliers(updates, GLOBAL, factor=10) == {}


def test_the_distance_is_to_the_previous_global_model():
    previous = [np.full(6, 50.0, np.float32)]
    updates = {k: [previous[0] + np.float32(0.1 * (k + 1))] for k in range(3)}
    assert norm_outliers(updates, previous, factor=10) == {}


# --- settings ------------------------------------------------------------------------------------

def test_update_rules_default_and_from_params(tmp_path):
    assert update_rules({}) == UpdateRules(min_valid_updates=1, norm_factor=10.0, max_examples=None)
    params = federated_params(tmp_path, min_valid_updates=2, update_norm_factor=5, max_update_examples=400)
    assert FederatedSettings.from_params(params).updates == UpdateRules(2, 5.0, 400)
    assert UpdateRules(2, 5.0, 400).as_params() == {"min_valid_updates": 2, "update_norm_factor": 5.0,
                                                    "max_update_examples": 400}


@pytest.mark.parametrize("key, wrong", [("min_valid_updates", 0), ("min_valid_updates", -1),
                                        ("min_valid_updates", 1.5), ("min_valid_updates", "two"),
                                        ("update_norm_factor", 0), ("update_norm_factor", -3),
                                        ("update_norm_factor", 1), ("update_norm_factor", "ten"),
                                        ("update_norm_factor", float("nan")), ("update_norm_factor", True),
                                        ("max_update_examples", 0), ("max_update_examples", 2.5),
                                        ("max_update_examples", "all")])
def test_wrong_update_rules_name_their_key(tmp_path, key, wrong):
    params = federated_params(tmp_path, **{key: wrong})
    with pytest.raises(InputError, match=f"federated.{key}"):
        FederatedSettings.from_params(params)


# --- the strategy: rejected updates are left out of the average ---------------------------------

def _train_reply(node: int, hospital: int, weights, examples: int = 10, **metrics) -> Message:
    content = RecordDict({"arrays": ArrayRecord([np.asarray(weights, np.float32)]),
                          "metrics": MetricRecord({"num-examples": examples, "hospital": hospital,
                                                   "train_loss": 1.0, **metrics})})
    return Message(content, reply_to=Message(content, dst_node_id=node, message_type="train"))


def _strategy(**rules) -> tuple[HospitalFedAvg, list[Rejection]]:
    strategy = HospitalFedAvg(rules=UpdateRules(**rules), min_train_nodes=1, min_available_nodes=1)
    strategy.global_arrays, strategy.global_layout = GLOBAL, EXPECTED
    seen: list[Rejection] = []
    strategy.on_rejection = seen.append
    return strategy, seen


def test_the_round_averages_the_valid_updates_and_names_the_rejected_hospitals():
    strategy, seen = _strategy()
    replies = [_train_reply(11, 0, np.full(6, 0.1)), _train_reply(12, 1, np.full(6, 0.2)),
               _train_reply(13, 2, np.full(6, 0.3)),
               _train_reply(14, 3, np.full(6, np.nan), train_loss=float("nan")),  # NaN
               _train_reply(15, 4, np.full(6, 30.0)),                              # 100x the others' distance
               _train_reply(16, 5, np.full(6, 0.2), examples=-4)]                  # a negative count
    arrays, metrics = strategy.aggregate_train(1, replies)
    (average,) = arrays.to_numpy_ndarrays()
    assert average == pytest.approx(np.full(6, 0.2))
    assert metrics["train_loss"] == pytest.approx(1.0)  # hospital 3's NaN loss is not averaged
    assert strategy.phase.averaged == 3
    assert [(r.hospital, r.node_id, r.round) for r in seen] == [(3, 14, 1), (5, 16, 1), (4, 15, 1)]
    assert "NaN" in seen[0].reason and "num-examples is -4" in seen[1].reason and "median" in seen[2].reason
    assert strategy.phase.rejections == seen


def test_too_few_valid_updates_average_nothing():
    strategy, seen = _strategy(min_valid_updates=2)
    replies = [_train_reply(11, 0, np.full(6, 0.1)), _train_reply(12, 1, np.full(6, np.inf))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and strategy.phase.averaged == 1 and [r.hospital for r in seen] == [1]


def test_nan_statistics_are_left_out_of_the_pooling():
    strategy, seen = _strategy()
    good, bad = (_train_reply(11 + k, k, np.full(6, 0.1), **{"calibration-images": 4}) for k in range(2))
    good.content["statistics"] = ArrayRecord([np.ones(2, np.float32), np.ones(2, np.float32)])
    bad.content["statistics"] = ArrayRecord([np.array([np.nan, 1], np.float32), np.ones(2, np.float32)])
    strategy.aggregate_train(1, [good, bad])
    assert list(strategy.phase.statistics) == [11]
    assert [(r.hospital, r.what) for r in seen] == [(1, "statistics")]
    assert strategy.phase.averaged == 2  # its update itself is sound


def test_a_rejection_is_an_audit_line_without_values(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    rejection = Rejection(2, 3, "update has 5 NaN or infinite value(s) of 6" + "x" * 300, node_id=99)
    log.append(rejection.audit_entry("fedavg"))
    assert verify(log.path).ok
    (line,) = log.path.read_text().splitlines()
    entry = json.loads(line)
    assert entry["status"] == "rejected" and entry["hospital"] == 2 and entry["round"] == 3
    assert entry["reason"].startswith("update: update has 5 NaN") and len(entry["reason"]) == 200


# --- Paillier: what the server can still check ---------------------------------------------------

def test_encrypted_updates_are_checked_by_ciphertext_count_and_announced_examples():
    from fedbrain.federated.encrypted import STATISTICS, UPDATE
    from fedbrain.federated.validation import check_encrypted_updates

    class Packing:
        def ciphertexts(self, count):
            return 4

    encrypted = SimpleNamespace(packings={UPDATE: Packing()}, unweighted=False, examples={11: 10, 12: 10, 13: 10})
    strategy, seen = _strategy()

    def reply(node, rows, examples):
        content = RecordDict({UPDATE: ArrayRecord([np.ones((rows, 8), np.uint8)]),
                              STATISTICS: ArrayRecord([np.ones((1, 8), np.uint8)]),
                              "metrics": MetricRecord({"num-examples": examples, "hospital": node - 11})})
        return node, Message(content, reply_to=Message(content, dst_node_id=node, message_type="train"))

    received = [reply(11, 4, 10), reply(12, 3, 10), reply(13, 4, 11)]
    strategy.collect("train", [m for _, m in received], 1)
    check_encrypted_updates(strategy, encrypted, received, 1, 100)
    assert [UPDATE in m.content.array_records for _, m in received] == [True, False, False]
    assert all(STATISTICS in m.content.array_records for _, m in received)  # their statistics still pool
    assert [(r.hospital, r.reason) for r in seen] == [
        (1, "update has 3 ciphertext(s); the global model's size takes 4"),
        (2, "num-examples is 11, more than the plausible maximum 10")]

    # Fewer valid updates than min_valid_updates: none is added (no sum of too few is decrypted).
    strategy, _ = _strategy(min_valid_updates=2)
    received = [reply(11, 4, 10), reply(12, 3, 10)]
    strategy.collect("train", [m for _, m in received], 1)
    check_encrypted_updates(strategy, encrypted, received, 1, 100)
    assert not any(UPDATE in m.content.array_records for _, m in received)
