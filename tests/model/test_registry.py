"""fedbrain.registry: evaluated models registered in a real MLflow SQLite store, the champion alias,
and predict from a ``models:/`` URI."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from fedbrain import registry, tracking
from fedbrain.cli import main
from fedbrain.errors import InputError
from fedbrain.models import build_model
from fedbrain.predict import run as predict
from fedbrain.train import save_model

CLASSES = ["glioma", "meningioma", "notumor"]


def _trained(params, models, run, log_model=True, seed=0):
    """A classifier saved as training saves it, with its training run (MLflow model logged or not)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    path = models / f"{run}.keras"
    with tracking.start_run(params, run.replace("/", "-"), {"training": run.split("/")[0]}) as active:
        model = build_model("cnn", (32, 32, 1), len(CLASSES))
        save_model(model, path, {"task": "classification", "classes": CLASSES, "run_id": active.info.run_id})
        if log_model:
            tracking.log_keras_model(params, model, path)
    return path, active.info.run_id


def _evaluated(path, run_id, run, macro_f1, epsilon=None):
    return {"run": run, "task": "classification", "run_id": run_id, "path": path, "training": run.split("/")[0],
            "privacy": "example" if epsilon else "none", "epsilon": epsilon, "metrics": {"macro_f1": macro_f1}}


@pytest.fixture
def registered(tiny_params, tmp_path):
    """Two classifier variants evaluated: the federated one better; its training logged no MLflow model."""
    models = tmp_path / "models"
    central = _trained(tiny_params, models, "centralized/classifier")
    federated = _trained(tiny_params, models, "federated/secure/classifier", log_model=False, seed=1)
    evaluated = [_evaluated(*central, "centralized/classifier", 0.61),
                 _evaluated(*federated, "federated/secure/classifier", 0.74, epsilon=7.93)]
    return evaluated, registry.register(tiny_params, evaluated)


def test_the_better_variant_is_champion_and_re_registering_adds_no_version(registered, tiny_params):
    evaluated, champions = registered
    client = mlflow.MlflowClient(tiny_params["mlflow"]["tracking_uri"])
    champion = client.get_model_version_by_alias("fedbrain-classifier", "champion")
    assert champions == {"fedbrain-classifier": str(champion.version)}
    assert champion.tags == {"variant": "federated/secure", "training": "federated", "privacy": "example",
                             "macro_f1": "0.740000", "epsilon": "7.93"}
    assert champion.run_id == evaluated[1]["run_id"]
    versions = client.search_model_versions("name = 'fedbrain-classifier'")
    assert len(versions) == 2
    other, = [v for v in versions if v.version != champion.version]
    assert other.tags["variant"] == "centralized" and "epsilon" not in other.tags
    assert "fedbrain-segmenter" not in {m.name for m in client.search_registered_models()}

    # The next evaluation of the same models ranks them the other way: same versions, champion moves.
    evaluated[0]["metrics"]["macro_f1"] = 0.9
    assert registry.register(tiny_params, evaluated) == {"fedbrain-classifier": str(other.version)}
    assert len(client.search_model_versions("name = 'fedbrain-classifier'")) == 2
    assert client.get_model_version("fedbrain-classifier", other.version).tags["macro_f1"] == "0.900000"


def test_predict_from_the_registry_equals_predict_from_the_file(registered, tiny_params, tmp_path, capsys):
    evaluated, _ = registered
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 48), dtype=np.uint8)).save(image)
    from_file = predict(tiny_params, evaluated[1]["path"], [str(image)])
    from_registry = predict(tiny_params, "models:/fedbrain-classifier@champion", [str(image)])
    assert from_registry == from_file and set(from_registry[0]["probabilities"]) == set(CLASSES)
    by_version = predict(tiny_params, "models:/fedbrain-classifier/1", [str(image)])
    assert by_version == predict(tiny_params, evaluated[0]["path"], [str(image)])
    with pytest.raises(InputError, match="models:/fedbrain-classifier@retired: not found in the model registry"):
        predict(tiny_params, "models:/fedbrain-classifier@retired", [str(image)])

    # The command line takes the URI as --model; stdout stays the JSON alone (MLflow talks on stderr).
    capsys.readouterr()
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    result = CliRunner(mix_stderr=False).invoke(main, ["predict", "--params", str(params_file), "--model",
                                       "models:/fedbrain-classifier@champion", str(image)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == from_file
