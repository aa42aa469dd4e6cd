"""What a federated run keeps: each round's record, the global model of every round (resume reads
it), and the run's MLflow run, with the centralized run's metric names."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fedbrain.dataset import write_text_atomic
from fedbrain.federated.task import RunSettings
from fedbrain.secure.audit import AuditLog


@dataclass
class RoundRecord:
    round: int
    nodes_online: int
    wall_time_s: float = 0.0       # from the round's start to the next round's
    train_phase_s: float = 0.0
    calibration_phase_s: float = 0.0  # only the last round has a calibration exchange of its own
    decryption_phase_s: float = 0.0   # encrypted aggregation: adding ciphertexts and shared decryption
    evaluate_phase_s: float = 0.0     # only the last round has an evaluation exchange of its own
    bytes_down: int = 0
    bytes_up: int = 0
    metrics: dict = field(default_factory=dict)     # train_*, local_val_*, val_*: averaged over hospitals
    hospitals: dict = field(default_factory=dict)   # "<k>" -> examples, train_time_s, its metrics
    failures: list = field(default_factory=list)    # {hospital, node_id, phase, reason}
    # {hospital, round, reason, node_id, what}: updates left out of the average (update_checks.py)
    rejections: list = field(default_factory=list)

    @property
    def slowest_training_s(self) -> float:
        return max((h.get("train_time_s", 0.0) for h in self.hospitals.values()), default=0.0)

    @property
    def overhead(self) -> float:
        """Share of the round not spent in the slowest hospital's training: orchestration cost."""
        return (self.wall_time_s - self.slowest_training_s) / self.wall_time_s if self.wall_time_s else 0.0

    def round_metrics(self) -> dict[str, float]:
        """Everything but the global model's val_* (those arrive two rounds later)."""
        flat = {k: v for k, v in self.metrics.items() if not k.startswith("val_")}
        flat.update({"round_time_s": self.wall_time_s, "train_phase_s": self.train_phase_s,
                     "calibration_phase_s": self.calibration_phase_s,
                     "decryption_phase_s": self.decryption_phase_s,
                     "bytes_down": self.bytes_down, "bytes_up": self.bytes_up,
                     "nodes_online": self.nodes_online,
                     "nodes_trained": sum(1 for h in self.hospitals.values() if "train_time_s" in h),
                     "nodes_failed": len(self.failures), "nodes_rejected": len(self.rejections),
                     "slowest_training_s": self.slowest_training_s,
                     "orchestration_overhead": self.overhead})
        for k, values in self.hospitals.items():
            flat.update({f"hospital_{k}/{name}": value for name, value in values.items()
                         if not name.startswith("val_")})
        return flat

    def val_metrics(self) -> dict[str, float]:
        flat = {k: v for k, v in self.metrics.items() if k.startswith("val_")}
        for k, values in self.hospitals.items():
            flat.update({f"hospital_{k}/{name}": value for name, value in values.items()
                         if name.startswith("val_")})
        return flat


@dataclass
class Evaluation:
    """The hospitals' val_* of one global model (round 0: the initial one), averaged and each."""
    round: int
    metrics: dict = field(default_factory=dict)
    hospitals: dict = field(default_factory=dict)
    # The pooled mean validation NLL per reliability.TEMPERATURES, when the evaluation asked for it
    nll_by_temperature: list | None = None


def fitted_temperature(evaluation: Evaluation) -> dict:
    """The model card's temperature (fedbrain.reliability) from an evaluation's pooled validation NLL;
    {} when it cannot be fitted (no validation images)."""
    from fedbrain.reliability import choose_temperature

    images = sum(int(h.get("val_examples", 0)) for h in evaluation.hospitals.values())
    try:
        temperature = choose_temperature(evaluation.nll_by_temperature)
    except ValueError:
        return {}
    return {"temperature": temperature,
            "temperature_fitted_on": f"validation split ({images} images at {len(evaluation.hospitals)} hospitals, "
                                     f"their NLL pooled by the server)"}


def merge_evaluation(target: dict, evaluation: Evaluation) -> None:
    """Add an evaluation's val_* (metrics and per hospital) to a stored round record."""
    target["metrics"].update(evaluation.metrics)
    for k, values in evaluation.hospitals.items():
        target["hospitals"].setdefault(k, {}).update(values)


class Checkpoints:
    """`out/checkpoints/<role>/`: the global model of every round and the run's state so far."""

    def __init__(self, out: Path, role: str):
        self.dir = out / "checkpoints" / role
        self.state_path = self.dir / "state.json"

    def model_path(self, server_round: int) -> Path:
        return self.dir / f"round_{server_round}.keras"

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def latest(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        return state if self.model_path(state["round"]).is_file() else None

    def save(self, model, server_round: int, state: dict) -> None:
        """The round's model first, then the state naming it: a crash leaves the previous pair valid."""
        path = self.model_path(server_round)
        tmp = path.with_name(f".round_{server_round}.tmp.keras")
        model.save(tmp)
        os.replace(tmp, path)
        self.save_state(state)

    def save_state(self, state: dict) -> None:
        write_text_atomic(self.state_path, json.dumps(state, indent=1))


class Tracking:
    """One MLflow run per federated training, through fedbrain.tracking (the centralized run's names)."""

    def __init__(self, settings: RunSettings, run_id: str | None, tags: dict[str, str]):
        import mlflow

        from fedbrain import tracking

        self.mlflow, self.tracking, self.settings = mlflow, tracking, settings
        tracking.configure(settings.params)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(run_name=settings.run_name, tags=tags)
            tracking.log_params({k: v for k, v in tracking.flatten(settings.params).items()
                                 if not k.startswith("mlflow.")})
            # The pooled train and val rows the hospitals' shares add up to: the centralized run's digest.
            dataset = tracking.training_dataset(settings.params, settings.processed, settings.partition)
            if dataset is None and settings.training_dataset:  # a pod without the data: the launcher's digest
                dataset = tracking.referenced_dataset(settings.training_dataset)
            tracking.log_lineage(settings.params, dataset, tracking.FEDERATED_SECTIONS)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def log_params(self, values: dict) -> None:
        self.tracking.log_params(values)

    def log(self, metrics: dict, step: int) -> None:
        self.tracking.log_metrics(metrics, step=step)

    def finish_run(self, model, path: Path, failures: list[dict], state: dict, audit: AuditLog) -> None:
        """Failures as a metric, a tag and a file; the rounds' records; the audit log, with its entry
        count and last hash as tags (the anchor that shows a cut tail); the model and its card."""
        self.tracking.log_metrics({"failures": len(failures)})
        self.mlflow.set_tag("failures", str(len(failures)))
        entries, last = audit.head()
        self.mlflow.set_tags({"audit_entries": str(entries), "audit_last_sha256": last})
        self.mlflow.log_artifact(str(audit.path), artifact_path="audit")
        self.mlflow.log_dict({"failures": failures, "initial": state["initial"], "rounds": state["rounds"]},
                             "federation/rounds.json")
        if self.settings.params.get("mlflow", {}).get("log_models", True):
            self.tracking.log_keras_model(self.settings.params, model, path)
        else:
            self.mlflow.log_artifact(str(path.with_suffix(".json")), artifact_path="card")

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def history_of(records: list[dict]) -> dict[str, list[float]]:
    """{metric: [value per round]}, the shape of the centralized run's per-epoch history."""
    names = sorted({k for r in records for k in r["metrics"]})
    return {name: [r["metrics"].get(name) for r in records] for name in names}
