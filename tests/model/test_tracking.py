"""fedbrain.tracking: store selection, flattened params, shared metric names, steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from fedbrain import tracking


def test_flatten_and_metric_names():
    flat = tracking.flatten({"train": {"classifier": {"epochs": 3, "augment": {"hflip": True}}, "seed": 1},
                             "data": {"classes": ["a", "b"]}})
    assert flat == {"train.classifier.epochs": 3, "train.classifier.augment.hflip": True, "train.seed": 1,
                    "data.classes": '["a", "b"]'}
    assert [tracking.metric_name(k) for k in ("loss", "accuracy", "dice", "val_loss", "val_dice", "lr")] == [
        "train_loss", "train_accuracy", "train_dice", "val_loss", "val_dice", "learning_rate"]


def test_environment_overrides_params(monkeypatch, tmp_path):
    params = {"mlflow": {"tracking_uri": "sqlite:///elsewhere.db"}}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(params) == "sqlite:///elsewhere.db"
    assert tracking.tracking_uri({}) == tracking.DEFAULT_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    assert tracking.tracking_uri(params) == f"file:{tmp_path / 'mlruns'}"


def test_run_with_params_tags_history_steps_and_artifact(tiny_params, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with tracking.start_run(tiny_params, "federated-classifier", {"training": "federated", "task": "classification",
                                                                  "model": "cnn"}) as run:
        tracking.log_history({"loss": [0.9, 0.5, 0.4], "val_accuracy": [0.5, 0.7, 0.8]}, first_step=1)
        tracking.log_metrics({"test_accuracy": 0.8, "test_hd95": None})
        mlflow.log_artifact(str(note))
    client = mlflow.MlflowClient(tiny_params["mlflow"]["tracking_uri"])
    stored = client.get_run(run.info.run_id)
    assert stored.info.run_name == "federated-classifier"
    assert stored.data.tags["training"] == "federated"
    assert stored.data.params["train.classifier.model"] == "cnn"
    assert not any(k.startswith("mlflow.") for k in stored.data.params)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [
        (1, 0.9), (2, 0.5), (3, 0.4)]
    assert stored.data.metrics["test_accuracy"] == 0.8 and "test_hd95" not in stored.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert client.get_experiment(stored.info.experiment_id).name == "fedbrain-test"


def test_card_is_logged_when_models_are_not(tiny_params, tmp_path):
    params = {**tiny_params, "mlflow": {**tiny_params["mlflow"], "log_models": False}}
    card = tmp_path / "classifier.json"
    card.write_text("{}")
    with tracking.start_run(params, "centralized-classifier", {"training": "centralized"}) as run:
        tracking.log_keras_model(params, model=None, path=tmp_path / "classifier.keras")
    client = mlflow.MlflowClient(params["mlflow"]["tracking_uri"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "card")] == ["card/classifier.json"]


def test_experiment_is_a_model_training_experiment(tiny_params):
    """The MLflow UI opens an experiment by its kind tag: a new experiment gets it, an old one that
    lacks it gets it on the next configure, and a kind someone chose is left alone."""
    uri = tracking.configure(tiny_params)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("fedbrain-test")
    assert experiment.tags[tracking.EXPERIMENT_KIND] == tracking.MODEL_TRAINING == "custom_model_development"

    old = client.create_experiment("made-before")  # as an earlier version of fedbrain made it
    assert tracking.EXPERIMENT_KIND not in client.get_experiment(old).tags
    tracking.configure({**tiny_params, "mlflow": {**tiny_params["mlflow"], "experiment": "made-before"}})
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND] == tracking.MODEL_TRAINING

    client.set_experiment_tag(old, tracking.EXPERIMENT_KIND, "finetuning")
    tracking.configure({**tiny_params, "mlflow": {**tiny_params["mlflow"], "experiment": "made-before"}})
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND] == "finetuning"


def _lineage_run(params, processed, partition, sections=tracking.CENTRALIZED_SECTIONS):
    with tracking.start_run(params, "centralized-classifier", {"training": "centralized"}) as run:
        tracking.log_lineage(params, tracking.training_dataset(params, processed, partition), sections)
    return mlflow.MlflowClient(params["mlflow"]["tracking_uri"]).get_run(run.info.run_id)


def _dataset(run):
    [logged] = run.inputs.dataset_inputs
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]
    return logged.dataset


def test_runs_on_the_same_data_share_a_dataset_digest_and_changed_data_does_not(
        classification_data, tiny_params):
    """Lineage in a real store: the dataset input and params digest of a run, equal for equal data
    and params, different when one training image's pixels, or a train setting, change."""
    import numpy as np

    processed, partition = classification_data
    first, second = (_lineage_run(tiny_params, processed, partition) for _ in range(2))
    dataset = _dataset(first)
    assert dataset.name == "brain-tumor-mri-train" and len(dataset.digest) == 16
    assert json.loads(dataset.profile)["num_rows"] == 40  # 4 classes x (8 train + 2 val)
    assert _dataset(second).digest == dataset.digest
    assert first.data.tags[tracking.PARAMS_DIGEST] == second.data.tags[tracking.PARAMS_DIGEST]
    client = mlflow.MlflowClient(tiny_params["mlflow"]["tracking_uri"])
    assert "params.yaml" in {a.path for a in client.list_artifacts(first.info.run_id)}

    splits = pd.read_parquet(partition / "splits.parquet")
    train_row = int(splits[splits["split"] == "train"]["row"].iloc[0])
    images = np.load(processed / "images.npy")
    images[train_row, 0, 0, 0] += 0.5
    np.save(processed / "images.npy", images)
    changed = _lineage_run(tiny_params, processed, partition)
    assert _dataset(changed).digest != dataset.digest

    retuned = {**tiny_params, "train": {**tiny_params["train"], "seed": 2}}
    assert _lineage_run(retuned, processed, partition).data.tags[tracking.PARAMS_DIGEST] != \
        first.data.tags[tracking.PARAMS_DIGEST]


