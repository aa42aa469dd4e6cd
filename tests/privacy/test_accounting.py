"""Privacy settings, accounting and budgets: the figures match dp_accounting called directly,
and settings that cannot give their guarantee stop before training, naming the key."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedbrain.config import with_variant
from fedbrain.errors import InputError
from fedbrain.privacy.accountant import dp_sgd_epsilon
from fedbrain.privacy.budget import EPSILON, EPSILON_NEXT, HospitalPrivacy, PrivacyLedger
from fedbrain.privacy.settings import PrivacySettings


def example(**values) -> PrivacySettings:
    return PrivacySettings.from_params({"privacy": {"mode": "example", **values}})


def direct_epsilon(q: float, sigma: float, steps: int, delta: float, accountant) -> float:
    acc = accountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind, accountant", [("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)])
def test_hospital_epsilon_matches_dp_accounting_and_grows_with_rounds(kind, accountant):
    settings = example(noise_multiplier=1.1, l2_norm_clip=1.0, delta=1e-5, accountant=kind)
    privacy = HospitalPrivacy.plan_for(settings, examples=950, batch_size=32, local_epochs=2, rounds=5)
    steps_per_round = 2 * math.ceil(950 / 32)
    spent = [privacy.plan.epsilon_after(r) for r in range(1, 6)]
    for r, epsilon in enumerate(spent, start=1):
        assert epsilon == pytest.approx(direct_epsilon(32 / 950, 1.1, r * steps_per_round, 1e-5, accountant), rel=1e-9)
    assert all(a < b for a, b in zip(spent, spent[1:]))
    report = privacy.report(3)
    assert report[EPSILON] == pytest.approx(spent[2]) and report[EPSILON_NEXT] == pytest.approx(spent[3])


def test_target_epsilon_sets_the_noise_that_reaches_it_after_the_last_round():
    settings = example(target_epsilon=8.0, delta=1e-5)
    plan = settings.example_plan(examples=1900, batch_size=32, epochs_per_round=5, rounds=10)
    assert plan.epsilon_after(10) <= 8.0
    assert plan.epsilon_after(10) == pytest.approx(8.0, abs=0.02)
    assert "Poisson" in plan.describe()
    # More noise would be needed for fewer images (higher sampling rate).
    smaller = settings.example_plan(examples=300, batch_size=32, epochs_per_round=5, rounds=10)
    assert smaller.noise_multiplier > plan.noise_multiplier


def test_no_noise_is_infinite_epsilon_and_no_steps_is_zero():
    assert dp_sgd_epsilon(0.1, 0.0, 10, 1e-5) == math.inf
    assert dp_sgd_epsilon(0.1, 1.0, 0, 1e-5) == 0.0


def test_budget_refuses_the_round_that_would_cross_it():
    settings = example(noise_multiplier=1.0, delta=1e-5, epsilon_budget=1.0)
    privacy = HospitalPrivacy.plan_for(settings, examples=200, batch_size=20, local_epochs=1, rounds=50)
    first_over = next(r for r in range(1, 51) if privacy.plan.epsilon_after(r) > 1.0)
    assert not privacy.refuses(first_over - 1) and privacy.refuses(first_over)
    ledger = PrivacyLedger(settings, rounds=50)
    ledger.record(first_over - 1, {"0": privacy.report(first_over - 1)})
    reason = ledger.stop_before(first_over)
    assert reason is not None and "epsilon_budget=1.0" in reason
    assert ledger.card()["epsilon"] == pytest.approx(privacy.plan.epsilon_after(first_over - 1))


@pytest.mark.parametrize("values, key", [
    ({"l2_norm_clip": -1.0, "noise_multiplier": 1.0}, "privacy.l2_norm_clip"),
    ({"l2_norm_clip": 0, "noise_multiplier": 1.0}, "privacy.l2_norm_clip"),
    ({"noise_multiplier": 0.0, "epsilon_budget": 5.0}, "privacy.noise_multiplier"),
    ({"noise_multiplier": 1.0, "delta": 1.0}, "privacy.delta"),
    ({"noise_multiplier": 1.0, "delta": 2.5}, "privacy.delta"),
    ({"noise_multiplier": 1.0, "target_epsilon": 8.0}, "privacy.noise_multiplier"),
    ({}, "privacy.target_epsilon"),
    ({"target_epsilon": 10.0, "epsilon_budget": 5.0}, "privacy.target_epsilon"),
    ({"noise_multiplier": -0.5}, "privacy.noise_multiplier"),
    ({"noise_multiplier": "lots"}, "privacy.noise_multiplier"),
])
def test_bad_settings_stop_with_the_key_named(values, key):
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        example(**values)


def test_unknown_mode_and_large_delta_for_a_hospital_are_refused():
    with pytest.raises(InputError, match="privacy.mode"):
        PrivacySettings.from_params({"privacy": {"mode": "strong"}})
    settings = example(noise_multiplier=1.0, delta=0.01)
    with pytest.raises(InputError, match="not below 1 / 150"):
        settings.delta_for(150)
    assert example(noise_multiplier=1.0).delta_for(100) == 1e-5
    assert example(noise_multiplier=1.0).delta_for(200_000) == pytest.approx(5e-7)


def test_no_privacy_section_means_no_dp():
    assert not PrivacySettings.from_params({}).enabled


def test_variants_lay_their_sections_over_the_params():
    params = {"privacy": {"mode": "none", "l2_norm_clip": 1.0}, "train": {"classifier": {"model": "cnn"}},
              "variants": {"dp": {"privacy": {"mode": "example"}, "train": {"classifier": {"normalization": "group"}}}}}
    dp = with_variant(params, "dp")
    assert dp["privacy"] == {"mode": "example", "l2_norm_clip": 1.0}
    assert dp["train"]["classifier"] == {"model": "cnn", "normalization": "group"}
    assert params["privacy"]["mode"] == "none"  # the base is left alone
    with pytest.raises(InputError, match="no federated variant 'nope'"):
        with_variant(params, "nope")
    with pytest.raises(InputError, match="unknown section"):
        with_variant({**params, "variants": {"x": {"trian": {}}}}, "x")


def test_paillier_slots_too_narrow_for_a_round_of_updates_are_refused_before_training(tmp_path):
    """A secure run whose updates could exceed the packed slots' range stops before any process starts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "federated"))
    from federated_data import federated_params, make_federated_data

    from fedbrain.federated import launcher

    processed, partition = make_federated_data(tmp_path / "data", hospitals=2)
    params = federated_params(tmp_path, rounds=1, secure_aggregation="paillier",
                              paillier={"integer_bits": 0})
    params["federated"]["local_epochs"] = 60  # 60 epochs x 2 steps x 3.16 x rate 0.003 > 2^0
    with pytest.raises(InputError, match=r"raise federated\.paillier\.integer_bits to 1"):
        launcher.prepare(params, processed, partition, tmp_path / "out", resume=False)
    params["federated"]["local_epochs"] = 1
    launcher.prepare(params, processed, partition, tmp_path / "out", resume=False)


