"""MLflow helpers shared by centralized and federated runs.

One experiment per pipeline family (``mlflow.experiment``), tagged as a model-training experiment
(``mlflow.experimentKind``) so the MLflow UI opens it on its runs table; one run per trained model,
tagged ``task``, ``model``, ``training`` (centralized | federated) and ``privacy``. Every trainer logs
through ``metric_name`` so the MLflow UI can chart centralized epochs and federated rounds
together: ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``val_dice``,
``test_accuracy``, ``test_macro_f1``, ``test_dice``, ``test_hd95``...

Lineage: every training run logs the examples it fit on as an MLflow dataset input (context
``training``, the runs table's "Dataset" column) whose digest covers their ids, labels, pixels and
masks, the tag ``fedbrain.params_digest`` over the params.yaml sections that shaped the model, and
the params it ran with as the artifact ``params.yaml``.

The store: ``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` in params.yaml (default
a SQLite file in the working tree; open the UI with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow

from fedbrain.config import get

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "fedbrain"
# The experiment tag the MLflow 3 UI reads to choose its view; without it the UI guesses, and opens
# an experiment with no traces in its GenAI overview. "custom_model_development" is the UI's
# "custom model training" kind: the runs table, metrics and models (mlflow/server/js, 3.17).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_MAX_PARAM = 500  # MLflow caps parameter values; long lists are cut, not rejected
PARAMS_DIGEST = "fedbrain.params_digest"
# The params.yaml sections a trained model depends on: its dvc.yaml stage's params (a federated
# variant is already laid over them). Data settings are in the dataset's digest instead.
CENTRALIZED_SECTIONS = ("train", "privacy")
FEDERATED_SECTIONS = ("train", "privacy", "federated")
TRAINING_SPLITS = ("train", "val")  # val too: early stopping chooses the weights on it
_DIGEST_CHARS = 16  # MLflow stores at most 36 characters of a dataset digest
_ROWS_PER_READ = 512  # images hashed a slice at a time: the whole training set is never a second copy


def _section(params: dict) -> dict:
    sec = params.get("mlflow") or {}
    return sec if isinstance(sec, dict) else {}


def tracking_uri(params: dict) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or get(_section(params), "tracking_uri", str, "mlflow",
                                                          default=DEFAULT_URI)


def configure(params: dict) -> str:
    """Point MLflow at the store and experiment named by the environment or params; returns the URI."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or get(_section(params), "experiment", str, "mlflow",
                                                                 default=DEFAULT_EXPERIMENT)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        # A tracking server keeps the artifacts itself (`mlflow server` serves them): a local folder
        # named here would be a path on the server's disk that every client then writes to on its own.
        remote = uri.startswith(("http://", "https://"))
        artifacts = None if remote else _section(params).get("artifact_location")
        mlflow.create_experiment(experiment, artifact_location=artifacts, tags={EXPERIMENT_KIND: MODEL_TRAINING})
    elif EXPERIMENT_KIND not in (found.tags or {}):
        # Made before this tag (or by hand): a kind chosen in the UI is kept, a missing one is set.
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    mlflow.set_experiment(experiment)
    return uri


def absolute_uri(uri: str) -> str:
    """A local MLflow store made absolute: the federation's ServerApp runs in another working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return Path(uri[len("file:"):]).resolve().as_uri()
    if "://" not in uri and ":" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def absolute_params(params: dict) -> dict:
    """A copy of params with the MLflow store and artifact location absolute, the experiment created here
    (from the project root, so MLflow's default artifact root is not the federation's run folder)."""
    params = json.loads(json.dumps(params))
    mlflow_section = params.setdefault("mlflow", {})
    mlflow_section["tracking_uri"] = absolute_uri(tracking_uri(params))
    location = mlflow_section.get("artifact_location")
    if location and "://" not in str(location):
        mlflow_section["artifact_location"] = str(Path(location).resolve())
    configure(params)
    return params


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"classifier": {"epochs": 3}}} -> {"train.classifier.epochs": 3}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else value
            flat[name] = str(text)[:_MAX_PARAM] if isinstance(text, str) else text
    return flat


def metric_name(key: str) -> str:
    """Keras history key -> the shared metric name (``loss`` -> ``train_loss``, ``lr`` -> ``learning_rate``)."""
    if key == "lr":
        return "learning_rate"
    if key.startswith(("val_", "test_", "train_")):
        return key
    return f"train_{key}"


@contextmanager
def start_run(params: dict, run_name: str, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run in the configured store/experiment with all params (flattened) and tags logged.

    Nested under the active run when there is one (e.g. a federated server run).
    """
    configure(params)
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {}), nested=mlflow.active_run() is not None) as run:
        log_params({k: v for k, v in flatten(params).items() if not k.startswith("mlflow.")})
        yield run