def test_test_images_and_hospitals_are_not_in_the_training_digest(classification_data, tiny_params):
    """The digest is of what training sees: a test image changed, or the train rows dealt to other
    hospitals, leave it as it was (a federated and a centralized run on one split share it)."""
    import numpy as np

    processed, partition = classification_data
    before = tracking.training_dataset(tiny_params, processed, partition).digest
    splits = pd.read_parquet(partition / "splits.parquet")
    images = np.load(processed / "images.npy")
    images[int(splits[splits["split"] == "test"]["row"].iloc[0])] += 0.5
    np.save(processed / "images.npy", images)
    splits.assign(hospital=np.where(splits["hospital"] >= 0, 1 - splits["hospital"], -1)).to_parquet(
        partition / "splits.parquet")
    assert tracking.training_dataset(tiny_params, processed, partition).digest == before
    assert tracking.training_dataset(tiny_params, processed / "absent", partition) is None


def test_a_federated_run_logs_its_lineage(classification_data, tiny_params):
    """The ServerApp's run (records.Tracking): the same dataset digest as the centralized run."""
    from types import SimpleNamespace

    from fedbrain.federated.records import Tracking

    processed, partition = classification_data
    settings = SimpleNamespace(params=tiny_params, run_name="federated-classifier", processed=processed,
                               partition=partition)
    federated = Tracking(settings, None, {"training": "federated"})
    federated.finish()
    client = mlflow.MlflowClient(tiny_params["mlflow"]["tracking_uri"])
    run = client.get_run(federated.run_id)
    assert _dataset(run).digest == _dataset(_lineage_run(tiny_params, processed, partition)).digest
    assert run.data.tags[tracking.PARAMS_DIGEST] == tracking.params_digest(tiny_params, tracking.FEDERATED_SECTIONS)


