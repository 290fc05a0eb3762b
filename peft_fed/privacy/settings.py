"""The settings of client-level differential privacy and their checks (plain Python: no torch, no accountant).

The run settings ``dp_clip``, ``dp_noise_multiplier``, ``dp_target_epsilon`` and ``dp_delta`` (fields of
:class:`peft_fed.runtime.run_arguments.FederatedArguments`, where their help text lives) become one
:class:`ClientLevelDPSettings`; its checks run when the arguments are parsed, before any model loads. The checks
that need the federation's size (``delta < 1/N``) run when the wrapper is built, still before the first round.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..strategies.hyperparameters import check_real


def default_delta(num_clients: int) -> float:
    """``1 / N^1.1``: below ``1/N`` (a ``delta`` of ``1/N`` allows releasing one whole client's data), by a margin
    that grows with the federation."""
    return 1.0 / num_clients**1.1


@dataclass(frozen=True)
class ClientLevelDPSettings:
    """Client-level DP-FedAvg: each client's update clipped to L2 norm ``clip``, an unweighted mean over the round's
    sampled clients, Gaussian noise of std ``noise_multiplier * clip / clients_per_round`` on that mean.

    Give ``noise_multiplier``, or ``target_epsilon`` (then the noise multiplier is calibrated to spend exactly that
    budget over the planned rounds), or both (then a run whose planned epsilon exceeds ``target_epsilon`` is refused).
    ``delta`` defaults to :func:`default_delta` of the number of clients.
    """

    clip: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", check_real("dp_clip", self.clip, minimum=0.0, exclusive_minimum=True))
        if self.noise_multiplier is not None:
            object.__setattr__(
                self, "noise_multiplier", check_real("dp_noise_multiplier", self.noise_multiplier, minimum=0.0)
            )
        if self.target_epsilon is not None:
            object.__setattr__(
                self,
                "target_epsilon",
                check_real("dp_target_epsilon", self.target_epsilon, minimum=0.0, exclusive_minimum=True),
            )
        if self.delta is not None:
            delta = check_real("dp_delta", self.delta, minimum=0.0, exclusive_minimum=True)
            if delta >= 1.0:
                raise ValueError(f"`dp_delta` must be < 1, got {delta}.")
            object.__setattr__(self, "delta", delta)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("client-level DP needs `dp_noise_multiplier` or `dp_target_epsilon` (or both) with `dp_clip`.")

    def resolved_delta(self, num_clients: int) -> float:
        """``delta``, or the default for ``num_clients``; refused unless ``delta < 1/num_clients``."""
        delta = self.delta if self.delta is not None else default_delta(num_clients)
        if not delta < 1.0 / num_clients:
            raise ValueError(
                f"`dp_delta`={delta:g} must be < 1/num_clients = {1.0 / num_clients:g}: a delta of 1/N allows a "
                "mechanism that publishes one client's data whole"
            )
        return delta


def settings_from_arguments(
    clip: float | None, noise_multiplier: float | None, target_epsilon: float | None, delta: float | None
) -> ClientLevelDPSettings | None:
    """The run's DP settings from its ``dp_*`` arguments, or ``None`` when ``dp_clip`` is not set (DP off)."""
    if clip is None:
        given = [
            name
            for name, value in (
                ("dp_noise_multiplier", noise_multiplier),
                ("dp_target_epsilon", target_epsilon),
                ("dp_delta", delta),
            )
            if value is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} given without `dp_clip`: client-level DP is on only when `dp_clip` is set.")
        return None
    return ClientLevelDPSettings(clip, noise_multiplier, target_epsilon, delta)
