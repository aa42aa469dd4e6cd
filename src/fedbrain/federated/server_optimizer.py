"""Server-side optimizers (`federated.strategy: fedavgm | fedadam`) on the round's average.

FedAvgM (Hsu et al. 2019) and FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization") treat
the round's pseudo-gradient, the global weights sent minus the examples-weighted average of the
hospitals' updates, as a gradient for a server optimizer. The round loop produces that average in
two ways (HospitalFedAvg.aggregate_train in the clear; validation.average_encrypted from the
decrypted Paillier sum), so the optimizer acts after both, on the plaintext average the server
holds either way: one step per round, `ServerOptimizer.step`.

The update rules are Flower's own (flwr.serverapp.strategy.FedAvgM.aggregate_train and
FedAdam.aggregate_train with FedOpt._compute_deltat_and_mt, Flower 1.23), rewritten here because
Flower's classes run them only inside their aggregate_train, on the replies of a round: they would
average again and step every position of the vector. Here only the trainable positions move
(task.trainable_positions): the rest are BatchNormalization moving statistics, which the pooled
statistics replace in every global model anyway, and which under Paillier the hospitals do not
even send. tests/federated/test_strategies.py checks these lines against Flower's classes driven
through their aggregate_train.

The optimizer's state (FedAvgM's momentum, FedAdam's moments) is saved beside the round checkpoints
after every step (`server_optimizer_round_<r>.npz`, atomically), so `--resume` continues it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from fedbrain.federated.settings import StrategySettings

STATE_FILE = re.compile(r"server_optimizer_round_(\d+)\.npz")


class ServerOptimizer:
    """The round's new global weights from the weights sent and the hospitals' average.

    fedavg and fedprox: the average itself. fedavgm and fedadam: one optimizer step from the weights
    sent along the pseudo-gradient (sent - average), on the trainable positions of the flat vector."""

    def __init__(self, settings: StrategySettings, trainable: np.ndarray, directory: Path | None = None):
        self.settings, self.trainable, self.directory = settings, np.asarray(trainable, bool), directory
        self.state: dict[str, np.ndarray] = {}  # momentum | m, v: over the trainable positions

    @property
    def active(self) -> bool:
        return self.settings.name in ("fedavgm", "fedadam")

    def step(self, sent: ArrayRecord, averaged: ArrayRecord, server_round: int) -> ArrayRecord:
        if not self.active:
            return averaged
        (old,), (new,) = sent.to_numpy_ndarrays(), averaged.to_numpy_ndarrays()
        moved = self._update(old[self.trainable], new[self.trainable], server_round)
        result = new.copy()  # the untrainable positions keep the average
        result[self.trainable] = moved
        self.save(server_round)
        return ArrayRecord([result.astype(np.float32, copy=False)])

    def _update(self, old: np.ndarray, new: np.ndarray, server_round: int) -> np.ndarray:
        s = self.settings
        if s.name == "fedavgm":
            # FedAvgM.aggregate_train: PyTorch's SGD momentum convention, the buffer starting at the
            # first pseudo-gradient. Momentum 0 at rate 1 is FedAvg: Flower then returns the average
            # untouched (old - (old - new) can differ from new in the last bit), and so does this.
            if s.server_momentum == 0.0 and s.server_learning_rate == 1.0:
                return new
            pseudo_gradient = old - new
            if s.server_momentum > 0.0:
                momentum = self.state.get("momentum")
                if momentum is not None:
                    pseudo_gradient = s.server_momentum * momentum + pseudo_gradient
                self.state["momentum"] = pseudo_gradient
            return old - s.server_learning_rate * pseudo_gradient
        # FedAdam.aggregate_train (Reddi et al. 2021, Algorithm 2, with Adam's bias correction of
        # the rate, which Flower takes at server_round + 1).
        delta = new - old
        m = s.beta_1 * self.state.get("m", np.zeros_like(delta)) + (1 - s.beta_1) * delta
        v = s.beta_2 * self.state.get("v", np.zeros_like(delta)) + (1 - s.beta_2) * delta ** 2
        self.state.update(m=m, v=v)
        t = server_round + 1.0
        eta = s.adam_learning_rate * np.sqrt(1 - s.beta_2 ** t) / (1 - s.beta_1 ** t)
        return old + eta * m / (np.sqrt(v) + s.tau)

    # --- checkpoints ---------------------------------------------------------------------------

    def path(self, server_round: int) -> Path:
        return self.directory / f"server_optimizer_round_{server_round}.npz"

    def saved_rounds(self) -> list[int]:
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(int(m[1]) for p in self.directory.iterdir() if (m := STATE_FILE.fullmatch(p.name)))

    def save(self, server_round: int) -> None:
        """The state after round `server_round`'s step. The two newest files are kept: a resume
        starts from the last saved global model, which is this round's or the previous step's."""
        if self.directory is None:
            return
        path = self.path(server_round)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        with open(tmp, "wb") as f:
            np.savez(f, **self.state)
        os.replace(tmp, path)
        for old in self.saved_rounds()[:-2]:
            self.path(old).unlink(missing_ok=True)

    def restore(self, server_round: int) -> None:
        """Continue from the global model of `server_round` (a resumed run): the state of the last
        step at or before it (a round without a step, e.g. one the privacy budget refused, has no file)."""
        if not self.active:
            return
        saved = [r for r in self.saved_rounds() if r <= server_round]
        if not saved:
            if server_round > 0:
                raise FileNotFoundError(f"{self.directory}: no server optimizer state at or before round "
                                        f"{server_round}; cannot resume federated.strategy "
                                        f"{self.settings.name} (run without --resume)")
            return
        with np.load(self.path(saved[-1])) as data:
            self.state = {key: data[key] for key in data.files}

    @classmethod
    def for_run(cls, settings: StrategySettings, trainable: np.ndarray, directory: Path,
                resumed_after: int) -> ServerOptimizer:
        """The run's optimizer, its state restored when the run resumes after round `resumed_after` (> 0)."""
        optimizer = cls(settings, trainable, directory)
        if resumed_after > 0:
            optimizer.restore(resumed_after)
        return optimizer
