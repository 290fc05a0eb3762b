"""Privacy accounting of client-level DP-FedAvg with Google's ``dp-accounting`` (RDP accountant).

The round engine samples a fixed number ``m`` of the ``N`` clients without replacement each round
(``state.sample_round_clients``), so a round is a ``SampledWithoutReplacementDpEvent(N, m, Gaussian)`` and a run
of ``T`` rounds is that event self-composed ``T`` times. dp-accounting accounts sampling without replacement under
the *replace-one* neighbouring relation (Wang, Balle and Kasiviswanathan, AISTATS 2019, Theorem 27): two
federations differ in one client's data, replaced by anything. Replacing one client moves the sum of the clipped
updates by up to ``2 C``, so noise of std ``z C`` on that sum is a Gaussian mechanism of noise multiplier ``z / 2``
relative to its sensitivity; that is the event accounted here.
"""

from __future__ import annotations

import functools
import math

try:
    import dp_accounting
except ImportError as error:  # an optional dependency: say how to get it
    raise ImportError("client-level DP needs the dp-accounting package: pip install 'peft-fed[privacy]'") from error
from dp_accounting import dp_event
from dp_accounting.mechanism_calibration import LowerEndpointAndGuess
from dp_accounting.rdp import RdpAccountant

# The replace-one sensitivity of a sum of updates clipped to norm C is 2 C.
REPLACE_ONE_SENSITIVITY_IN_CLIPS = 2.0
# The calibrated epsilon must land within this fraction below the target (never above it).
CALIBRATION_RELATIVE_TOLERANCE = 0.01


def round_event(num_clients: int, clients_per_round: int, noise_multiplier: float) -> dp_event.DpEvent:
    """One round: ``clients_per_round`` of ``num_clients`` sampled without replacement, then the Gaussian sum
    (noise std ``noise_multiplier * C``, replace-one sensitivity ``2 C``)."""
    return dp_event.SampledWithoutReplacementDpEvent(
        source_dataset_size=num_clients,
        sample_size=clients_per_round,
        event=dp_event.GaussianDpEvent(noise_multiplier / REPLACE_ONE_SENSITIVITY_IN_CLIPS),
    )


def run_event(num_clients: int, clients_per_round: int, noise_multiplier: float, rounds: int) -> dp_event.DpEvent:
    """``rounds`` rounds of :func:`round_event`."""
    return dp_event.SelfComposedDpEvent(round_event(num_clients, clients_per_round, noise_multiplier), rounds)


def new_accountant() -> RdpAccountant:
    """The accountant every epsilon here comes from (RDP, replace-one, dp-accounting's default orders)."""
    return RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


@functools.lru_cache(maxsize=4096)
def epsilon_after(num_clients: int, clients_per_round: int, noise_multiplier: float, rounds: int, delta: float) -> float:
    """The epsilon at ``delta`` after ``rounds`` rounds (``inf`` without noise, 0 after no round)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = new_accountant()
    accountant.compose(run_event(num_clients, clients_per_round, noise_multiplier, rounds))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, *, num_clients: int, clients_per_round: int, rounds: int
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon`` and within
    1 % of it (dp-accounting's ``calibrate_dp_mechanism``, Brent's method on the noise multiplier)."""
    # a coarse search first (each epsilon costs about 0.2 s); a finer one only where z is too small for it
    for tolerance in (1e-3, 1e-6):
        noise_multiplier = float(
            dp_accounting.calibrate_dp_mechanism(
                new_accountant,
                lambda z: run_event(num_clients, clients_per_round, z, rounds),
                target_epsilon,
                delta,
                bracket_interval=LowerEndpointAndGuess(lower_endpoint=1e-3, initial_guess=1.0),
                tol=tolerance,
            )
        )
        spent = epsilon_after(num_clients, clients_per_round, noise_multiplier, rounds, delta)
        if (1 - CALIBRATION_RELATIVE_TOLERANCE) * target_epsilon <= spent <= target_epsilon:
            return noise_multiplier
    raise ValueError(
        f"could not calibrate the noise multiplier to dp_target_epsilon={target_epsilon:g} "
        f"(got epsilon {spent:.4g} at z={noise_multiplier:.6g}); give dp_noise_multiplier instead"
    )
