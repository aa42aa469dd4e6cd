"""Checks on the hospitals' round updates before anything is averaged (pure functions on numpy arrays).

A rejected update is left out of the round's average with a reason (a `Rejection`), logged on the
console, in MLflow (metric ``hospital_<k>/rejected`` at the round's step, tag
``rejected/round_<r>/hospital_<k>`` with the reason) and as a ``status: rejected`` line of the audit
log; the round goes on with the other updates. Fewer than ``federated.min_valid_updates`` valid
updates in a round stop the run, keeping the last good global model (server_app.py).

Plaintext FedAvg (the server sees every update), in this order per update:
  1. values: no NaN or infinite value (`check_values`);
  2. layout: as many arrays as the global model the server sent, each of its shape and dtype;
  3. examples: the reply's ``num-examples`` is more than 0 and at most ``federated.max_update_examples``
     (when set): the count weighs the update in the average, so an inflated one would let one
     hospital outweigh the rest;
  4. norm (`norm_outliers`), over the updates that passed 1-3: an update farther from the global model
     than ``federated.update_norm_factor`` times the median of the round's distances is rejected.
  A hospital's BatchNormalization statistics (measured on its data under the global weights) are
  checked for NaN and infinite values too; bad ones are left out of the pooling.

Paillier (``federated.secure_aggregation: paillier``): the server sees ciphertexts only, so the
checks split:
  - at the hospital, on its own plaintext update and statistics before encrypting them
    (client_app.py, `check_values`): NaN and infinite values. It then sends no update; its reply is
    an error with the reason, which the server records as that hospital's failure. The packing also
    refuses any value beyond +-2^integer_bits (fedbrain.secure.packing), which bounds every value.
  - at the server (`check_ciphertexts`): the number of ciphertexts (what the global model's size
    takes under the run's packing) and the example count (more than 0, at most the training images
    the hospital announced in its ``query.examples`` reply and at most ``max_update_examples``).
    Ciphertext shapes and ranges and the integrity of the sum are checked in encrypted.py.
  - not possible: the norm rule, which needs each update's values. Under client-level DP the
    hospitals clip their update to ``privacy.l2_norm_clip``, which bounds its norm instead.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import asdict, dataclass

import numpy as np

from fedbrain.errors import InputError

MAX_REASON = 200  # audit.MAX_STRING: a reason is a label, not a report


@dataclass(frozen=True)
class Rejection:
    """One hospital's update (or statistics) left out of one round's average, and why."""

    hospital: int | None
    round: int
    reason: str
    node_id: int | None = None
    what: str = "update"  # update | statistics

    def as_dict(self) -> dict:
        return asdict(self)

    def audit_entry(self, aggregation: str) -> dict:
        """The audit log's line for it (fedbrain.secure.audit: counts and labels only)."""
        return {"round": self.round, "phase": "train" if self.what == "update" else self.what,
                "node_id": self.node_id, "hospital": self.hospital, "aggregation": aggregation,
                "status": "rejected", "reason": f"{self.what}: {self.reason}"[:MAX_REASON]}


@dataclass(frozen=True)
class UpdateRules:
    """`federated.min_valid_updates`, `federated.update_norm_factor`, `federated.max_update_examples`."""

    min_valid_updates: int = 1
    norm_factor: float = 10.0
    max_examples: int | None = None

    # params.yaml's key of each field
    KEYS = {"min_valid_updates": "min_valid_updates", "norm_factor": "update_norm_factor",
            "max_examples": "max_update_examples"}

    def check(self) -> None:
        where = "params.yaml: 'federated."
        value = self.min_valid_updates
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{where}min_valid_updates' is {value!r}; use a whole number of updates, 1 or more: "
                             f"a round with fewer valid updates stops the run")
        value = self.norm_factor
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value <= 1:
            # At 1 or below, about half of every round's updates (those farther than the median) would go.
            raise InputError(f"{where}update_norm_factor' is {value!r}; use a number above 1 (e.g. 10): an update "
                             f"farther from the global model than this times the round's median distance is "
                             f"rejected (.inf turns the rule off)")
        value = self.max_examples
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{where}max_update_examples' is {value!r}; use null (no cap) or the most training "
                             f"examples one hospital can have, 1 or more")

    def as_params(self) -> dict:
        """{params.yaml key: value}, for MLflow."""
        return {self.KEYS[name]: getattr(self, name) for name in self.KEYS}


