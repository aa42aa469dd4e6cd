"""The `privacy:` section of params.yaml, checked before anything trains.

mode none: no DP. mode example: DP-SGD (per-example clipping + Gaussian noise) at every
hospital, or in the centralized run; the privacy unit is one training image. mode client: each
hospital's whole round update is clipped at the hospital and the server adds Gaussian noise to
their mean (Flower's client-side fixed clipping); the privacy unit is one hospital.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedbrain.config import get
from fedbrain.errors import InputError
from fedbrain.privacy.accountant import ACCOUNTANTS, ExampleLevelPlan, client_noise_for_epsilon, noise_for_epsilon

MODES = ("none", "example", "client")
# Default delta: 1e-5 (the figure papers report), or 1 / (10 n) for a hospital of n >= 10,000
# images: a delta near 1 / n would allow releasing one image outright.
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class PrivacySettings:
    mode: str = "none"
    l2_norm_clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    epsilon_budget: float | None = None
    accountant: str = "rdp"

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @classmethod
    def from_params(cls, params: dict) -> PrivacySettings:
        sec = params.get("privacy") or {}
        if not isinstance(sec, dict):
            raise InputError("params.yaml: section 'privacy' is not a mapping")
        where = "privacy"
        number = (int, float)
        settings = cls(
            mode=get(sec, "mode", str, where, choices=MODES, default="none"),
            l2_norm_clip=float(get(sec, "l2_norm_clip", number, where, default=1.0)),
            noise_multiplier=_optional(get(sec, "noise_multiplier", (*number, type(None)), where, default=None)),
            target_epsilon=_optional(get(sec, "target_epsilon", (*number, type(None)), where, default=None)),
            delta=_optional(get(sec, "delta", (*number, type(None)), where, default=None)),
            epsilon_budget=_optional(get(sec, "epsilon_budget", (*number, type(None)), where, default=None)),
            accountant=get(sec, "accountant", str, where, choices=ACCOUNTANTS, default="rdp"),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that cannot give the stated guarantee, naming the key to change."""
        if not self.enabled:
            return
        if not (self.l2_norm_clip > 0 and math.isfinite(self.l2_norm_clip)):
            raise InputError(f"params.yaml: 'privacy.l2_norm_clip' is {self.l2_norm_clip}; use a positive number")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise InputError("params.yaml: privacy.mode is "
                             f"{self.mode!r}: set exactly one of 'privacy.noise_multiplier' and "
                             "'privacy.target_epsilon' (the other null)")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise InputError(f"params.yaml: 'privacy.noise_multiplier' is {self.noise_multiplier}; use 0 or more")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise InputError(f"params.yaml: 'privacy.target_epsilon' is {self.target_epsilon}; use a positive number")
        if self.delta is not None and not 0 < self.delta < 1:
            raise InputError(f"params.yaml: 'privacy.delta' is {self.delta}; use a number in (0, 1), "
                             f"well below 1 / the images per hospital (null: {DEFAULT_DELTA:g})")
        if self.epsilon_budget is not None:
            if self.epsilon_budget <= 0:
                raise InputError(f"params.yaml: 'privacy.epsilon_budget' is {self.epsilon_budget}; "
                                 f"use a positive number or null")
            if self.noise_multiplier == 0:
                raise InputError("params.yaml: 'privacy.noise_multiplier' is 0 with an 'epsilon_budget': without "
                                 "noise epsilon is infinite and no round fits the budget; add noise or drop the budget")
            if self.target_epsilon is not None and self.target_epsilon > self.epsilon_budget:
                raise InputError(f"params.yaml: 'privacy.target_epsilon' {self.target_epsilon} exceeds "
                                 f"'privacy.epsilon_budget' {self.epsilon_budget}; lower the target or raise the budget")

    def check_training(self, training: dict, role: str) -> None:
        """A network DP can train: no BatchNormalization (it mixes the examples of a batch, and its
        statistics would travel to the server), and at example level every image once per epoch and
        a loss that reads no statistic of the labels (logit adjustment)."""
        if not self.enabled:
            return
        if training.get("normalization", "batch") != "group":
            raise InputError(f"params.yaml: privacy.mode {self.mode} needs a network without BatchNormalization "
                             f"(it mixes the examples of a batch): set train.{role}.normalization: group")
        if self.mode == "example" and int(training.get("oversample_tumour", 1)) > 1:
            raise InputError(f"params.yaml: privacy.mode example counts each image once per epoch; set "
                             f"train.{role}.oversample_tumour: 1 (it repeats tumour slices)")
        if self.mode == "example" and bool(training.get("logit_adjustment", False)):
            raise InputError(f"params.yaml: privacy.mode example with train.{role}.logit_adjustment: the class prior "
                             f"it adds to the loss is counted from the private labels, outside what epsilon covers; "
                             f"set it to false")

    def delta_for(self, examples: int) -> float:
        """The delta of a hospital (or pooled run) with `examples` training images."""
        if examples < 1:
            raise InputError("DP training needs at least one training image")
        delta = self.delta if self.delta is not None else min(DEFAULT_DELTA, 1.0 / (10 * examples))
        if delta >= 1.0 / examples:
            raise InputError(f"params.yaml: 'privacy.delta' {delta:g} is not below 1 / {examples} training images "
                             f"({1 / examples:.2g}); a delta that large allows releasing an image outright: lower it")
        return delta

    def example_plan(self, examples: int, batch_size: int, epochs_per_round: int, rounds: int) -> ExampleLevelPlan:
        """DP-SGD over `rounds` x `epochs_per_round` epochs of `examples` images (rounds=1 centralized),
        with the noise multiplier given, or the smallest that meets target_epsilon after all rounds."""
        delta = self.delta_for(examples)
        plan = ExampleLevelPlan(examples, batch_size, epochs_per_round, rounds, self.noise_multiplier or 0.0, delta,
                                self.accountant)
        if self.target_epsilon is not None:
            sigma = noise_for_epsilon(self.target_epsilon, delta, plan.sample_rate, rounds * plan.steps_per_round,
                                      self.accountant)
            plan = ExampleLevelPlan(examples, batch_size, epochs_per_round, rounds, sigma, delta, self.accountant)
        return plan

    def client_noise(self, rounds: int) -> float:
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return client_noise_for_epsilon(self.target_epsilon, self.delta or DEFAULT_DELTA, rounds, self.accountant)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PrivacySettings:
        return cls(**values)


def _optional(value):
    return None if value is None else float(value)