def log_params(flat: dict[str, Any]) -> None:
    mlflow.log_params(flatten(flat))


def log_metrics(metrics: dict[str, float | None], step: int | None = None) -> None:
    """Log the numeric values (None, i.e. undefined, is skipped rather than logged as 0)."""
    clean = {k: float(v) for k, v in metrics.items() if v is not None and not isinstance(v, (dict, list, str))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_history(history: dict[str, list[float]], first_step: int = 0) -> None:
    """Per-epoch (or per-round) values as steps, under the shared metric names."""
    epochs = max((len(v) for v in history.values()), default=0)
    for i in range(epochs):
        log_metrics({metric_name(k): v[i] for k, v in history.items() if i < len(v)}, step=first_step + i)


def log_tensorflow_model(model) -> str:
    """The model as an MLflow TensorFlow model named "model" in the active run; its model id.

    Loadable by `mlflow.pyfunc.load_model` where fedbrain is not installed: the MLflow model carries
    fedbrain's source (code_paths), which MLflow puts on the path before it unpickles the classes
    this process registered with Keras (it saves all of them, whichever the model uses)."""
    # Bound to its own name: `import mlflow.tensorflow` here would make `mlflow` a local
    # of this function and break callers' later use of the module.
    from mlflow import tensorflow as mlflow_tensorflow
    import tensorflow as tf

    import fedbrain

    # Explicit requirements: inferring them re-loads the model in a subprocess (slow).
    requirements = [f"tensorflow=={tf.__version__}"]
    if "fedbrain.scattering" in sys.modules:  # its Kymatio layer is registered, hence pickled
        from importlib.metadata import version

        requirements.append(f"kymatio=={version('kymatio')}")
    if type(model).__module__.split(".")[0] == "fedbrain":
        # The network alone: a subclass's training step (e.g. PrivateModel's DP-SGD) has no config
        # Keras could rebuild it from, and inference does not use it.
        model = tf.keras.Model(model.inputs, model.outputs, name=model.name)
    own = {tf.keras.utils.get_registered_name(cls): cls for cls in own_layers(model)}
    # No traced calls: Keras rebuilds every layer from its config and class. Tracing is what a
    # SavedModel costs: the cnn's ~4 s of CPU at the end of every run (0.6 s without), the scatter
    # classifier's Kymatio layer (~2,000 ops) 45 s at the end of the secure variant's run.
    return mlflow_tensorflow.log_model(model, name="model", pip_requirements=requirements,
                                       keras_model_kwargs={"save_traces": False}, custom_objects=own or None,
                                       code_paths=[str(Path(fedbrain.__file__).parent)]).model_id


def own_layers(model) -> list[type]:
    """fedbrain's own layer classes in `model` (nested models included), by name."""
    import tensorflow as tf

    found = {type(m) for m in model.submodules if isinstance(m, tf.keras.layers.Layer)}
    return sorted((cls for cls in found if cls.__module__.split(".")[0] == "fedbrain"), key=lambda c: c.__name__)


def log_keras_model(params: dict, model, path: Path | None = None) -> None:
    """The model as an MLflow TensorFlow model (``mlflow.log_models: false`` skips it), plus its card."""
    if get(_section(params), "log_models", bool, "mlflow", default=True):
        log_tensorflow_model(model)
    if path is not None and Path(path).with_suffix(".json").is_file():
        mlflow.log_artifact(str(Path(path).with_suffix(".json")), artifact_path="card")


def log_to_run(params: dict, run_id: str | None, run_name: str, tags: dict[str, str],
               metrics: dict[str, float | None], artifacts: list[Path]) -> str:
    """Add test metrics and artifacts to a model's training run (a new run when it is unknown)."""
    configure(params)
    run = None
    if run_id:
        try:
            run = mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run = None  # trained against another store: record the evaluation on its own
    kwargs = {"run_id": run.info.run_id} if run else {"run_name": run_name, "tags": tags}
    with mlflow.start_run(**kwargs) as active:
        log_metrics(metrics)
        for artifact in artifacts:
            if Path(artifact).is_file():
                mlflow.log_artifact(str(artifact), artifact_path="evaluation")
        return active.info.run_id


def params_digest(params: dict, sections: tuple[str, ...]) -> str:
    """A short hash of the named params sections: equal digests, equally configured training."""
    chosen = json.dumps({name: params.get(name) for name in sections}, sort_keys=True, default=str)
    return hashlib.sha256(chosen.encode()).hexdigest()[:_DIGEST_CHARS]


def training_dataset(params: dict, processed: Path, partition: Path):
    """The train and val examples every trainer fits on, as an MLflow dataset named
    ``<data.root folder>-train``; None when the data is not on this machine (the kubernetes
    ServerApp's pod holds none).

    The digest covers the rows' ids, patients, labels and split, and their pixels and masks, so it
    changes with the data itself and not with where hospitals hold it: a centralized and a federated
    run on one partition show one digest. Reading the training images once costs about what
    loading them for training does.
    """
    import numpy as np
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    processed, partition = Path(processed), Path(partition)
    splits_path = partition / "splits.parquet"
    if not (splits_path.is_file() and (processed / "images.npy").is_file()):
        return None
    frame = pd.read_parquet(splits_path, columns=["row", "image_id", "patient_id", "label", "split", "hospital"])
    frame = frame[frame["split"].isin(TRAINING_SPLITS)].sort_values("row").reset_index(drop=True)
    digest = hashlib.sha256(frame.drop(columns="hospital").to_csv(index=False).encode())
    rows = frame["row"].to_numpy(dtype=np.int64)
    for name in ("images.npy", "masks.npy"):
        if not (processed / name).is_file():
            continue
        array = np.load(processed / name, mmap_mode="r")
        digest.update(f"{name} {array.dtype} {array.shape[1:]}".encode())
        for start in range(0, len(rows), _ROWS_PER_READ):
            digest.update(np.ascontiguousarray(array[rows[start:start + _ROWS_PER_READ]]).tobytes())
    root = get(params.get("data") or {}, "root", str, "data", default="brain-tumor-mri")
    with warnings.catch_warnings():
        # A local path matches two equal source classes; MLflow warns and takes either.
        warnings.simplefilter("ignore", UserWarning)
        return from_pandas(frame, source=processed.resolve().as_uri(), targets="label",
                           name=f"{Path(root).name}-train", digest=digest.hexdigest()[:_DIGEST_CHARS])


def dataset_reference(dataset) -> str:
    """A training dataset as JSON text (name, digest, source, schema): what a process without the data
    (the kubernetes ServerApp's pod) needs to log the same dataset (`referenced_dataset`); "" for None."""
    if dataset is None:
        return ""
    return json.dumps({"name": dataset.name, "digest": dataset.digest, "source": dataset.source.uri,
                       "schema": dataset.schema.to_json() if dataset.schema is not None else None})


def referenced_dataset(text: str):
    """The dataset `dataset_reference` described, as an MLflow MetaDataset: the same name, digest and
    source in the runs table, without reading the data."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema

    described = json.loads(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # as in training_dataset: two equal local source classes
        source = resolve_dataset_source(described["source"])
    schema = Schema.from_json(described["schema"]) if described.get("schema") else None
    return MetaDataset(source, name=described["name"], digest=described["digest"], schema=schema)


def log_lineage(params: dict, dataset, sections: tuple[str, ...]) -> None:
    """In the active run: the training dataset (when known), the params digest and params.yaml."""
    mlflow.set_tag(PARAMS_DIGEST, params_digest(params, sections))
    # The params as this run saw them (a variant laid over params.yaml), without the store's address.
    mlflow.log_dict({k: v for k, v in params.items() if k != "mlflow"}, "params.yaml")
    if dataset is not None:
        with warnings.catch_warnings():
            # The schema's hint that integer columns (row, hospital) hold no missing value: none do.
            warnings.simplefilter("ignore", UserWarning)
            mlflow.log_input(dataset, context="training")
