"""Privacy spent, from Google's `dp_accounting`: the epsilon of a training run at its delta.

Example level (DP-SGD at a hospital, or centralized): every step is a sampled Gaussian mechanism
with sampling rate q = batch / examples and noise multiplier sigma, composed over every step the
hospital runs in every round. Our input pipeline draws shuffled fixed-size batches, not Poisson
samples; like TF-Privacy's own `compute_dp_sgd_privacy_statement`, the figure is computed for
Poisson sampling at the same rate and labelled so (`SAMPLING`): for shuffling, no tight accountant
is known and the Poisson figure is the one the literature reports.

Client level (`mode: client`): each round the server adds Gaussian noise of std
sigma * clip / hospitals to the mean of clipped hospital updates (Flower's
DifferentialPrivacyClientSideFixedClipping); with every hospital taking part in every round
(fraction_train 1) there is no sampling to amplify it, so it is sigma composed over the rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("rdp", "pld")
SAMPLING = "Poisson-sampling accountant; batches are shuffled, fixed-size"
CLIENT_SAMPLING = "no sampling: every hospital in every round"


def _accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"accountant {kind!r}; expected one of {', '.join(ACCOUNTANTS)}")


def dp_sgd_event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


def client_event(noise_multiplier: float, rounds: int, sample_rate: float = 1.0) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    event = gaussian if sample_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(event, rounds)


def client_rounds_event(noise_multipliers: list[float]) -> dp_accounting.DpEvent:
    """Client level, a Gaussian mechanism per round with the multiplier that round reached."""
    return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in noise_multipliers])


def epsilon_of(event: dp_accounting.DpEvent, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of an event; inf without noise, 0 for no steps."""
    acc = _accountant(accountant)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def dp_sgd_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
                   accountant: str = "rdp") -> float:
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return epsilon_of(dp_sgd_event(sample_rate, noise_multiplier, steps), delta, accountant)


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose epsilon after `steps` is at most `target_epsilon`."""
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda sigma: dp_sgd_event(sample_rate, sigma, steps),
        target_epsilon, delta, bracket_interval=dp_accounting.ExplicitBracketInterval(0.05, 200.0),
        tol=1e-4))  # within tol of the optimum, on the side that meets the target


def client_noise_for_epsilon(target_epsilon: float, delta: float, rounds: int, accountant: str = "rdp") -> float:
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda sigma: client_event(sigma, rounds),
        target_epsilon, delta, bracket_interval=dp_accounting.ExplicitBracketInterval(0.05, 500.0),
        tol=1e-4))


@dataclass(frozen=True)
class ExampleLevelPlan:
    """One hospital's (or the pooled run's) DP-SGD: what it spends per round and in all."""

    examples: int
    batch_size: int
    epochs_per_round: int
    rounds: int
    noise_multiplier: float
    delta: float
    accountant: str = "rdp"

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.batch_size / self.examples)

    @property
    def steps_per_round(self) -> int:
        # fedbrain.train.fit runs ceil(examples / batch) steps per epoch.
        return self.epochs_per_round * math.ceil(self.examples / self.batch_size)

    def epsilon_after(self, rounds: int) -> float:
        return dp_sgd_epsilon(self.sample_rate, self.noise_multiplier, rounds * self.steps_per_round,
                              self.delta, self.accountant)

    def describe(self, rounds: int | None = None) -> str:
        rounds = self.rounds if rounds is None else rounds
        return (f"epsilon {self.epsilon_after(rounds):.2f} at delta {self.delta:.1e} after {rounds} round(s): "
                f"{self.examples} images, batch {self.batch_size} (q={self.sample_rate:.4f}), "
                f"{rounds * self.steps_per_round} steps, noise multiplier {self.noise_multiplier:.3f} "
                f"({SAMPLING}, {self.accountant.upper()})")