def check_values(arrays, what: str = "update") -> str | None:
    """Why these arrays cannot be averaged (NaN or infinite values), or None. Hospitals run it on their
    own update before encrypting it; the server on every plaintext update."""
    bad, total = 0, 0
    for array in arrays:
        array = np.asarray(array)
        total += array.size
        if np.issubdtype(array.dtype, np.number):
            bad += int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        return f"{what} has {bad} NaN or infinite value(s) of {total}"
    return None


def layout(arrays) -> list[tuple[tuple[int, ...], np.dtype]]:
    """[(shape, dtype)] of arrays: what every update of the round must match."""
    return [(tuple(np.shape(a)), np.asarray(a).dtype) for a in arrays]


def check_examples(num_examples, max_examples: int | None) -> str | None:
    """Why an update's example count is implausible, or None."""
    if not isinstance(num_examples, (int, float, np.number)) or isinstance(num_examples, bool) \
            or not math.isfinite(float(num_examples)) or float(num_examples) != int(num_examples):
        return f"num-examples is {num_examples!r}, not a whole number"
    if num_examples <= 0:
        return f"num-examples is {int(num_examples)}: an update must stand for at least one example"
    if max_examples is not None and num_examples > max_examples:
        return f"num-examples is {int(num_examples)}, more than the plausible maximum {max_examples}"
    return None


def check_update(arrays, expected_shapes_dtypes, num_examples, max_examples: int | None = None) -> str | None:
    """Why one plaintext update must not be averaged, or None.

    `expected_shapes_dtypes`: `layout` of the global model the server sent; `max_examples`: the most
    examples this hospital can plausibly train on (a configured cap; None: no cap)."""
    arrays = list(arrays)
    if len(arrays) != len(expected_shapes_dtypes):
        return f"update has {len(arrays)} array(s); the global model has {len(expected_shapes_dtypes)}"
    for i, (array, (shape, dtype)) in enumerate(zip(arrays, expected_shapes_dtypes)):
        array = np.asarray(array)
        if tuple(array.shape) != tuple(shape):
            return f"update array {i} has shape {tuple(array.shape)}; the global model's is {tuple(shape)}"
        if array.dtype != np.dtype(dtype):
            return f"update array {i} is {array.dtype}; the global model's is {np.dtype(dtype)}"
    return check_values(arrays) or check_examples(num_examples, max_examples)


def distance(arrays, previous_global) -> float:
    """||w_k - w_global||, the L2 norm over all arrays, in float64 (float32 differences can overflow)."""
    return math.sqrt(sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(g, np.float64)) ** 2))
                         for a, g in zip(arrays, previous_global)))


def norm_outliers(updates: dict[Hashable, list], previous_global, factor: float) -> dict[Hashable, str]:
    """{hospital: reason} for the updates too far from the previous global model.

    The rule: with d_k = ||w_k - w_global|| for each of the round's n updates and m their median,
    update k is rejected if d_k > factor * m. The median is robust: one wild update cannot move it
    (with n >= 3 it needs half the updates to be wild). With n < 3 the median is one of the two
    updates' distances or their mean, so it cannot tell which one is the outlier: the rule is
    skipped. With m = 0 (most hospitals did not move the model) there is no scale to compare with:
    skipped too. The updates should already have passed `check_update` (finite values, same shapes).
    """
    if len(updates) < 3:
        return {}
    distances = {key: distance(arrays, previous_global) for key, arrays in updates.items()}
    median = float(np.median(list(distances.values())))
    if not median > 0:
        return {}
    limit = factor * median
    return {key: (f"update is {d:.4g} from the global model, more than update_norm_factor={factor:g} x the "
                  f"round's median distance {median:.4g}") for key, d in distances.items() if d > limit}


def check_ciphertexts(rows: int, expected_rows: int, num_examples, max_examples: int | None) -> str | None:
    """Paillier: what the server can check of an encrypted update (see the module docstring)."""
    if rows != expected_rows:
        return f"update has {rows} ciphertext(s); the global model's size takes {expected_rows}"
    return check_examples(num_examples, max_examples)
