"""Strategies for non-IID hospitals (federated.strategy): FedProx's proximal term at the hospitals,
FedAvgM's and FedAdam's server steps, their settings, state and one real federation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.grid.inmemory_grid import InMemoryGrid
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from mlflow.tracking import MlflowClient

from fedbrain.errors import InputError
from fedbrain.federated import launcher, task
from fedbrain.federated.proximal import proximal_term
from fedbrain.federated.server_optimizer import ServerOptimizer
from fedbrain.federated.settings import FederatedSettings, StrategySettings

from federated_data import federated_params, isolate, make_federated_data
from test_federation import TINY_PLAIN, tiny_params

PROJECT = Path(__file__).resolve().parents[2]
SIZE = 12


# --- the server's step, against Flower's own strategies ----------------------------------------

def _grid(nodes: int) -> InMemoryGrid:
    """A real Flower grid over an in-memory SuperLink state with `nodes` online SuperNodes."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME)
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, ConfigRecord(), None)
    for k in range(nodes):
        state.activate_node(state.create_node("owner", f"hospital-{k}".encode(), 60.0), 60.0)
    grid = InMemoryGrid(factory)
    grid.set_run(run_id)
    return grid


def _replies(messages: list[Message], weights: list[np.ndarray], examples: list[int]) -> list[Message]:
    return [Message(RecordDict({"arrays": ArrayRecord([w]), "metrics": MetricRecord({"num-examples": n})}),
                    reply_to=msg) for msg, w, n in zip(messages, weights, examples)]


def _flower_and_ours(flower, settings: StrategySettings, rounds: int = 3) -> None:
    """Drive Flower's strategy through configure_train and aggregate_train on real messages and
    ServerOptimizer on FedAvg's average of the same replies: the same global weights every round."""
    rng = np.random.default_rng(0)
    grid, fedavg = _grid(3), FedAvg()
    ours = ServerOptimizer(settings, np.ones(SIZE, bool))
    sent = ArrayRecord([rng.normal(size=SIZE).astype(np.float32)])
    flower_sent = sent
    for server_round in range(1, rounds + 1):
        messages = list(flower.configure_train(server_round, flower_sent, ConfigRecord(), grid))
        (global_weights,) = sent.to_numpy_ndarrays()
        weights = [(global_weights + rng.normal(scale=0.1, size=SIZE)).astype(np.float32) for _ in messages]
        examples = [10, 20, 40]
        flower_sent, _ = flower.aggregate_train(server_round, _replies(messages, weights, examples))
        average, _ = fedavg.aggregate_train(server_round, _replies(messages, weights, examples))
        sent = ours.step(sent, average, server_round)
        (expected,), (got,) = flower_sent.to_numpy_ndarrays(), sent.to_numpy_ndarrays()
        assert not np.allclose(got, average.to_numpy_ndarrays()[0])  # a step of its own, not the average
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_fedavgm_steps_as_flowers_fedavgm():
    _flower_and_ours(FedAvgM(server_momentum=0.9, server_learning_rate=0.7),
                     StrategySettings("fedavgm", server_momentum=0.9, server_learning_rate=0.7))


def test_fedadam_steps_as_flowers_fedadam_with_its_defaults():
    _flower_and_ours(FedAdam(), StrategySettings("fedadam"))


def test_fedavgm_with_momentum_0_is_fedavg_exactly():
    optimizer = ServerOptimizer(StrategySettings("fedavgm", server_momentum=0.0), np.ones(SIZE, bool))
    rng = np.random.default_rng(1)
    sent = ArrayRecord([rng.normal(size=SIZE).astype(np.float32)])
    for server_round in (1, 2, 3):
        average = ArrayRecord([rng.normal(size=SIZE).astype(np.float32)])
        got = optimizer.step(sent, average, server_round)
        assert np.array_equal(got.to_numpy_ndarrays()[0], average.to_numpy_ndarrays()[0])
        sent = got


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_client_side_strategies_keep_the_average(name):
    average = ArrayRecord([np.arange(SIZE, dtype=np.float32)])
    assert ServerOptimizer(StrategySettings(name), np.ones(SIZE, bool)).step(ArrayRecord([np.zeros(SIZE, np.float32)]),
                                                                             average, 1) is average


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_only_trainable_positions_take_the_server_step(name):
    """BatchNormalization's moving statistics keep the average (the pooled statistics replace them)."""
    trainable = np.arange(SIZE) % 3 != 0
    sent, average = np.zeros(SIZE, np.float32), np.linspace(-1, 1, SIZE).astype(np.float32)
    (got,) = ServerOptimizer(StrategySettings(name, server_learning_rate=0.5), trainable).step(
        ArrayRecord([sent]), ArrayRecord([average]), 1).to_numpy_ndarrays()
    assert np.array_equal(got[~trainable], average[~trainable])
    assert not np.allclose(got[trainable], average[trainable])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_a_resumed_run_continues_the_optimizer_state(tmp_path, name):
    settings, trainable = StrategySettings(name), np.ones(SIZE, bool)
    rng = np.random.default_rng(2)
    averages = [ArrayRecord([rng.normal(size=SIZE).astype(np.float32)]) for _ in range(4)]
    start = ArrayRecord([np.zeros(SIZE, np.float32)])

    def rounds(optimizer, sent, first, last):
        for server_round in range(first, last + 1):
            sent = optimizer.step(sent, averages[server_round - 1], server_round)
        return sent

    whole = rounds(ServerOptimizer(settings, trainable), start, 1, 4)
    first = ServerOptimizer(settings, trainable, tmp_path)
    before = rounds(first, start, 1, 2)
    # Round 3's step was saved, but the run stopped before round 3's global model was: it resumes after round 2.
    rounds(first, before, 3, 3)
    assert ServerOptimizer(settings, trainable, tmp_path).saved_rounds() == [2, 3]  # the two newest kept
    resumed = ServerOptimizer.for_run(settings, trainable, tmp_path, resumed_after=2)
    after = rounds(resumed, before, 3, 4)
    np.testing.assert_array_equal(after.to_numpy_ndarrays()[0], whole.to_numpy_ndarrays()[0])
    # A round without a step (the privacy budget refused it) resumes from the step before.
    assert ServerOptimizer.for_run(settings, trainable, tmp_path, resumed_after=5).state.keys() == resumed.state.keys()
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        ServerOptimizer.for_run(settings, trainable, tmp_path / "elsewhere", resumed_after=2)


