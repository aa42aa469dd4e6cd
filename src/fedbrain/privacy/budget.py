"""Privacy spent round by round, and the budget that ends a run before it is crossed.

A hospital's epsilon after round r is counted as if it had trained in every round 1..r: an
upper bound when it missed rounds (a hospital that joined late, or crashed, spent less), and
one that holds across restarts of its process, which keep no ledger. A resumed run trains the
round that was in flight again; that first attempt was never aggregated, but its update may have
reached the server, and is not counted: resume rarely, or lower the budget.

Both sides check the budget: the hospital refuses to train a round that would take it past
`epsilon_budget` (its data, its guarantee), and the server stops before sending a round that any
hospital reported would cross it, so the last global model is one every hospital could afford.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedbrain.privacy.accountant import CLIENT_SAMPLING, SAMPLING, ExampleLevelPlan, client_rounds_event, epsilon_of
from fedbrain.privacy.settings import DEFAULT_DELTA, PrivacySettings

# MetricRecord keys of a hospital's reply.
EPSILON = "epsilon"                # spent after this round (upper bound, see above)
EPSILON_NEXT = "epsilon-next"      # would be spent after one more round
DELTA = "delta"
NOISE = "noise-multiplier"
BUDGET_REFUSED = "budget-refused"  # 1: the hospital did not train, the round would cross its budget
PRIVACY_KEYS = (EPSILON, EPSILON_NEXT, DELTA, NOISE, BUDGET_REFUSED)


class BudgetExhausted(Exception):
    """The next round would take a hospital past privacy.epsilon_budget."""


@dataclass
class HospitalPrivacy:
    """A hospital's DP-SGD plan for the run (noise fixed before its first round)."""

    settings: PrivacySettings
    plan: ExampleLevelPlan

    @classmethod
    def plan_for(cls, settings: PrivacySettings, examples: int, batch_size: int, local_epochs: int,
                 rounds: int) -> HospitalPrivacy:
        return cls(settings, settings.example_plan(examples, batch_size, local_epochs, rounds))

    def refuses(self, server_round: int) -> bool:
        budget = self.settings.epsilon_budget
        return budget is not None and self.plan.epsilon_after(server_round) > budget

    def report(self, server_round: int, trained: bool = True) -> dict[str, float]:
        spent = server_round if trained else server_round - 1
        return {EPSILON: self.plan.epsilon_after(spent), EPSILON_NEXT: self.plan.epsilon_after(spent + 1),
                DELTA: self.plan.delta, NOISE: self.plan.noise_multiplier, BUDGET_REFUSED: 0 if trained else 1}


@dataclass
class PrivacyLedger:
    """The server's view: each hospital's reported epsilon, and whether the next round fits."""

    settings: PrivacySettings
    hospitals: int = 0
    rounds: int = 0
    epsilons: dict[str, float] = field(default_factory=dict)   # hospital -> epsilon spent
    next_epsilons: dict[str, float] = field(default_factory=dict)
    deltas: dict[str, float] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    stopped: str | None = None
    # Client level: the noise multiplier each round reached (client_level.noise_share), by round.
    client_multipliers: dict[int, float] = field(default_factory=dict)

    def record(self, server_round: int, reports: dict[str, dict], noise_share: float = 1.0) -> dict[str, float]:
        """Take a round's reports ({hospital: its figures}); returns the round's largest epsilon
        for MLflow (each hospital's is logged with its other figures). `noise_share`: client
        level, the share of the planned multiplier this round's noise reached."""
        metrics: dict[str, float] = {}
        if self.settings.mode == "example":
            for k, report in reports.items():
                if EPSILON in report:
                    self.epsilons[k] = float(report[EPSILON])
                    self.next_epsilons[k] = float(report[EPSILON_NEXT])
                    self.deltas[k] = float(report[DELTA])
                if report.get(BUDGET_REFUSED):
                    self.refused.append(k)
        elif self.settings.mode == "client":
            self.client_multipliers[server_round] = self.settings.client_noise(self.rounds) * noise_share
            self.epsilons = {"all": self.client_epsilon(server_round)}
            self.next_epsilons = {"all": self.client_epsilon(server_round + 1)}
            self.deltas = {"all": self.settings.delta or DEFAULT_DELTA}
        if self.epsilons:
            metrics["epsilon"] = self.epsilon
        return metrics

    def client_epsilon(self, rounds: int) -> float:
        """After `rounds` rounds: each recorded round with the multiplier it reached, any other (a
        round before a resume, or the next one) with the planned multiplier."""
        planned = self.settings.client_noise(self.rounds)
        sigmas = [self.client_multipliers.get(r, planned) for r in range(1, rounds + 1)]
        if any(s <= 0 for s in sigmas):
            return math.inf
        return epsilon_of(client_rounds_event(sigmas), self.settings.delta or DEFAULT_DELTA, self.settings.accountant)

    @property
    def epsilon(self) -> float | None:
        return max(self.epsilons.values()) if self.epsilons else None

    def stop_before(self, server_round: int) -> str | None:
        """Why round `server_round` must not run, or None."""
        budget = self.settings.epsilon_budget
        if self.refused:
            self.stopped = (f"hospital(s) {sorted(set(self.refused))} refused round {server_round - 1}: it would "
                            f"cross privacy.epsilon_budget={budget}")
        elif budget is not None and self.next_epsilons and max(self.next_epsilons.values()) > budget:
            worst = max(self.next_epsilons, key=self.next_epsilons.get)
            self.stopped = (f"round {server_round} would take hospital {worst} to epsilon "
                            f"{self.next_epsilons[worst]:.2f} > privacy.epsilon_budget={budget}")
        return self.stopped

    def card(self) -> dict:
        """What the model card, the comparison and metrics.json say about privacy."""
        if not self.settings.enabled:
            return {"privacy": "none", "epsilon": None}
        delta = max(self.deltas.values()) if self.deltas else None
        return {"privacy": self.settings.mode, "epsilon": self.epsilon, "delta": delta,
                "epsilon_by_hospital": dict(self.epsilons),
                "epsilon_accounting": (f"{SAMPLING if self.settings.mode == 'example' else CLIENT_SAMPLING}, "
                                       f"{self.settings.accountant.upper()}"),
                "l2_norm_clip": self.settings.l2_norm_clip, "epsilon_budget": self.settings.epsilon_budget,
                "stopped_by_budget": self.stopped}
