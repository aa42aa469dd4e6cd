"""Personalized models (federated.personalization fedbn | local_head): a hospital's own layers never leave it.

The federation tests look at what the server made of what it received: every global model it saved
(each round's checkpoint and the final one) holds, at the personal layers' positions, the values it
started from. Had any hospital sent its own values there, the examples-weighted average would have
moved them. The hospitals' saved personalized models hold their own, trained values there, and the
global model's values everywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from fedbrain.errors import InputError
from fedbrain.federated import cluster, launcher, personal, task
from fedbrain.federated.settings import FederatedSettings

from federated_data import federated_params, isolate, make_federated_data
from test_federation import TINY, TINY_PLAIN, tiny_params


def _tiny(batch_norm: bool = True):
    from tiny_model import build

    return build((16, 16, 1), 4, batch_norm=batch_norm)


def test_fedbn_keeps_every_normalisation_variable_and_local_head_the_output_layer():
    model = _tiny()
    names = [v.name for v in model.weights]
    fedbn = [names[i] for i in personal.personal_variables(model, "fedbn")]
    assert len(fedbn) == 4 and all("batch_normalization" in n for n in fedbn)  # gamma, beta, mean, variance
    head = [names[i] for i in personal.personal_variables(model, "local_head")]
    assert len(head) == 2 and all("probabilities" in n for n in head)
    assert personal.personal_variables(model, "none") == []
    kernel, bias = (model.weights[i] for i in personal.personal_variables(model, "local_head"))
    assert tuple(kernel.shape) == (4, 4) and tuple(bias.shape) == (4,)  # the Dense kernel and bias
    assert personal.personal_variables(model, "local_head") == [len(model.weights) - 2, len(model.weights) - 1]


def test_fedbn_without_normalisation_layers_is_refused_with_what_to_use():
    with pytest.raises(InputError, match="fedbn.*has none; use local_head or none"):
        personal.personal_variables(_tiny(batch_norm=False), "fedbn")


def test_a_hospital_trains_with_its_own_layers_and_sends_them_as_received():
    model = _tiny()
    layers = personal.HospitalLayers(model, "fedbn")
    received = [np.full(w.shape, 1.0, np.float32) for w in model.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(layers.localize(received), received))  # nothing own yet
    trained = [np.full(w.shape, 2.0, np.float32) for w in model.get_weights()]
    layers.keep(trained, server_round=1)
    sent = layers.outgoing(trained, received)
    for i, (s, r, t) in enumerate(zip(sent, received, trained)):
        assert np.array_equal(s, r if i in layers.indices else t)
    nxt = [np.full(w.shape, 3.0, np.float32) for w in model.get_weights()]
    for i, w in enumerate(layers.localize(nxt)):
        assert np.all(w == (2.0 if i in layers.indices else 3.0))
    assert layers.trained_round == 1


def test_the_mode_reaches_the_hospitals_a_wrong_one_is_refused_and_both_launchers_take_it(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = federated_params(tmp_path, personalization="local_head")
    config = launcher.run_config(FederatedSettings.from_params(params), params, "classifier", processed, partition,
                                 tmp_path / "out", resume=False, secure=True)
    assert task.RunSettings.from_run_config(config).personalization == "local_head"
    assert task.RunSettings.from_run_config({k: v for k, v in config.items() if k != "personalization"}
                                            ).personalization == "none"
    with pytest.raises(InputError, match=r"federated\.personalization' is 'fedper'; expected one of none, fedbn"):
        FederatedSettings.from_params(federated_params(tmp_path, personalization="fedper"))
    # kubernetes too: each hospital saves on its own pod's volume (run config hospital-out), whence the
    # launcher copies it (tests/code/test_kubernetes_launcher.py); locally beside the global model, as before
    cluster.check_supported(params, resume=False, insecure=False)
    local = task.RunSettings.from_run_config(config)
    weights = task.build(local, compiled=False).get_weights()
    assert "hospital-out" not in config and local.hospital_out is None
    assert personal.save(weights, local, 1, 2, {}) == personal.hospital_model_path(Path(config["out"]), 1, "classifier")
    pod = task.RunSettings.from_run_config({**config, "hospital-out": str(tmp_path / "pod" / "out")})
    saved = personal.save(weights, pod, 1, 2, {})
    assert saved == tmp_path / "pod" / "out" / "hospital_1" / "classifier.keras" and saved.with_suffix(".json").is_file()
    assert sorted(p.name for p in Path(config["out"]).iterdir()) == ["hospital_1"]  # nothing more written there


@pytest.mark.parametrize("mode, aggregation", [("fedbn", "none"), ("local_head", "none"), ("fedbn", "paillier")])
def test_personal_layers_never_reach_the_server_and_each_hospital_saves_its_own(tmp_path, monkeypatch, mode,
                                                                                aggregation):
    """Under Paillier the server adds ciphertexts of updates: a personal layer's update is 0, and fedbn's
    statistics are not encrypted and sent at all (the server expects none)."""
    isolate(monkeypatch)
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = tiny_params(tmp_path, rounds=2, model=TINY if mode == "fedbn" else TINY_PLAIN)
    params["federated"].update(personalization=mode, secure_aggregation=aggregation)
    out = tmp_path / "models" / "federated" / mode

    launcher.run(params, processed, partition, out, echo=lambda line: None)

    final = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    indices = personal.personal_variables(final, mode)
    checkpoints = [tf.keras.models.load_model(out / "checkpoints" / "classifier" / f"round_{r}.keras", compile=False)
                   for r in (1, 2)]
    start = [final.get_weights()[i] for i in indices]
    if mode == "fedbn":  # Keras' initial BatchNormalization: gamma 1, beta 0, mean 0, variance 1
        assert [float(np.unique(v)[0]) for v in start] == [1.0, 0.0, 0.0, 1.0]
    for model in checkpoints:  # what the server averaged, round after round: its own values again
        for i, value in zip(indices, start):
            np.testing.assert_allclose(model.get_weights()[i], value, rtol=1e-6, atol=1e-7)
    assert not np.allclose(checkpoints[0].get_weights()[0], checkpoints[1].get_weights()[0])  # the rest trains

    own = []
    for k in (0, 1):
        path = personal.hospital_model_path(out, k, "classifier")
        card = json.loads(path.with_suffix(".json").read_text())
        assert (card["personalization"], card["hospital"], card["round"], card["run_id"]) == (mode, k, 2, None)
        weights = tf.keras.models.load_model(path, compile=False).get_weights()
        for i, (mine, shared) in enumerate(zip(weights, final.get_weights())):
            if i not in indices:  # the global model's shared layers, as received
                np.testing.assert_array_equal(mine, shared)
        own.append([weights[i] for i in indices])
        assert any(not np.allclose(mine, value) for mine, value in zip(own[-1], start)), "its own layers trained"
    assert any(not np.allclose(a, b) for a, b in zip(*own)), "each hospital has its own"

    card = json.loads((out / "classifier.json").read_text())
    assert (card["personalization"], card["aggregation"], card["failures"]) == (
        mode, "fedavg" if aggregation == "none" else aggregation, [])
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    assert run.data.tags["personalization"] == mode
