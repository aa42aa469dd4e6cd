"""Personalized models (`federated.personalization: fedbn | local_head`): layers that stay at a hospital.

  fedbn       every normalisation layer (BatchNormalization: scale, offset and moving statistics;
              GroupNormalization in the DP forms: scale and offset) is the hospital's own (FedBN, Li et
              al. 2021): scanners and case mix shift feature statistics between hospitals, and a
              hospital normalises with its own. No statistics exchange either: a hospital's
              statistics describe its own layers, so the server pools none.
  local_head  the network's output layer (the classifier's softmax Dense, the U-Net's 1x1 mask
              convolution) is the hospital's own (FedPer, Arivazhagan et al. 2019): the body is
              shared, each hospital maps it to its own label mix.

How it fits the round loop: the weights travel as one flat vector (task.weights_record) whose layout
every layer of the loop relies on (update checks, Paillier, server optimizers). A hospital keeps its
personal layers' values in its ClientApp process (`HospitalLayers`), trains with them in place of the
received ones, and sends back its trained vector with the personal positions holding *the values it
received*: the server's average of those positions is its own values again, its update there is 0 (so
under Paillier too), and nothing of the hospital's personal layers leaves it. The server's global model
therefore keeps its initial values there (fedbn: untrained normalisation; local_head: an untrained output
layer): it is the shared part, and each hospital's personalized model is the global model with the
hospital's own layers, which the hospital saves (`save`) when the server marks the run's last model.

A hospital that restarts or joins mid-run starts its personal layers from the received values, as it
starts its optimizer state afresh (client_app._model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedbrain.dataset import hospital_dir
from fedbrain.errors import InputError

PERSONALIZATION = ("none", "fedbn", "local_head")
# The folder of hospital k's personalized models under the run's output folder (evaluate finds them there).


def personal_variables(model, mode: str) -> list[int]:
    """Indices into model.weights (the order of get_weights / weights_record) that stay at the hospital."""
    import tensorflow as tf

    if mode == "none":
        return []
    if mode == "fedbn":
        kinds = (tf.keras.layers.BatchNormalization, tf.keras.layers.GroupNormalization,
                 tf.keras.layers.LayerNormalization)
        layers = [m for m in model.submodules if isinstance(m, kinds)]
        if not layers:
            raise InputError(f"federated.personalization fedbn keeps the normalisation layers at each hospital, but "
                             f"model {model.name!r} has none; use local_head or none")
    elif mode == "local_head":
        layers = [model.layers[-1]]
        if not layers[0].weights:
            raise InputError(f"federated.personalization local_head keeps the output layer at each hospital, but "
                             f"model {model.name!r}'s last layer {layers[0].name!r} has no weights; use fedbn or none")
    else:
        raise InputError(f"federated.personalization is {mode!r}; use one of {', '.join(PERSONALIZATION)}")
    personal = {id(v) for layer in layers for v in layer.weights}
    return [i for i, v in enumerate(model.weights) if id(v) in personal]


class HospitalLayers:
    """One hospital's personal layers over a run (kept in its ClientApp process)."""

    def __init__(self, model, mode: str):
        self.mode = mode
        self.indices = personal_variables(model, mode)
        self.own: list[np.ndarray] | None = None  # None until the hospital has trained once
        self.trained_round = 0  # the last round the hospital trained its own layers in

    @property
    def active(self) -> bool:
        return bool(self.indices)

    @property
    def pools_statistics(self) -> bool:
        """Whether the hospital measures BatchNormalization statistics for the server to pool (not under
        fedbn, where they belong to its own layers)."""
        return self.mode != "fedbn"

    def localize(self, received: list[np.ndarray]) -> list[np.ndarray]:
        """The received global weights with this hospital's own layers in place."""
        if not self.active or self.own is None:
            return list(received)
        weights = list(received)
        for i, value in zip(self.indices, self.own):
            weights[i] = value
        return weights

    def keep(self, trained: list[np.ndarray], server_round: int) -> None:
        """Remember the personal layers of the weights this hospital just trained in `server_round`."""
        if self.active:
            self.own = [np.array(trained[i], copy=True) for i in self.indices]
            self.trained_round = server_round

    def outgoing(self, trained: list[np.ndarray], received: list[np.ndarray]) -> list[np.ndarray]:
        """What leaves the hospital: the trained weights, with the personal layers as received."""
        if not self.active:
            return trained
        weights = list(trained)
        for i in self.indices:
            weights[i] = received[i]
        return weights


def hospital_model_path(out: Path, hospital: int, role: str) -> Path:
    return hospital_dir(out, hospital) / f"{role}.keras"


def save(weights: list[np.ndarray], settings, hospital: int, server_round: int, privacy_report: dict) -> Path:
    """Hospital `hospital`'s personalized model (the global model of `server_round` with its own layers)
    and its card, beside the run's global model (`hospital_<k>/<role>.keras`; on Kubernetes in the
    hospital's own pod, `settings.hospital_out`, whence the launcher copies it beside the global model);
    run_id is none: its evaluation is its own MLflow run, not the federated run's."""
    from fedbrain.federated.task import build
    from fedbrain.train import save_model

    model = build(settings, compiled=False)  # the plain network (no DP-SGD wrapper): what evaluate loads
    model.set_weights(weights)
    card = {"task": settings.task, "model": settings.model, "training": "federated",
            "privacy": settings.privacy.mode, "epsilon": privacy_report.get("epsilon"),
            "delta": privacy_report.get("delta"),
            # A hospital knows its own epsilon only; the shared layers also carry the other hospitals'
            # (the federated run's card holds the largest).
            "epsilon_scope": "this hospital's images" if privacy_report.get("epsilon") is not None else None, "classes": settings.class_info()["classes"], "run_id": None,
            "aggregation": "paillier" if settings.encrypted else "fedavg", "strategy": settings.strategy.name,
            "personalization": settings.personalization, "hospital": hospital, "round": server_round,
            "federated_run": settings.run_name}
    path = hospital_model_path(settings.hospital_out or settings.out, hospital, settings.role)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, card)
    return path
