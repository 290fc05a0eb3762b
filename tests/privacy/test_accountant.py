"""The accountant: the reported epsilon is dp-accounting's for the run's event; calibration; refused budgets."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from privacy_helpers import random_uploads

from peft_fed.privacy import ClientLevelDPSettings, calibrate_noise_multiplier, default_delta, epsilon_after


def _reference_epsilon(num_clients, clients_per_round, noise_multiplier, rounds, delta):
    """Built here from dp-accounting alone: fixed-size sampling without replacement, replace-one neighbours, and a
    Gaussian of std z C on a sum whose replace-one sensitivity is 2 C."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.SampledWithoutReplacementDpEvent(num_clients, clients_per_round,
                                                      dp_event.GaussianDpEvent(noise_multiplier / 2)),
            rounds,
        )
    )  # fmt: skip
    return accountant.get_epsilon(delta)


def test_every_rounds_epsilon_is_dp_accountings_for_the_same_event(dp_strategy):
    strategy = dp_strategy(num_clients=30, clients_per_round=5, num_rounds=3, noise_multiplier=1.3, clip=1.0)
    state, _ = strategy.init_server()
    delta = default_delta(30)
    assert strategy.delta == delta == pytest.approx(30**-1.1, rel=1e-15)
    previous = 0.0
    for round_index in range(3):
        result = strategy.aggregate(state, random_uploads(strategy, state, 5, seed=round_index))
        state = result.state
        expected = _reference_epsilon(30, 5, 1.3, round_index + 1, delta)
        assert result.metrics["dp_epsilon"] == pytest.approx(expected, rel=1e-12)
        assert result.metrics["dp_epsilon"] > previous  # composition only spends
        previous = result.metrics["dp_epsilon"]
        assert result.metrics["dp_delta"] == delta
        assert result.metrics["dp_noise_multiplier"] == 1.3 and result.metrics["dp_clip"] == 1.0
    assert strategy.guarantee().epsilon == pytest.approx(previous, rel=1e-12)


def test_no_noise_means_no_finite_epsilon():
    assert epsilon_after(10, 3, 0.0, 5, 0.01) == math.inf
    assert epsilon_after(10, 3, 1.0, 0, 0.01) == 0.0


def test_calibrated_noise_spends_the_target_epsilon_within_one_percent():
    num_clients, clients_per_round, rounds, target = 10, 3, 20, 8.0
    delta = default_delta(num_clients)
    z = calibrate_noise_multiplier(target, delta, num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds)
    spent = _reference_epsilon(num_clients, clients_per_round, z, rounds, delta)
    assert 0.99 * target <= spent <= target
    # and it is the smallest such z: 2 % less noise overspends
    assert _reference_epsilon(num_clients, clients_per_round, 0.98 * z, rounds, delta) > target


def test_target_epsilon_calibrates_the_wrapper_and_follows_the_run_length(dp_strategy):
    strategy = dp_strategy(num_clients=10, clients_per_round=3, num_rounds=20, target_epsilon=8.0, clip=1.0)
    assert 0.99 * 8.0 <= strategy.guarantee().epsilon <= 8.0
    assert "dp_noise_multiplier" in strategy.follows_run_length()  # z depends on num_rounds: a resume must keep it
    assert dp_strategy(noise_multiplier=1.0).follows_run_length() is None


def test_a_run_that_would_exceed_its_budget_is_refused_before_it_starts(dp_strategy):
    planned = epsilon_after(20, 4, 1.0, 5, default_delta(20))
    with pytest.raises(ValueError, match=r"would spend epsilon .* > dp_target_epsilon=1"):
        dp_strategy(num_clients=20, clients_per_round=4, num_rounds=5, noise_multiplier=1.0, target_epsilon=1.0)
    within = dp_strategy(num_clients=20, clients_per_round=4, num_rounds=5, noise_multiplier=1.0, target_epsilon=planned * 1.01)
    assert within.guarantee().epsilon == pytest.approx(planned)


def test_a_round_beyond_the_planned_ones_is_refused(dp_strategy):
    strategy = dp_strategy(num_rounds=1, clients_per_round=2)
    state, _ = strategy.init_server()
    state = strategy.aggregate(state, random_uploads(strategy, state, 2)).state
    with pytest.raises(ValueError, match="beyond the 1 rounds the privacy budget was planned for"):
        strategy.aggregate(state, random_uploads(strategy, state, 2))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(clip=0.0, noise_multiplier=1.0), r"`dp_clip` must be > 0"),
        (dict(clip=-1.0, noise_multiplier=1.0), r"`dp_clip` must be > 0"),
        (dict(clip=1.0, noise_multiplier=-0.1), r"`dp_noise_multiplier` must be >= 0"),
        (dict(clip=1.0, target_epsilon=0.0), r"`dp_target_epsilon` must be > 0"),
        (dict(clip=1.0), r"needs `dp_noise_multiplier` or `dp_target_epsilon`"),
        (dict(clip=1.0, noise_multiplier=1.0, delta=1.0), r"`dp_delta` must be < 1"),
        (dict(clip=float("nan"), noise_multiplier=1.0), r"`dp_clip` must be finite"),
    ],
)
def test_bad_settings_get_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message) as caught:
        ClientLevelDPSettings(**settings)
    assert "\n" not in str(caught.value)


def test_delta_of_one_over_n_or_more_is_refused(dp_strategy):
    with pytest.raises(ValueError, match=r"`dp_delta`=0.05 must be < 1/num_clients = 0.05"):
        dp_strategy(num_clients=20, delta=0.05)
    assert dp_strategy(num_clients=20, delta=0.049).delta == 0.049
