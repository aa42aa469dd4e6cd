"""The run's global models as the rounds finish them (server_app.py's round loop).

A round's exchange completes two global models at once (see server_app's docstring): the evaluation
of one and the pooled statistics of the next. `GlobalModels` completes, checkpoints and logs them
while the following exchange is out; `report_round` is the console line of a finished round.
"""

from __future__ import annotations

from dataclasses import asdict
from logging import INFO, WARNING

from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedbrain.federated.records import (Checkpoints, Evaluation, RoundRecord, Tracking, fitted_temperature,
                                       merge_evaluation)
from fedbrain.federated.task import (RunSettings, batch_norm_layers, set_batch_norm_statistics, weights_of)


class GlobalModels:
    """The run's global models and records as the rounds finish them (see the module docstring)."""

    def __init__(self, settings: RunSettings, model, checkpoints: Checkpoints, tracking: Tracking, state: dict):
        self.settings, self.model, self.checkpoints, self.tracking, self.state = (
            settings, model, checkpoints, tracking, state)
        self.last_round = settings.rounds  # earlier when the privacy budget ends the run
        self.temperature: dict = {}  # the last model's, for its card (fitted_temperature)
        # A resumed run evaluates again the global model of the round it resumes after. The interrupted
        # run may have logged that evaluation already (its next exchange's replies arrived, its
        # checkpoint did not): that step's val_* go to MLflow only if it holds none yet.
        self.resumed_round = state["round"] or None

    def record_of(self, server_round: int) -> dict:
        return self.state["rounds"][server_round - 1] if server_round >= 1 else self.state["initial"]

    def evaluated(self, evaluation: Evaluation | None) -> None:
        if evaluation is None:
            return
        merge_evaluation(self.record_of(evaluation.round), evaluation)
        logged = self._logged_before_resume(evaluation.round)
        if evaluation.nll_by_temperature and (fitted := fitted_temperature(evaluation)):
            self.temperature = fitted
            if not logged:
                self.tracking.log({"temperature": fitted["temperature"]}, evaluation.round)
        if evaluation.round >= 1 and not logged:
            self.tracking.log(RoundRecord(**self.record_of(evaluation.round)).val_metrics(), evaluation.round)

    def _logged_before_resume(self, step: int) -> bool:
        if step != self.resumed_round:  # None unless resumed, and only that round's evaluation
            return False
        from mlflow import MlflowClient

        keys = RoundRecord(**self.record_of(step)).val_metrics()
        client = MlflowClient()
        return any(m.step == step for key in keys for m in client.get_metric_history(self.tracking.run_id, key))

    def complete(self, record: RoundRecord | None, arrays: ArrayRecord, pooled: list | None,
                 server_round: int) -> None:
        """The global model of `server_round`: its weights with the pooled statistics, and its
        round's record stored (None: the initial model, or a resumed round already on record)."""
        self.model.set_weights(weights_of(arrays, self.model))
        if pooled is not None:
            set_batch_norm_statistics(self.model, pooled)
        elif batch_norm_layers(self.model):
            log(WARNING, "round %d: no hospital returned BatchNormalization statistics; keeping FedAvg's average",
                server_round)
        if record is not None and server_round >= 1:
            self.state["rounds"].append(asdict(record))

    def save(self, server_round: int, log_round: bool) -> None:
        """Checkpoint the completed global model of `server_round` with the run's state; log its
        round's figures if `log_round` (the last round's are logged with its evaluation)."""
        self.state["round"] = server_round
        self.checkpoints.save(self.model, server_round, self.state)
        if log_round and server_round < self.last_round:
            self.tracking.log(RoundRecord(**self.record_of(server_round)).round_metrics(), server_round)
            report_round(self.settings, self.state)

    def finish(self, evaluation: Evaluation | None, record: RoundRecord | None, arrays: ArrayRecord,
               pooled: list | None, server_round: int) -> None:
        """What an exchange's replies complete: the evaluation of one global model and the next
        global model, checkpointed (see `complete`). Runs while the next exchange is out."""
        self.evaluated(evaluation)
        self.complete(record, arrays, pooled, server_round)
        if server_round >= 1:
            self.save(server_round, log_round=record is not None)


def report_round(settings: RunSettings, state: dict) -> None:
    record = RoundRecord(**state["rounds"][-1])
    previous = state["rounds"][-2] if len(state["rounds"]) > 1 else state["initial"]
    log(INFO, "[%s] round %d done in %.1f s (slowest hospital trained %.1f s, overhead %.1f%%): %s; "
        "previous global model: %s; hospitals %s; failures %d", settings.role, record.round, record.wall_time_s,
        record.slowest_training_s, 100 * record.overhead, _fmt(record.metrics), _fmt(previous["metrics"], "val_"),
        sorted(record.hospitals), len(record.failures))


def _fmt(metrics: dict, prefix: str = "") -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(prefix)) or "-"
