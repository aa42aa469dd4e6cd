"""The federation's parts that need no running SuperLink: keys and certificates, averaging."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import MetricRecord, RecordDict

from fedbrain.config import load_params, with_variant
from fedbrain.errors import InputError
from fedbrain.federated.certificates import ensure_pki, ensure_supernode_key
from fedbrain.tracking import absolute_uri
from fedbrain.federated.settings import FederatedSettings
from fedbrain.federated.strategy import average_metrics
from fedbrain.privacy.settings import PrivacySettings

from federated_data import federated_params, make_federated_data


def test_pki_is_made_once_valid_for_loopback_and_private(tmp_path):
    pki = ensure_pki(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    for key in (pki.ca_key, pki.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.root.stat().st_mode) == 0o700

    # Reused as long as it fits; a new host name renews the SuperLink certificate, not the CA.
    before = {p: p.read_bytes() for p in (pki.ca_cert, pki.server_cert)}
    ensure_pki(tmp_path / "pki")
    assert all(p.read_bytes() == data for p, data in before.items())
    ensure_pki(tmp_path / "pki", hosts=("superlink.fedbrain.svc",))
    assert pki.ca_cert.read_bytes() == before[pki.ca_cert]
    assert pki.server_cert.read_bytes() != before[pki.server_cert]


def test_supernode_keys_are_p384_openssh_and_stable(tmp_path):
    pki = ensure_pki(tmp_path / "pki")
    private, public = ensure_supernode_key(pki, "hospital_0")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert serialization.load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert ensure_supernode_key(pki, "hospital_0") == (private, public)
    assert public.read_bytes() == ensure_supernode_key(pki, "hospital_0")[1].read_bytes()
    assert ensure_supernode_key(pki, "hospital_1")[1].read_bytes() != public.read_bytes()


def _reply(**metrics) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_average_weights_training_by_examples_and_validation_by_validation_examples():
    replies = [_reply(**{"num-examples": 300, "val-examples": 10, "hospital": 0, "train-time-s": 9.0,
                         "train_loss": 1.0, "val_accuracy": 0.5}),
               _reply(**{"num-examples": 100, "val-examples": 30, "hospital": 1, "train-time-s": 3.0,
                         "train_loss": 2.0, "val_accuracy": 0.9})]
    averaged = average_metrics(replies, "num-examples")
    assert averaged["train_loss"] == pytest.approx((300 * 1.0 + 100 * 2.0) / 400)
    assert averaged["val_accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert set(averaged) == {"train_loss", "val_accuracy"}  # hospital numbers and times are not averaged


def test_a_hospital_without_validation_data_is_left_out_of_validation_averages():
    replies = [_reply(**{"num-examples": 50, "val-examples": 0, "train_loss": 1.0}),
               _reply(**{"num-examples": 50, "val-examples": 20, "train_loss": 3.0, "val_loss": 0.7})]
    averaged = average_metrics(replies, "num-examples")
    assert averaged["train_loss"] == pytest.approx(2.0) and averaged["val_loss"] == pytest.approx(0.7)


def test_settings_from_the_project_params_and_readable_errors(tmp_path):
    settings = FederatedSettings.from_params(load_params(Path(__file__).resolve().parents[2] / "params.yaml"))
    assert settings.rounds >= 1 and settings.local_epochs >= 1 and settings.roles == ("auto",)
    params = federated_params(tmp_path)
    params["federated"]["rounds"] = 0
    with pytest.raises(InputError, match="federated.rounds"):
        FederatedSettings.from_params(params)
    params = federated_params(tmp_path)
    params["federated"]["roles"] = ["classifier", "detector"]
    with pytest.raises(InputError, match="federated.roles"):
        FederatedSettings.from_params(params)


@pytest.mark.parametrize("value, expected", [(128, {"classifier": 128, "segmenter": 128}),
                                             ({"segmenter": 64}, {"classifier": 128, "segmenter": 64})])
def test_calibration_images_are_set_per_role(tmp_path, value, expected):
    params = federated_params(tmp_path)
    params["federated"]["calibration_images"] = value
    assert FederatedSettings.from_params(params).calibration_images == expected
    for wrong, message in (({"detector": 5}, "has 'detector'"), ({"segmenter": -1}, "segmenter' is -1")):
        params["federated"]["calibration_images"] = wrong
        with pytest.raises(InputError, match=message):
            FederatedSettings.from_params(params)


def test_federated_train_keys_apply_to_every_role_and_a_role_block_to_its_role_only(tmp_path):
    params = federated_params(tmp_path)
    params["train"]["segmenter"] = {"learning_rate": 0.002, "batch_size": 16, "augment": {"hflip": True}}
    params["federated"]["train"] = {"warmup_epochs": 0, "augment": {"vflip": True},
                                    "classifier": {"learning_rate": 0.001}}
    settings = FederatedSettings.from_params(params)
    classifier = settings.hospital_training(params, "classifier")
    segmenter = settings.hospital_training(params, "segmenter")
    assert classifier["learning_rate"] == 0.001 and classifier["warmup_epochs"] == 0
    assert segmenter["learning_rate"] == 0.002 and segmenter["warmup_epochs"] == 0
    assert segmenter["augment"] == {"hflip": True, "vflip": True}  # laid over, key by key
    assert "classifier" not in segmenter and "classifier" not in classifier
    assert params["train"]["segmenter"]["augment"] == {"hflip": True}  # the params are left alone
    params["federated"]["train"] = {"segmenter": 0.001}
    with pytest.raises(InputError, match="federated.train.segmenter"):
        FederatedSettings.from_params(params)


def test_the_project_variants_give_each_role_its_own_hospital_rate():
    """params.yaml: FedAvg's classifier hospitals at half the centralized rate, DP's at its own 0.01,
    and the U-Net at train.segmenter's in every variant (a federated.train key for both roles would
    move them all)."""
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    centralized = {role: params["train"][role]["learning_rate"] for role in ("classifier", "segmenter")}
    half = centralized["classifier"] / 2
    for variant, classifier_rate in (("fedavg", half), ("paillier", half), ("dp", 0.01), ("secure", 0.01)):
        p = with_variant(params, variant)
        settings = FederatedSettings.from_params(p)
        assert settings.hospital_training(p, "classifier")["learning_rate"] == pytest.approx(classifier_rate), variant
        assert settings.hospital_training(p, "segmenter")["learning_rate"] == centralized["segmenter"], variant


def test_every_project_variant_is_a_training_its_privacy_admits():
    """params.yaml: the hospitals' default logit adjustment is off wherever DP-SGD trains (the
    preflight refuses it there) and for personalized models; on for the plain strategies."""
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    adjusted = {}
    for variant in params["variants"]:
        p = with_variant(params, variant)
        settings = FederatedSettings.from_params(p)
        for role in ("classifier", "segmenter"):
            PrivacySettings.from_params(p).check_training(settings.hospital_training(p, role), role)
        adjusted[variant] = settings.hospital_training(p, "classifier").get("logit_adjustment", False)
    assert {v for v, on in adjusted.items() if not on} == {"dp", "secure", "fedbn", "local_head"}


@pytest.mark.parametrize("wrong", [0, -2, "many", 1.5, True])
def test_hospital_threads_must_be_auto_or_a_positive_count(tmp_path, wrong):
    params = federated_params(tmp_path)
    params["federated"]["hospital_threads"] = wrong
    with pytest.raises(InputError, match="federated.hospital_threads"):
        FederatedSettings.from_params(params)


def test_hospital_threads_share_the_cores(tmp_path, monkeypatch):
    params = federated_params(tmp_path)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert FederatedSettings.from_params(params).threads_per_hospital(3) == 2  # auto (the default)
    assert FederatedSettings.from_params(params).threads_per_hospital(12) == 1
    params["federated"]["hospital_threads"] = 3
    assert FederatedSettings.from_params(params).threads_per_hospital(3) == 3


def test_local_mlflow_stores_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("http://mlflow:5000") == "http://mlflow:5000"


def _run_settings(tmp_path: Path):
    """A hospital's RunSettings for the tiny data of 2 hospitals (batches of 5)."""
    import json

    from fedbrain.federated.task import RunSettings

    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = federated_params(tmp_path)
    cfg = {"processed": str(processed), "partition": str(partition), "out": str(tmp_path / "out"),
           "role": "classifier", "rounds": 1, "local-epochs": 1, "seed": 1,
           "train-params": json.dumps({**params["train"]["classifier"], "batch_size": 5}), "params": "{}",
           "fraction-train": 1.0, "fraction-evaluate": 1.0, "min-train-nodes": 2, "min-evaluate-nodes": 2,
           "min-available-nodes": 2, "round-timeout": 1.0, "node-wait-timeout": 1.0, "resume": False,
           "run-name": "t", "secure": True, "calibration-images": 0, "lr-decay": "cosine"}
    return RunSettings.from_run_config(cfg)