# --- settings --------------------------------------------------------------------------------------

def test_project_params_default_to_fedavg_with_flowers_defaults():
    from fedbrain.config import load_params

    params = load_params(PROJECT / "params.yaml")
    strategy = FederatedSettings.from_params(params).strategy
    assert strategy == StrategySettings()
    adam = FedAdam()
    assert (strategy.adam_learning_rate, strategy.beta_1, strategy.beta_2, strategy.tau) == \
        (adam.eta, adam.beta_1, adam.beta_2, adam.tau)
    assert strategy.server_learning_rate == FedAvgM().server_learning_rate
    for name in ("fedprox", "fedavgm", "fedadam"):
        assert params["variants"][name] == {"federated": {"strategy": name}}
        assert name not in params["pipeline_variants"]
    assert 'strategy = "{}"' in (PROJECT / "src/fedbrain/federated/app/pyproject.toml").read_text()


@pytest.mark.parametrize("federated, key", [
    ({"strategy": "fedsgd"}, "federated.strategy"),
    ({"proximal_mu": -0.1}, "federated.proximal_mu"),
    ({"server_momentum": 1.0}, "federated.server_momentum"),
    ({"server_momentum": -0.5}, "federated.server_momentum"),
    ({"server_learning_rate": 0}, "federated.server_learning_rate"),
    ({"server_adam": {"beta_1": 1.0}}, "federated.server_adam.beta_1"),
    ({"server_adam": {"beta_2": -0.1}}, "federated.server_adam.beta_2"),
    ({"server_adam": {"tau": 0}}, "federated.server_adam.tau"),
    ({"server_adam": {"learning_rate": "fast"}}, "federated.server_adam.learning_rate"),
    ({"server_adam": {"eta": 0.1}}, "federated.server_adam"),
])
def test_wrong_strategy_settings_name_their_key(tmp_path, federated, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        FederatedSettings.from_params(federated_params(tmp_path, **federated))


def test_the_strategy_reaches_the_apps_through_the_run_config_and_mlflow_params(tmp_path):
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = federated_params(tmp_path, strategy="fedadam", server_adam={"beta_1": 0.8})
    settings = FederatedSettings.from_params(params)
    config = launcher.run_config(settings, params, "classifier", processed, partition, tmp_path / "out",
                                 resume=False, secure=True)
    strategy = task.RunSettings.from_run_config(config).strategy
    assert strategy == StrategySettings("fedadam", beta_1=0.8)
    # Those params.yaml sets are logged as written with it; the defaults it leaves out are added.
    assert strategy.as_params(params) == {"federated.server_adam.learning_rate": 0.1,
                                          "federated.server_adam.beta_2": 0.99, "federated.server_adam.tau": 0.001}
    assert StrategySettings("fedprox", proximal_mu=0.1).as_params({}) == {"federated.strategy": "fedprox",
                                                                          "federated.proximal_mu": 0.1}
    assert task.RunSettings.from_run_config({**config, "strategy": "{}"}).strategy.name == "fedavg"


# --- FedProx: the proximal term in the hospital's training -------------------------------------------

def _hospital(tmp_path: Path, model: str = "tiny_model:build", **strategy) -> task.RunSettings:
    """Hospital 0's settings (its tiny data made at the first call), training 3 epochs a round."""
    processed, partition = tmp_path / "data" / "processed", tmp_path / "data" / "partition"
    if not processed.exists():
        make_federated_data(tmp_path / "data", hospitals=1, train_per_class=4)
    params = federated_params(tmp_path)
    params["train"]["classifier"].update(model=model, learning_rate=0.05, batch_size=4)
    config = launcher.run_config(FederatedSettings.from_params(params), params, "classifier", processed, partition,
                                 tmp_path / "out", resume=False, secure=True)
    settings = task.RunSettings.from_run_config(config)
    return replace(settings, local_epochs=3, strategy=StrategySettings(**strategy))


def _train(settings: task.RunSettings, noise_multiplier: float | None = None) -> tuple[list, list, dict, object]:
    """(weights received, weights trained, history, model): one hospital round from the same start."""
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(settings.seed)
    model = task.build(settings, noise_multiplier=noise_multiplier)
    received = [w.numpy().copy() for w in model.trainable_weights]
    history, _, _ = task.train_locally(model, settings, hospital=0, server_round=1)
    return received, [w.numpy() for w in model.trainable_weights], history, model


def _distance(a: list, b: list) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b))))


