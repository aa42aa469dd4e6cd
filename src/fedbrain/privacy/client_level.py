"""Client-level DP under Paillier: the noise moves from the server to the hospitals.

Without encryption the server clips nothing and adds N(0, (z C / m)^2) to the mean of the m clipped
hospital updates (Flower's DifferentialPrivacyClientSideFixedClipping). Under Paillier the server
must not see the mean before the noise is in it, so each hospital adds its share: it clips its
update to norm C (Flower's compute_clip_model_update) and adds N(0, z^2 C^2 / m) per coordinate;
the m shares sum to N(0, z^2 C^2), which the mean divides by m: the same noise as the server's.

Assumptions, stated: every hospital adds its share (a hospital that leaves its noise out lowers
the total; with m - 1 honest hospitals the multiplier is z sqrt((m - 1) / m)); and when only m' of
the m sampled hospitals reply, the noise in the mean of their m' updates has multiplier
z sqrt(m' / m) on its sensitivity C / m': the server records that multiplier per round
(`noise_share`) and the accountant composes the rounds with the multipliers actually reached.
The noise comes from numpy's PCG64 keyed by the OS's CSPRNG (secrets), never from train.seed.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
from flwr.common.differential_privacy import compute_clip_model_update


def noised_update(received: np.ndarray, trained: np.ndarray, clip: float, noise_multiplier: float,
                  hospitals: int) -> np.ndarray:
    """This hospital's clipped update (trained - received, norm at most `clip`) plus its share of
    the noise, for a mean over `hospitals` hospitals."""
    new = [np.asarray(trained, np.float64).copy()]
    compute_clip_model_update(new, [np.asarray(received, np.float64)], clip)  # clips `new` in place
    update = new[0] - received
    rng = np.random.default_rng(secrets.randbits(128))
    return update + rng.normal(0.0, noise_multiplier * clip / math.sqrt(hospitals), update.shape)


def noise_share(replied: int, sampled: int) -> float:
    """The share of the planned noise multiplier the mean of `replied` of `sampled` updates keeps."""
    return math.sqrt(replied / sampled) if sampled else 0.0
