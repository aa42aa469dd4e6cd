"""Paillier encrypted aggregation in a real federation on loopback (TLS, SuperNode authentication).

What the server received is read from the run's audit log, which names every array of every reply
(name, dtype, shape; never values): in an encrypted run, the hospitals' weights and BatchNorm
statistics arrive as ciphertexts only, and the private key is given to no server-side process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from mlflow.tracking import MlflowClient

from fedbrain import tracking
from fedbrain.federated import encrypted, launcher
from fedbrain.federated.certificates import ensure_pki
from fedbrain.federated.launcher import Federation
from fedbrain.secure import paillier

from federated_data import federated_params, isolate, make_federated_data
from test_federation import federation_processes, trained



@pytest.fixture(autouse=True)
def _tiny_model_and_own_mlflow(monkeypatch):
    isolate(monkeypatch)


def paillier_params(tmp_path: Path, rounds: int, model: str = "tiny_model:build") -> dict:
    params = federated_params(tmp_path, rounds=rounds, secure_aggregation="paillier")
    params["train"]["classifier"]["model"] = model
    return params


def audit_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit" / "classifier.jsonl").read_text().splitlines()]


def test_server_receives_only_ciphertexts_and_never_the_private_key(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=3)
    params = paillier_params(tmp_path, rounds=2)  # tiny_model:build has BatchNorm: statistics travel too
    out = tmp_path / "models" / "federated" / "paillier"
    during = []

    def echo(line: str) -> None:
        if "round 1 done" in line and not during:
            for proc in federation_processes(tmp_path):
                try:
                    during.append((" ".join(proc.cmdline()), proc.environ()))
                except Exception:
                    pass

    launcher.run(params, processed, partition, out, echo=echo)

    keys = tmp_path / ".fedbrain" / "pki" / "paillier"
    private_key = keys / "paillier_private.json"
    assert oct(private_key.stat().st_mode & 0o777) == "0o600"
    # Only the hospitals' SuperNodes are told where the private key is; no server-side process is.
    holders = [cmd for cmd, env in during if str(private_key) in cmd or any(str(private_key) in v for v in env.values())]
    assert len(holders) == 3 and all("fedbrain.federated.supernode" in cmd for cmd in holders), holders
    assert any("flwr-serverapp" in cmd for cmd, _ in during) and any("flower-superlink" in cmd for cmd, _ in during)
    run_config = (tmp_path / ".fedbrain" / "federation" / "paillier" / "run_config.toml").read_text()
    assert "paillier_public.json" in run_config and "paillier_private" not in run_config

    lines = audit_lines(out)
    from_hospitals = [e for e in lines if e["phase"] in ("train", "calibrate")]
    assert {(e["round"], e["phase"]) for e in from_hospitals} == {(1, "train"), (2, "train"), (2, "calibrate")}
    for entry in from_hospitals:
        assert entry["status"] == "received", entry
        names = [part.split(":")[0] for part in entry["arrays"].split()]
        # Weights and statistics arrive as ciphertexts (2048-bit key: 512 bytes each), nothing else.
        assert names and all(name.endswith("-ciphertexts/0") for name in names), entry
        assert all(part.endswith("x512]") and ":uint8[" in part for part in entry["arrays"].split()), entry
    assert {e["phase"] for e in lines} >= {"examples", "decrypt"}
    # The run's record and MLflow: the aggregation mode, the decryption time, bytes per round.
    card = json.loads((out / "classifier.json").read_text())
    assert card["aggregation"] == "paillier" and card["failures"] == []
    assert all(trained(r) == {"0", "1", "2"} and r["decryption_phase_s"] > 0 for r in card["round_records"])
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    assert run.data.tags["aggregation"] == "paillier"
    assert int(run.data.tags["audit_entries"]) == len(lines)
    # The audit log verifies, and is the run's artifact.
    check = subprocess.run([sys.executable, "-m", "fedbrain.cli", "audit", "verify", str(out / "audit" / "classifier.jsonl")],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "intact" in check.stdout, check.stdout + check.stderr
    assert [a.path for a in client.list_artifacts(run.info.run_id, "audit")] == ["audit/classifier.jsonl"]
    # The decrypted average made a usable model: BatchNorm statistics pooled, predictions finite.
    model = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    probabilities = model.predict(np.load(processed / "images.npy")[:4], verbose=0)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_hospital_with_another_key_is_refused_and_the_round_goes_on(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=3)
    params = paillier_params(tmp_path, rounds=1, model="tiny_model:build_plain")
    params["federated"]["min_available_nodes"] = 3  # the round waits for the hospital with the other key
    params = tracking.absolute_params(params)
    out = tmp_path / "models" / "federated" / "paillier"
    public, private = paillier.ensure_keys(tmp_path / "keys", 2048)
    _, other = paillier.ensure_keys(tmp_path / "other_keys", 2048)
    settings, _, _ = launcher.prepare(params, processed, partition, out, resume=False)
    config = launcher.run_config(settings, params, "classifier", processed, partition, out, resume=False, secure=True,
                                 paillier_public_key=public)
    with Federation(tmp_path / "run", ensure_pki(tmp_path / "pki"), paillier_private_key=private) as federation:
        federation.start_superlink()
        federation.register("hospital_2")
        federation.start_supernodes([0, 1])
        federation.start_supernode(2, register=False, paillier_key=other)
        status = federation.submit(config).wait()
    assert status == "finished:completed"
    card = json.loads((out / "classifier.json").read_text())
    (record,) = card["round_records"]
    assert trained(record) == {"0", "1"}
    # Refused in the round's train message and in the last model's calibration message, by name.
    assert [(f["hospital"], f["phase"]) for f in card["failures"]] == [(2, "train"), (2, "calibrate")]
    assert all("hospital 2, round 1: this hospital's Paillier key" in f["reason"] and
               "is not the federation's" in f["reason"] for f in card["failures"]), card["failures"]


def _reply(node: int, content: RecordDict) -> Message:
    msg = Message(content, dst_node_id=node, message_type="train")
    return Message(content, reply_to=msg)


def test_malformed_or_altered_ciphertexts_end_the_round_with_the_hospitals_named(tmp_path):
    """The server's aggregation with the hospitals' real encryption and decryption (in-process)."""
    public_path, private_path = paillier.ensure_keys(tmp_path / "keys", 2048)
    settings = encrypted.EncryptionSettings(mode="paillier")
    cipher = encrypted.HospitalCipher(str(private_path), settings)
    aggregation = encrypted.EncryptedAggregation(str(public_path), settings, statistics_sizes=[])
    # The kubernetes launcher hands the ServerApp the key file's text instead of its path: same key.
    from_text = encrypted.EncryptedAggregation(public_path.read_text(), settings, statistics_sizes=[])
    assert from_text.fingerprint == aggregation.fingerprint and from_text.public_key == aggregation.public_key
    aggregation.examples, aggregation.total = {1: 30, 2: 10}, 40
    config = ConfigRecord({encrypted.KEY: aggregation.fingerprint, encrypted.TOTAL: 40, "server-round": 1})
    rng = np.random.default_rng(0)
    updates = {1: rng.normal(0, 0.01, 500), 2: rng.normal(0, 0.01, 500)}

    def replies(alter=None):
        out = []
        for node, update in updates.items():
            content = RecordDict({"metrics": MetricRecord({"num-examples": aggregation.examples[node],
                                                           "calibration-images": aggregation.examples[node]})})
            cipher.encrypt_reply(content, config, update, [], aggregation.examples[node], node, 1)
            if alter and node == alter[0]:
                (array,) = content[encrypted.UPDATE].to_numpy_ndarrays()
                content[encrypted.UPDATE] = ArrayRecord([alter[1](array.copy())])
            out.append((node, _reply(node, content)))
        return out

    def exchange(messages, phase):  # each hospital decrypts its share, as in a federation
        out = []
        for m in messages:
            reply = Message(cipher.decrypt_share(m, m.metadata.dst_node_id), reply_to=m)
            out.append(reply)
        return out, []

    failures = []
    mean, _ = aggregation.aggregate(exchange, replies(), 1, 500, failures)
    exact = (30 * updates[1] + 10 * updates[2]) / 40
    assert failures == [] and np.max(np.abs(mean - exact)) <= settings.packings()[0].error_bound(2)

    def truncate(array):
        return array[:, :-3]

    mean, _ = aggregation.aggregate(exchange, replies(alter=(2, truncate)), 1, 500, failures)
    assert [f["node_id"] for f in failures] == [2] and "malformed ciphertexts" in failures[0]["reason"]
    # Hospital 1 alone: its values were sent times 30 / 40, so the rounding error grows by 40 / 30.
    assert mean is not None and np.max(np.abs(mean - updates[1])) <= settings.packings()[0].error_bound(1) * 40 / 30

    def flip_a_byte(array):
        array[0, 100] ^= 0x40
        return array

    failures = []
    mean, _ = aggregation.aggregate(exchange, replies(alter=(1, flip_a_byte)), 1, 500, failures)
    assert mean is None
    assert sorted(f["node_id"] for f in failures) == [1, 2]
    assert all("integrity check" in f["reason"] for f in failures)


def test_dp_sgd_and_paillier_together_and_a_budget_stop_keeps_a_usable_model(tmp_path):
    """The secure setting: every hospital trains with DP-SGD and sends ciphertexts only; the epsilon
    is the accountant's for the rounds actually run, and the budget ends the run early with a
    decrypted, usable model and an intact audit log."""
    import dp_accounting
    from dp_accounting import rdp

    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = paillier_params(tmp_path, rounds=3, model="tiny_model:build_group")
    params["train"]["classifier"].update(normalization="group", class_weight=False)
    steps, q = 2, 8 / 12  # per round: ceil(12 images / batch 8), sampling rate 8 / 12

    def epsilon(rounds: int) -> float:
        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(2.0)), rounds * steps))
        return acc.get_epsilon(1e-5)

    params["privacy"] = {"mode": "example", "noise_multiplier": 2.0, "delta": 1e-5,
                         "epsilon_budget": (epsilon(2) + epsilon(3)) / 2}
    out = tmp_path / "models" / "federated" / "secure"
    launcher.run(params, processed, partition, out, echo=lambda line: None)

    card = json.loads((out / "classifier.json").read_text())
    assert card["aggregation"] == "paillier" and card["privacy"] == "example"
    assert [r["round"] for r in card["round_records"]] == [1, 2] and "round 3" in card["stopped_by_budget"]
    for record, expected in zip(card["round_records"], (epsilon(1), epsilon(2))):
        assert all(h["epsilon"] == pytest.approx(expected, rel=1e-6) for h in record["hospitals"].values())
    assert card["epsilon"] == pytest.approx(epsilon(2), rel=1e-6)
    for entry in audit_lines(out):
        if entry["phase"] == "train":
            assert entry["arrays"].startswith("update-ciphertexts/0:uint8[") and " " not in entry["arrays"], entry
    check = subprocess.run([sys.executable, "-m", "fedbrain.cli", "audit", "verify", str(out / "audit" / "classifier.jsonl")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    model = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    probabilities = model.predict(np.load(processed / "images.npy")[:4], verbose=0)
    assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_client_level_dp_under_paillier_adds_the_noise_at_the_hospitals(tmp_path):
    """The server cannot add noise to a mean it must not see: each hospital clips its update and adds
    its share; the epsilon composes the rounds with the multiplier the shares reached."""
    import dp_accounting
    from dp_accounting import rdp

    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = paillier_params(tmp_path, rounds=2, model="tiny_model:build_group")
    params["train"]["classifier"].update(normalization="group", class_weight=False)
    params["privacy"] = {"mode": "client", "noise_multiplier": 0.8, "l2_norm_clip": 0.5, "delta": 1e-5}
    out = tmp_path / "models" / "federated" / "client_paillier"
    launcher.run(params, processed, partition, out, echo=lambda line: None)

    card = json.loads((out / "classifier.json").read_text())
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.8), 2))  # both replied
    assert card["privacy"] == "client" and card["aggregation"] == "paillier"
    assert card["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert all(trained(r) == {"0", "1"} for r in card["round_records"])
    trains = [e for e in audit_lines(out) if e["phase"] == "train"]
    assert len(trains) == 4 and all(e["arrays"].startswith("update-ciphertexts/0:uint8[") for e in trains)
    # Unweighted mean: no count exchange; Flower's server-side noise is not used.
    assert not any(e["phase"] == "examples" for e in audit_lines(out))
    serverapp_log = next((tmp_path / ".fedbrain" / "federation" / "client_paillier" / "logs").glob("serverapp_*.log"))
    assert "central DP noise" not in serverapp_log.read_text()


def test_under_paillier_a_hospital_with_a_nan_update_sends_no_ciphertext_and_the_round_goes_on(tmp_path):
    """The server cannot check values it only sees encrypted, so each hospital checks its own update
    before encrypting it (update_checks.check_values): hospital 2, whose training images are NaN,
    sends an error reply naming the reason instead of ciphertexts; the round adds the other two, and
    the audit log shows no payload from hospital 2 in that phase."""
    import pandas as pd

    processed, partition = make_federated_data(tmp_path / "data", hospitals=3)
    images = np.load(processed / "images.npy")
    rows = pd.read_parquet(partition / "hospital_2" / "index.parquet").query("split == 'train'")["row"]
    images[rows.to_numpy()] = np.nan
    np.save(processed / "images.npy", images)
    params = paillier_params(tmp_path, rounds=1, model="tiny_model:build_plain")
    params["federated"]["min_available_nodes"] = 3
    out = tmp_path / "models" / "federated" / "paillier"

    launcher.run(params, processed, partition, out, echo=lambda line: None)

    card = json.loads((out / "classifier.json").read_text())
    (record,) = card["round_records"]
    assert trained(record) == {"0", "1"}
    (failure,) = card["failures"]
    assert (failure["hospital"], failure["phase"]) == (2, "train")
    assert "hospital 2, round 1: update has" in failure["reason"] and "NaN or infinite" in failure["reason"]
    assert "not encrypted or sent" in failure["reason"]
    hospital_2 = [e for e in audit_lines(out) if e["hospital"] == 2 and e["phase"] == "train"]
    assert [e["status"] for e in hospital_2] == ["failed"] and "payload_sha256" not in hospital_2[0]
    model = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    assert all(np.isfinite(w).all() for w in model.get_weights())