@pytest.mark.parametrize("model, noise", [("tiny_model:build", None), ("tiny_model:build_group", 0.0)],
                         ids=["batchnorm", "dp-sgd"])
def test_fedprox_with_mu_0_is_fedavg_and_with_mu_above_0_stays_closer(tmp_path, model, noise):
    """DP-SGD (noise 0 so that two runs compare) adds the term's gradient after clipping and noising."""
    start, fedavg, history, _ = _train(_hospital(tmp_path, model, name="fedavg"), noise)
    start_0, fedprox_0, history_0, _ = _train(_hospital(tmp_path, model, name="fedprox", proximal_mu=0.0), noise)
    assert all(np.array_equal(a, b) for a, b in zip(start, start_0))
    assert all(np.array_equal(a, b) for a, b in zip(fedavg, fedprox_0)) and history == history_0
    start_1, fedprox_1, history_1, trained = _train(_hospital(tmp_path, model, name="fedprox", proximal_mu=1.0), noise)
    assert _distance(fedprox_1, start_1) < 0.8 * _distance(fedavg, start)
    # The term is training's only: the global model's evaluations and the hospital's own validation of
    # what it sends are the plain loss.
    assert float(proximal_term(trained, 1.0).strength.numpy()) == 0.0
    val = task.hospital_data(_hospital(tmp_path, model, name="fedavg"), 0, "val")
    plain = tf.keras.Model(trained.inputs, trained.outputs)
    plain.compile(loss=trained.loss)
    x, y = val.images, np.eye(4)[val.labels]
    assert trained.evaluate(x, y, verbose=0, return_dict=True)["loss"] == \
        pytest.approx(plain.evaluate(x, y, verbose=0, return_dict=True)["loss"], rel=1e-6)
    local, _ = task.evaluate_locally(trained, _hospital(tmp_path, model, name="fedprox", proximal_mu=1.0), 0)
    assert local["loss"] == pytest.approx(plain.evaluate(x, y, verbose=0, return_dict=True)["loss"], rel=1e-5)


def test_the_proximal_term_is_anchored_at_the_weights_each_round_starts_from(tmp_path):
    settings = _hospital(tmp_path, name="fedprox", proximal_mu=0.5)
    _, _, _, model = _train(settings)
    weights = model.get_weights()
    model.set_weights([w + 0.1 for w in weights])  # the next round's global model
    task.train_locally(model, settings, hospital=0, server_round=2)
    term = proximal_term(model, 0.5)
    assert model.losses and len(model.losses) == 1  # one term, made once per model
    assert all(np.allclose(a.numpy(), w + 0.1) for a, w in
               zip(term.anchors, [w for w, v in zip(weights, model.weights) if v.trainable]))


# --- one real federation ------------------------------------------------------------------------------

def test_a_fedadam_federation_tags_its_strategy_and_saves_the_server_state(tmp_path, monkeypatch):
    isolate(monkeypatch)
    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = tiny_params(tmp_path, rounds=2, model=TINY_PLAIN)
    params["federated"].update(strategy="fedadam", server_adam={"learning_rate": 0.05})
    out = tmp_path / "models" / "federated" / "fedadam"

    history = launcher.run(params, processed, partition, out, echo=lambda line: None)

    assert len(history["classifier"]["val_accuracy"]) == 2
    card = json.loads((out / "classifier.json").read_text())
    assert card["strategy"] == "fedadam"
    assert card["strategy_parameters"] == {"server_adam.learning_rate": 0.05, "server_adam.beta_1": 0.9,
                                           "server_adam.beta_2": 0.99, "server_adam.tau": 0.001}
    checkpoints = out / "checkpoints" / "classifier"
    assert sorted(p.name for p in checkpoints.glob("server_optimizer_round_*.npz")) == \
        ["server_optimizer_round_1.npz", "server_optimizer_round_2.npz"]
    with np.load(checkpoints / "server_optimizer_round_2.npz") as state:
        assert set(state.files) == {"m", "v"} and np.all(state["v"] >= 0) and np.any(state["m"])
    client = MlflowClient(tracking_uri=params["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("fedbrain-test").experiment_id])
    assert run.data.tags["strategy"] == "fedadam"
    assert run.data.params["federated.strategy"] == "fedadam"
    assert run.data.params["federated.server_adam.learning_rate"] == "0.05"
    assert run.data.params["federated.server_adam.tau"] == "0.001"  # Flower's default, not in the params