def test_a_serverapp_without_the_data_logs_the_launchers_reference_of_it(classification_data, tiny_params):
    """The kubernetes ServerApp's pod holds no data: the launcher computes the dataset where the data is
    (tracking.dataset_reference, carried in the run config) and the ServerApp's run shows the same name,
    digest and source as a run that read the data itself."""
    from types import SimpleNamespace

    from fedbrain.federated.records import Tracking

    processed, partition = classification_data
    reference = tracking.dataset_reference(tracking.training_dataset(tiny_params, processed, partition))
    assert tracking.dataset_reference(None) == ""
    settings = SimpleNamespace(params=tiny_params, run_name="federated-classifier", processed=Path("/app/data/none"),
                               partition=Path("/app/data/none"), training_dataset=reference)
    pod = Tracking(settings, None, {"training": "federated"})
    pod.finish()
    client = mlflow.MlflowClient(tiny_params["mlflow"]["tracking_uri"])
    logged, local = _dataset(client.get_run(pod.run_id)), _dataset(_lineage_run(tiny_params, processed, partition))
    assert (logged.name, logged.digest, logged.source) == (local.name, local.digest, local.source)
    assert json.loads(logged.schema) == json.loads(local.schema)

    settings.training_dataset = ""  # neither the data nor a reference: no dataset, still a run
    bare = Tracking(settings, None, {"training": "federated"})
    bare.finish()
    assert client.get_run(bare.run_id).inputs.dataset_inputs == []


@pytest.mark.parametrize("name, shape", [("cnn", (32, 32, 3)), ("scatter", (32, 32, 1))])
def test_a_logged_model_carries_fedbrains_code_and_loads_where_fedbrain_is_not_installed(tmp_path, name, shape):
    """Logged without traced calls (a SavedModel's tracing cost the cnn ~4 s of CPU at the end of every
    run, the scatter classifier's Kymatio layer ~45 s): Keras rebuilds each layer from its class, which
    the MLflow model carries, and MLflow unpickles every class the logging process registered with Keras.
    Logged by a process that imports what a training run does (fedbrain.train registers its losses,
    metrics and Kymatio's layer) and not the other tests' models, then loaded by one that cannot import
    the installed fedbrain: the same predictions."""
    import subprocess
    import sys

    import numpy as np

    import fedbrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    np.save(tmp_path / "images.npy", np.random.default_rng(0).random((5, *shape), dtype=np.float32))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = f"""
import mlflow, numpy as np
from fedbrain import tracking, train
from fedbrain.models import build_model
model = build_model({name!r}, {shape!r}, 4)
with mlflow.start_run():
    model_id = tracking.log_tensorflow_model(model)
np.save({str(tmp_path / 'want.npy')!r}, model.predict(np.load({str(tmp_path / 'images.npy')!r}), verbose=0))
print(model_id)
"""
    done = subprocess.run([sys.executable, "-c", log], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model_uri = f"models:/{done.stdout.strip().splitlines()[-1]}"
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "downloaded")))
    assert (local / "code" / "fedbrain" / "tracking.py").is_file()
    requirements = (local / "requirements.txt").read_text()
    assert "tensorflow==" in requirements and "kymatio==" in requirements

    installed = str(Path(fedbrain.__file__).parent.parent)
    load = f"""
import importlib.util, json, sys
sys.path = [p for p in sys.path if p != {installed!r}]
assert importlib.util.find_spec("fedbrain") is None, "fedbrain is still importable"
import mlflow, numpy as np
loaded = mlflow.pyfunc.load_model({model_uri!r})
print(json.dumps({{"probabilities": np.asarray(loaded.predict(np.load({str(tmp_path / 'images.npy')!r}))).tolist(),
                  "fedbrain": sys.modules["fedbrain"].__file__}}))
"""
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["fedbrain"].startswith(installed)
    np.testing.assert_allclose(result["probabilities"], np.load(tmp_path / "want.npy"), atol=1e-5)
