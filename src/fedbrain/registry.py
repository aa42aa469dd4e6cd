"""The MLflow Model Registry: what ``fedbrain evaluate`` registers and ``fedbrain predict`` loads.

Every model evaluate compares is a version of ``fedbrain-classifier`` or ``fedbrain-segmenter``,
one per trained variant (a model registered before keeps its version; its tags are refreshed), and
the alias ``champion`` names the version with the best test macro F1 (classifier) or Dice
(segmenter) of that evaluation. A version is the MLflow model its training run logged (or, when it
logged none, one logged at evaluation) with the files evaluate measured added as
``fedbrain/<name>.keras`` and ``fedbrain/<name>.json``: what predict loads (the card holds the class
names; the MLflow model's own copy is a SavedModel under TensorFlow 2.15). The registry lives in the
tracking store (the default SQLite file).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow

from fedbrain import tracking
from fedbrain.errors import InputError

# task -> (registered model, the test metric its champion is chosen by)
REGISTERED = {"classification": ("fedbrain-classifier", "macro_f1"),
              "segmentation": ("fedbrain-segmenter", "dice")}
CHAMPION = "champion"
SCHEME = "models:/"
_MODEL = "model"  # the name training runs log their MLflow model under (tracking.log_keras_model)
FILES = "fedbrain"  # the version's folder holding <name>.keras and its card <name>.json


def is_registry_uri(model: str | Path) -> bool:
    return str(model).startswith(SCHEME)


def variant(run: str) -> str:
    """evaluate's run name -> the variant: "federated/secure/classifier" -> "federated/secure"."""
    return run.rsplit("/", 1)[0] if "/" in run else run


def _logged_model_id(client: mlflow.MlflowClient, run_id: str) -> str | None:
    """The MLflow model the run logged last under ``_MODEL``, if any."""
    run = client.get_run(run_id)
    found = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                     filter_string=f"name = '{_MODEL}'")
             if m.source_run_id == run_id]
    return max(found, key=lambda m: m.creation_timestamp).model_id if found else None


def _log_model(run_id: str, path: Path) -> str:
    """Log the .keras file to the run as an MLflow model (its training logged none); its model id."""
    from fedbrain.models import load as load_model

    model = load_model(path)
    with mlflow.start_run(run_id=run_id):
        return tracking.log_tensorflow_model(model)


def _version(client: mlflow.MlflowClient, name: str, model: dict, tags: dict[str, str]) -> str:
    """The version of ``name`` holding this evaluated model (made if new), tagged; its number."""
    model_id = _logged_model_id(client, model["run_id"]) or _log_model(model["run_id"], model["path"])
    for path in (Path(model["path"]), Path(model["path"]).with_suffix(".json")):
        if path.is_file():  # a segmenter may have no card
            client.log_model_artifact(model_id, str(path), artifact_path=FILES)
    # The SQL store keeps the source URI, not the model id, of a version.
    source = f"{SCHEME}{model_id}"
    existing = [v for v in client.search_model_versions(f"name = '{name}'")
                if v.source == source or v.model_id == model_id]
    if existing:
        number = existing[0].version
    else:
        number = mlflow.register_model(source, name).version
    for key, value in tags.items():
        client.set_model_version_tag(name, number, key, value)
    return str(number)


def register(params: dict, models: list[dict]) -> dict[str, str]:
    """Register evaluated models and set each registered model's champion; {name: champion version}.

    ``models``: one dict per evaluated model: run (evaluate's name), task, run_id (its MLflow run),
    path (the .keras file), metrics (test metrics), training, privacy, epsilon.
    """
    tracking.configure(params)
    client = mlflow.MlflowClient()
    champions = {}
    for task, (name, metric) in REGISTERED.items():
        scored = []
        for model in (m for m in models if m["task"] == task):
            score = model["metrics"].get(metric)
            tags = {"variant": variant(model["run"]), "training": str(model["training"]),
                    "privacy": str(model["privacy"]), metric: "" if score is None else f"{score:.6f}"}
            if model.get("epsilon") is not None:
                tags["epsilon"] = f"{model['epsilon']:.4g}"
            number = _version(client, name, model, tags)
            if score is not None and math.isfinite(score):
                scored.append((score, number))
        if scored:
            # max keeps the first of equal scores: evaluate's order, the centralized model first.
            best, champions[name] = max(scored, key=lambda pair: pair[0])
            client.set_registered_model_alias(name, CHAMPION, champions[name])
            print(f"registry: {name} version {champions[name]} is @{CHAMPION} ({metric} {best:.4f})")
    return champions


def fetch(params: dict, uri: str, dst: Path) -> Path:
    """A registered model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``) downloaded
    into ``dst``: the path of its .keras file, with its card beside it as predict reads a model."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking.tracking_uri(params))
    try:
        local = Path(download_artifacts(artifact_uri=uri, dst_path=str(dst / "download")))
    except MlflowException as exc:
        raise InputError(f"{uri}: not found in the model registry at {mlflow.get_tracking_uri()} "
                         f"({exc.message}); run fedbrain evaluate to register the trained models") from exc
    found = sorted((local / FILES).glob("*.keras"))
    if len(found) != 1:
        raise InputError(f"{uri}: holds {len(found)} {FILES}/*.keras files, expected one; "
                         "register it again with fedbrain evaluate")
    return found[0]  # its card, when it has one, beside it