def test_batch_norm_statistics_are_those_of_the_layer_input(tmp_path):
    """A BatchNormalization layer right after the input measures the images themselves."""
    from dataclasses import replace

    import tensorflow as tf

    from fedbrain.federated.task import batch_norm_statistics, hospital_data, lr_scale

    settings = _run_settings(tmp_path)
    assert [round(lr_scale(replace(settings, rounds=2), r), 3) for r in (1, 2)] == [1.0, 0.5]  # cosine
    assert lr_scale(replace(settings, lr_decay="none"), 2) == 1.0
    inputs = tf.keras.Input((16, 16, 1))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(4)(tf.keras.layers.BatchNormalization()(inputs)))
    stats, seen, _ = batch_norm_statistics(model, settings, hospital=1)
    images = hospital_data(settings, 1, "train").images
    assert seen == len(images) == 12  # batches of 5, 5, 2: unequal batches weigh by size
    assert stats[0] == pytest.approx([images.mean()], rel=1e-4)
    assert stats[1] == pytest.approx([images.var()], rel=1e-3)
    assert model.layers[1].momentum == 0.99  # restored
    # A seeded sample when calibration_images is smaller than the split; it still stands for the
    # whole split when the server pools hospitals (weights by sample size would skew the pool).
    sample, represented, _ = batch_norm_statistics(model, replace(settings, calibration_images=5), hospital=1)
    assert represented == 12 and sample[0] != pytest.approx(stats[0], rel=1e-6)