def test_client_level_epsilon_composes_the_multiplier_each_round_reached():
    """Under Paillier the hospitals add the noise: a round where 2 of 4 hospitals replied kept
    sqrt(2 / 4) of the planned multiplier, and the accountant counts that round so."""
    from fedbrain.privacy.client_level import noise_share

    settings = PrivacySettings.from_params({"privacy": {"mode": "client", "noise_multiplier": 1.2, "delta": 1e-5}})
    ledger = PrivacyLedger(settings, rounds=3)
    ledger.record(1, {}, noise_share(4, 4))
    ledger.record(2, {}, noise_share(2, 4))
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(1.2),
                                               dp_accounting.GaussianDpEvent(1.2 * math.sqrt(0.5))]))
    assert ledger.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert ledger.next_epsilons["all"] > ledger.epsilon


def test_a_hospitals_noised_update_is_clipped_and_carries_its_share_of_the_noise():
    import numpy as np

    from fedbrain.privacy.client_level import noised_update

    rng = np.random.default_rng(0)
    received = rng.normal(size=200_000)
    trained = received + rng.normal(0, 0.01, size=received.size)  # update norm ~4.5, clipped to 0.5
    quiet = noised_update(received, trained, clip=0.5, noise_multiplier=0.0, hospitals=4)
    assert np.linalg.norm(quiet) == pytest.approx(0.5, rel=1e-9)
    noisy = noised_update(received, trained, clip=0.5, noise_multiplier=2.0, hospitals=4)
    # The noise alone: std z C / sqrt(m) = 2 x 0.5 / 2 = 0.5 per coordinate; fresh on every call.
    assert np.std(noisy - quiet) == pytest.approx(0.5, rel=0.01)
    again = noised_update(received, trained, clip=0.5, noise_multiplier=2.0, hospitals=4)
    assert not np.allclose(noisy, again)
