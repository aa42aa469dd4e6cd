"""Differential privacy in a real federation on loopback (TLS, SuperNode authentication).

Example level: every hospital trains with DP-SGD and reports the epsilon it has spent after every
round; the run's epsilon is the accountant's for the rounds actually run, and a budget ends the
run before the round that would cross it, with a usable model. Client level: Flower's
client-side fixed clipping, the server's noise accounted over the rounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
from dp_accounting import rdp
from mlflow.tracking import MlflowClient

from fedbrain.errors import InputError
from fedbrain.federated import launcher

from federated_data import federated_params, isolate, make_federated_data

EXAMPLES, BATCH = 12, 8  # per hospital (make_federated_data: 3 per class x 4 classes)


@pytest.fixture(autouse=True)
def _tiny_model_and_own_mlflow(monkeypatch):
    isolate(monkeypatch)


def dp_params(tmp_path: Path, rounds: int, **privacy) -> dict:
    params = federated_params(tmp_path, rounds=rounds)
    params["train"]["classifier"].update(model="tiny_model:build_group", normalization="group", class_weight=False)
    params["privacy"] = {"mode": "example", "l2_norm_clip": 1.0, "delta": 1e-5, **privacy}
    return params


def accountant_epsilon(noise: float, rounds: int) -> float:
    steps = rounds * math.ceil(EXAMPLES / BATCH)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(BATCH / EXAMPLES, dp_accounting.GaussianDpEvent(noise)), steps))
    return acc.get_epsilon(1e-5)


def mlflow_run(params: dict):
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    return client, run


def test_example_level_dp_reports_each_hospitals_epsilon_every_round(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=3)
    params = dp_params(tmp_path, rounds=2, noise_multiplier=1.5)
    out = tmp_path / "models" / "federated" / "dp"
    lines = []
    launcher.run(params, processed, partition, out, echo=lines.append)

    # The plan each hospital will follow is printed before anything starts.
    plans = [line for line in lines if line.startswith("privacy: hospital")]
    assert len(plans) == 3 and all("Poisson" in line and "delta 1.0e-05" in line for line in plans), plans
    card = json.loads((out / "classifier.json").read_text())
    assert card["privacy"] == "example" and card["delta"] == 1e-5
    expected = [accountant_epsilon(1.5, r) for r in (1, 2)]
    for record, epsilon in zip(card["round_records"], expected):
        assert {k: h["epsilon"] for k, h in record["hospitals"].items()} == \
            {k: pytest.approx(epsilon, rel=1e-6) for k in ("0", "1", "2")}
        # Training-set figures computed without noise stay at the hospital.
        figures = [name for h in record["hospitals"].values() for name in h] + list(record["metrics"])
        assert not {"train_loss", "train_accuracy"} & set(figures), figures
        assert all("local_val_loss" in h for h in record["hospitals"].values())
    assert card["epsilon"] == pytest.approx(expected[-1], rel=1e-6)
    assert card["epsilon_by_hospital"] == {k: pytest.approx(expected[-1], rel=1e-6) for k in ("0", "1", "2")}
    assert "Poisson" in card["epsilon_accounting"]

    client, run = mlflow_run(params)
    assert run.data.tags["privacy"] == "example"
    assert run.data.params["federated.hospital_threads_resolved"] == "1"  # 2 cores // 3 hospitals
    steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epsilon")}
    assert steps == {1: pytest.approx(expected[0], rel=1e-6), 2: pytest.approx(expected[1], rel=1e-6)}
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "hospital_2/epsilon")) == [1, 2]


def test_epsilon_budget_stops_before_the_round_that_would_cross_it(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    one, two = accountant_epsilon(2.0, 1), accountant_epsilon(2.0, 2)
    params = dp_params(tmp_path, rounds=3, noise_multiplier=2.0, epsilon_budget=(one + two) / 2)
    out = tmp_path / "models" / "federated" / "dp"
    lines = []
    launcher.run(params, processed, partition, out, echo=lines.append)

    card = json.loads((out / "classifier.json").read_text())
    assert card["rounds"] == 1 and card["rounds_planned"] == 3
    assert [r["round"] for r in card["round_records"]] == [1]
    assert card["epsilon"] == pytest.approx(one, rel=1e-6) and card["epsilon"] <= card["epsilon_budget"]
    assert "epsilon_budget" in card["stopped_by_budget"] and "round 2" in card["stopped_by_budget"]
    assert any("privacy budget: stopping after round 1 of 3" in line for line in lines)
    # The last model is kept and usable.
    model = tf.keras.models.load_model(out / "classifier.keras", compile=False)
    probabilities = model.predict(np.zeros((2, 16, 16, 1), np.float32), verbose=0)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    _, run = mlflow_run(params)
    assert "round 2" in run.data.tags["stopped_by_budget"] and run.info.status == "FINISHED"


def test_client_level_dp_with_flowers_fixed_clipping(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = dp_params(tmp_path, rounds=2, noise_multiplier=0.8)
    params["privacy"]["mode"] = "client"
    out = tmp_path / "models" / "federated" / "client_dp"
    lines = []
    launcher.run(params, processed, partition, out, echo=lines.append)

    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.8), 2))
    card = json.loads((out / "classifier.json").read_text())
    assert card["privacy"] == "client" and card["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert [sorted(r["hospitals"]) for r in card["round_records"]] == [["0", "1"], ["0", "1"]]
    # The hospitals clipped their updates with Flower's mod, the server added the noise.
    clientapp_log = (tmp_path / ".fedbrain" / "federation" / "client_dp" / "logs" / "clientapp_hospital_0.log")
    assert clientapp_log.read_text().count("fixedclipping_mod: parameters are clipped") == 2
    serverapp_log = next((tmp_path / ".fedbrain" / "federation" / "client_dp" / "logs").glob("serverapp_*.log"))
    assert serverapp_log.read_text().count("central DP noise with") == 2


def test_batch_norm_network_is_refused_under_dp_before_anything_starts(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = dp_params(tmp_path, rounds=1, noise_multiplier=1.0)
    params["train"]["classifier"]["normalization"] = "batch"
    with pytest.raises(InputError, match=r"set train\.classifier\.normalization: group"):
        launcher.prepare(params, processed, partition, tmp_path / "out", resume=False)