def test_pooled_statistics_follow_the_law_of_total_variance():
    import numpy as np

    from fedbrain.federated.server_app import pool_batch_norm_statistics

    a, b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([10.0, 12.0])
    pooled = pool_batch_norm_statistics([(4, [np.array([a.mean()]), np.array([a.var()])]),
                                         (2, [np.array([b.mean()]), np.array([b.var()])])])
    both = np.concatenate([a, b])
    assert pooled[0] == pytest.approx([both.mean()]) and pooled[1] == pytest.approx([both.var()])


def test_supernode_waits_are_capped_and_flower_still_polls_with_time(monkeypatch):
    """fedbrain.federated.supernode shortens the SuperNode loop's sleeps; nothing else of `time`."""
    import time

    from flwr.supernode import start_client_internal as loop

    from fedbrain.federated import waits

    # The pinned Flower's loop sleeps through the module-level `time` the wrapper replaces.
    assert loop.time is time
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    short = waits.ShortSleeps("time")
    short.sleep(3)     # the idle wait between polls
    short.sleep(0.05)  # shorter waits stay as they are
    assert slept == [waits.WAIT_S, 0.05]
    assert short.monotonic is time.monotonic


def test_an_object_not_stored_yet_is_pulled_again_within_the_short_backoff(monkeypatch):
    """Flower backs off 1 s (+-20%) before pulling an object again; with waits.shorten_object_pulls
    the next try comes after FIRST_RETRY_S and the pull still succeeds."""
    import time

    from flwr.common import inflatable_utils
    from flwr.common.inflatable_utils import ObjectUnavailableError

    from fedbrain.federated import waits

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))  # restored afterwards
    waits.shorten_object_pulls()
    tries = []

    def pull(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ObjectUnavailableError(object_id)
        return b"weights"

    assert inflatable_utils.pull_objects(["a" * 64], pull) == {"a" * 64: b"weights"}
    gaps = [later - earlier for earlier, later in zip(tries, tries[1:])]
    assert len(gaps) == 2 and max(gaps) < 0.8  # Flower's own first retry comes after >= 0.8 s
    assert inflatable_utils.pull_objects.__kwdefaults__["backoff_cap"] == waits.WAIT_S
    assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == waits.FIRST_RETRY_S


def test_objects_that_never_arrive_give_up_when_the_phase_ends(monkeypatch):
    """A reply whose SuperNode died before uploading its objects: with waits.limit_object_pulls
    (the time left in the phase) Flower's pull gives up then, instead of after 2 hours."""
    import time

    from flwr.common import inflatable_utils
    from flwr.common.inflatable_utils import ObjectUnavailableError

    from fedbrain.federated import waits

    monkeypatch.setattr(inflatable_utils.pull_objects, "__kwdefaults__",
                        dict(inflatable_utils.pull_objects.__kwdefaults__))  # restored afterwards
    waits.shorten_object_pulls()

    def never(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    waits.limit_object_pulls(0.5)
    start = time.monotonic()
    with pytest.raises(ObjectUnavailableError):
        inflatable_utils.pull_objects(["a" * 64], never)
    assert time.monotonic() - start < 5.0  # the limit, a backoff step and thread start-up
    # However long the phase, one reply's objects never hold it longer than REPLY_OBJECTS_WAIT_S
    # (the other replies of the round would wait behind it), nor longer than Flower's own limit.
    waits.limit_object_pulls(1e9)
    assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == waits.REPLY_OBJECTS_WAIT_S
    assert waits.REPLY_OBJECTS_WAIT_S < inflatable_utils.PULL_MAX_TIME


def test_a_hospital_keeps_its_model_and_optimizer_state_between_rounds(tmp_path):
    """The run's model is built once per hospital process; Adam's state carries over, the rate is the round's."""
    import numpy as np
    import tensorflow as tf

    from fedbrain.federated import client_app
    from fedbrain.federated.task import train_locally

    settings = _run_settings(tmp_path)
    model = client_app._model(settings, run_id=7, learning_rate=0.01)
    train_locally(model, settings, hospital=0, server_round=1)
    moved = [v.numpy().copy() for v in model.optimizer.variables]
    assert any(np.any(v) for v in moved)  # steps taken, moments moved
    again = client_app._model(settings, run_id=7, learning_rate=0.005)
    assert again is model
    assert all(np.array_equal(v.numpy(), m) for v, m in zip(model.optimizer.variables, moved))
    assert tf.keras.backend.get_value(model.optimizer.learning_rate) == pytest.approx(0.005)
    # Another run gets its own model, optimizer fresh, at train.<role>'s rate.
    other = client_app._model(settings, run_id=8)
    assert other is not model
    assert not any(np.any(v.numpy()) for v in other.optimizer.variables)
    assert tf.keras.backend.get_value(other.optimizer.learning_rate) == pytest.approx(settings.learning_rate)


def test_supernode_sends_a_reply_once_its_objects_are_registered():
    """Flower 1.23 stores a reply before registering its objects; sending waits for them."""
    import threading

    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.common.inflatable import get_object_tree
    from flwr.supercore.object_store import NoObjectInStoreError, ObjectStoreFactory

    from fedbrain.federated import supernode

    store = ObjectStoreFactory().store()  # what the SuperNode uses
    reply = Message(RecordDict({"arrays": ArrayRecord([])}), dst_node_id=1, message_type="train")
    tree = get_object_tree(reply)
    late = threading.Timer(0.5, store.preregister, args=(0, tree))  # the servicer, a moment later
    late.start()
    assert supernode._RegisteredTrees(store, timeout=10).get_object_tree(reply.object_id) == tree
    late.join()
    with pytest.raises(NoObjectInStoreError):  # never registered: fails after its timeout
        supernode._RegisteredTrees(store, timeout=0.3).get_object_tree("0" * 64)


def test_weights_travel_as_one_vector_and_come_back_as_the_models_arrays(tmp_path):
    import numpy as np

    from fedbrain.federated import client_app
    from fedbrain.federated.task import weights_of, weights_record

    model = client_app._model(_run_settings(tmp_path), run_id=9)
    weights = [np.random.default_rng(i).normal(size=w.shape).astype(w.dtype) for i, w in enumerate(model.get_weights())]
    record = weights_record(weights)
    assert len(record) == 1  # one array, whatever the number of layer variables
    back = weights_of(record, model)
    assert [w.shape for w in back] == [w.shape for w in weights]
    assert all(np.array_equal(a, b) for a, b in zip(back, weights))
    with pytest.raises(ValueError, match="not this run's model"):
        weights_of(weights_record(weights[:-1]), model)


def test_a_federation_never_gets_the_same_free_port_twice():
    """Flower's gRPC servers bind with SO_REUSEPORT: two hospitals given one port would both listen on
    it, each ClientApp reaching either SuperNode. free_port skips every port it gave out before."""
    from fedbrain.federated.processes import free_port

    first = free_port()  # closed again: the OS may well offer it next
    given = {first}
    ports = [free_port(given) for _ in range(200)]
    assert first not in ports and len(set(ports)) == len(ports) == 200
    assert given == {first, *ports}


def test_a_resumed_run_logs_the_evaluation_it_repeats_only_when_mlflow_lacks_it(tmp_path):
    """The interrupted run may have logged round 2's val_* before its round-3 checkpoint: resumed after
    round 2, the run evaluates round 2's model again and must not log step 2 twice; a step it lacks it logs."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import mlflow
    from mlflow import MlflowClient

    from fedbrain.federated.global_models import GlobalModels
    from fedbrain.federated.records import Evaluation, RoundRecord

    class Tracking:  # what GlobalModels.evaluated uses of the round loop's Tracking, on a real store
        def __init__(self, run_id):
            self.run_id = run_id

        def log(self, metrics, step):
            mlflow.log_metrics(metrics, step=step)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Its own experiment: MLflow keeps the active experiment's id in the process, and an earlier test's
    # (id 1 in its own store) is not in this new store (the test failed after others in one process).
    mlflow.set_experiment("resumed")
    for already_logged in (True, False):
        with mlflow.start_run() as run:
            if already_logged:
                mlflow.log_metrics({"val_accuracy": 0.5, "val_loss": 1.0}, step=2)
            state = {"round": 2, "initial": {"metrics": {}, "hospitals": {}},
                     "rounds": [asdict(RoundRecord(round=r, nodes_online=2)) for r in (1, 2)]}
            models = GlobalModels(SimpleNamespace(rounds=3), None, None, Tracking(run.info.run_id), state)
            models.evaluated(Evaluation(round=2, metrics={"val_accuracy": 0.5, "val_loss": 1.0}))
            history = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
            assert [m.step for m in history] == [2], already_logged
            assert state["rounds"][1]["metrics"]["val_accuracy"] == 0.5
