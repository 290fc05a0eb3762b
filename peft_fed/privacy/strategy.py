"""Client-level differential privacy as a wrapper over any strategy whose aggregation is linear in the uploads.

``ClientLevelDPStrategy(inner, settings, num_clients=N, clients_per_round=m, num_rounds=T)`` is a
:class:`~peft_fed.strategies.Strategy`: every runtime drives it as it drives ``inner``. Only the server's
aggregation changes: each accepted upload becomes its update (upload minus the server's tensors), clipped to
``settings.clip``; the updates are summed, Gaussian noise of std ``z * clip`` is added once, the sum divided by
``m``; ``inner`` then aggregates that one noised mean as if it were a single upload. Everything the server keeps and
broadcasts is a function of that noised mean, so it is differentially private by post-processing. The clients'
side (``client_begin``, ``client_loss``, ``client_end``) is ``inner``'s, unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..linalg import LowRank
from ..state import Broadcast, ClientStart, ClientState, ServerState, Upload
from ..strategies.base import AggregationResult, GradientFn, NoValidUploadsError, Strategy
from ..strategies.linearity import PROBE_SPECS, aggregates_weighted_mean, probe_server, probe_strategy
from .accountant import calibrate_noise_multiplier, epsilon_after
from .mechanism import ClientNoise, noise_generator, noised_mean, parts_as_upload, upload_update
from .settings import ClientLevelDPSettings


class ClientLevelDPUnsupportedError(ValueError):
    """The method cannot be trained with client-level DP by this wrapper; the message says why."""


def client_level_dp_refusal(strategy: Strategy) -> str | None:
    """Why ``strategy`` cannot be made client-level DP by adding noise to the mean of its uploads, or ``None``.

    The wrapper replaces the uploads by their noised mean, so it is faithful exactly when the method's new server
    tensors are the weighted mean of the uploaded tensors (the others unchanged) and nothing is merged into the
    backbone. That is checked on the method's behaviour (one aggregation of three random uploads on small layers),
    not on its name, so a new method is classified by what it does.
    """
    if strategy.merges_into_backbone:
        return (
            f"{strategy.name} merges data-dependent products of the clients' factors into the backbone, which "
            "noise on the mean of its uploads does not cover"
        )
    if not aggregates_weighted_mean(strategy):
        return (
            f"{strategy.name}'s server aggregation is not the mean of its uploads (it aggregates products or SVDs "
            "of the clients' factors), so the noised mean of clipped updates would be another method; noising "
            "each product before the SVD would need noise in the full m x n weight space"
        )
    return None


def global_model_reads_client_states(strategy: Strategy) -> bool:
    """Whether the method's global model (what is evaluated and exported) uses the clients' private tensors, which
    the server never receives and the noise therefore does not cover (FedSA-LoRA's private ``B``)."""
    probe = probe_strategy(strategy)
    generator = torch.Generator().manual_seed(1)
    state, _ = probe_server(probe, generator)
    client = ClientState(
        client_id="0",
        last_round=0,
        layers={
            name: {"B": torch.randn(spec.B_shape, generator=generator, dtype=torch.float64),
                   "A": torch.randn(spec.A_shape, generator=generator, dtype=torch.float64)}
            for name, spec in PROBE_SPECS.items()
        },  # fmt: skip
    )
    with_client = probe.global_factors(state, {"0": client})
    without = probe.global_factors(state, {})
    return any(
        not torch.equal(with_client[name].B, without[name].B) or not torch.equal(with_client[name].A, without[name].A)
        for name in PROBE_SPECS
    )


@dataclass(frozen=True)
class PrivacyGuarantee:
    """What a DP run guarantees, for the metrics and the model card."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip: float
    num_clients: int
    clients_per_round: int
    rounds: int
    covers_global_model: bool
    noise_added_by: str = "server"
    unit: str = "one client (all of its data, in every round it takes part in)"
    accountant: str = (
        "dp-accounting RDP, fixed-size sampling without replacement, replace-one neighbours (sensitivity 2 x clip)"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ClientLevelDPStrategy(Strategy):
    """``inner`` with client-level DP-FedAvg aggregation (see the module docstring and docs/privacy.md).

    Args:
        inner: the method; refused with :class:`ClientLevelDPUnsupportedError` when its aggregation is not linear.
        settings: clip, noise multiplier and/or target epsilon, delta.
        num_clients: ``N``, the clients the engine samples from.
        clients_per_round: ``m``, sampled each round without replacement (the divisor of the mean).
        num_rounds: ``T``, the rounds the budget is planned for; aggregating a later round is refused.

    Raises ``ValueError`` before any round when ``delta >= 1/N``, when the target epsilon cannot be met, or when the
    given noise multiplier would spend more than ``settings.target_epsilon`` over ``T`` rounds.
    """

    def __init__(
        self,
        inner: Strategy,
        settings: ClientLevelDPSettings,
        *,
        num_clients: int,
        clients_per_round: int,
        num_rounds: int,
    ) -> None:
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(f"clients_per_round must be in [1, {num_clients}], got {clients_per_round}")
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        refusal = client_level_dp_refusal(inner)
        if refusal is not None:
            raise ClientLevelDPUnsupportedError(f"client-level DP refused: {refusal}")
        super().__init__(
            inner.specs, seed=inner.seed, invalid_upload=inner.invalid_upload, dtype=inner.dtype, num_rounds=num_rounds
        )
        self.inner = inner
        self.name = inner.name
        self.Hyperparameters = inner.Hyperparameters
        self.hyperparameters = inner.hyperparameters
        self.uploaded = inner.uploaded
        self.merges_into_backbone = inner.merges_into_backbone
        self.needs_gradient = inner.needs_gradient
        self.has_client_loss = inner.has_client_loss
        self.keeps_client_state = inner.keeps_client_state
        self.settings = settings
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.delta = settings.resolved_delta(num_clients)
        self.calibrated = settings.noise_multiplier is None
        if self.calibrated:
            self.noise_multiplier = calibrate_noise_multiplier(
                settings.target_epsilon, self.delta, num_clients=num_clients, clients_per_round=clients_per_round,
                rounds=num_rounds,
            )  # fmt: skip
        else:
            self.noise_multiplier = settings.noise_multiplier
        planned = self.epsilon_after(num_rounds)
        if settings.target_epsilon is not None and planned > settings.target_epsilon:
            raise ValueError(
                f"the planned run would spend epsilon {planned:.4g} > dp_target_epsilon={settings.target_epsilon:g} "
                f"(delta {self.delta:.3g}, z {self.noise_multiplier:g}, {num_rounds} rounds of {clients_per_round} of "
                f"{num_clients} clients): raise dp_noise_multiplier, or lower num_rounds or clients_per_round"
            )
        self.covers_global_model = not global_model_reads_client_states(inner)
        self.noise_added_by_clients = False

    def expect_noise_from_clients(self) -> None:
        """Aggregate as under secure aggregation with distributed DP: each upload the server is given is already
        the round's noised mean (the clients clipped and noised their own updates, :meth:`noise_on_clients`; the
        server only learned their sum), so it is handed to the inner method as it is."""
        self.noise_added_by_clients = True

    def noise_on_clients(self) -> ClientNoise:
        return ClientNoise(self.settings.clip, self.noise_multiplier, tuple(self.uploaded))

    # ------------------------------------------------------------------ privacy facts

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds."""
        return epsilon_after(self.num_clients, self.clients_per_round, self.noise_multiplier, rounds, self.delta)

    def model_card_facts(self, rounds: int) -> dict[str, Any]:
        from ..export.model_card import PRIVACY_KEY

        return {PRIVACY_KEY: self.guarantee(rounds).to_dict()}

    def guarantee(self, rounds: int | None = None) -> PrivacyGuarantee:
        """The guarantee after ``rounds`` rounds (default: the planned run)."""
        rounds = self.num_rounds if rounds is None else rounds
        return PrivacyGuarantee(
            epsilon=self.epsilon_after(rounds), delta=self.delta, noise_multiplier=self.noise_multiplier,
            clip=self.settings.clip, num_clients=self.num_clients, clients_per_round=self.clients_per_round,
            rounds=rounds, covers_global_model=self.covers_global_model,
            noise_added_by="clients (secure aggregation)" if self.noise_added_by_clients else "server",
        )  # fmt: skip

    def follows_run_length(self) -> str | None:
        own = self.inner.follows_run_length()
        if not self.calibrated:
            return own
        calibration = f"dp_noise_multiplier={self.noise_multiplier:.6g} (calibrated for the planned rounds)"
        return calibration if own is None else f"{own}, {calibration}"

    # ------------------------------------------------------------------ server side

    def gradient_batches(self) -> int:
        return self.inner.gradient_batches()

    def init_server(self, *, extras=None, base_weights=None) -> tuple[ServerState, dict[str, LowRank]]:
        return self.inner.init_server(extras=extras, base_weights=base_weights)

    def configure(self, state: ServerState, client: ClientState | None = None) -> Broadcast:
        return self.inner.configure(state, client)

    def global_factors(self, state: ServerState, client_states: Mapping[str, ClientState] | None = None):
        return self.inner.global_factors(state, client_states)

    def aggregate(self, state: ServerState, uploads: Sequence[Upload]) -> AggregationResult:
        """The inner method's aggregation of the noised mean of the clipped updates; ``metrics`` carries the
        ``dp_*`` facts of the round. Invalid uploads are dropped (or raise) by the inner method's rules."""
        if state.round >= self.num_rounds:
            raise ValueError(
                f"round {state.round + 1} is beyond the {self.num_rounds} rounds the privacy budget was planned for"
            )
        valid, dropped = self.inner._validate(state, uploads)
        if not valid:
            raise NoValidUploadsError(
                f"round {state.round}: no valid upload to aggregate "
                f"({'; '.join(f'{c}: {r}' for c, r in dropped) or 'no uploads'}); the server state is unchanged"
            )
        if self.noise_added_by_clients:
            # the server never sees an update: the secure round's executor counts the clipped clients
            private_upload = self._secure_noised_mean(valid)
            statistics_of_round = {"dp_clipped_clients": None, "dp_median_update_norm": None}
        else:
            mean = noised_mean(
                [upload_update(state, upload, self.uploaded) for upload in valid],
                clip=self.settings.clip,
                noise_multiplier=self.noise_multiplier,
                cohort_size=self.clients_per_round,
                generator=noise_generator(self.seed, state.round),
            )
            private_upload = parts_as_upload(mean.parts, "dp_noised_mean", state)
            statistics_of_round = {
                "dp_clipped_clients": mean.clipped_clients,
                "dp_median_update_norm": statistics.median(mean.norms),
            }
        result = self.inner.aggregate(state, [private_upload])
        epsilon = self.epsilon_after(state.round + 1)
        return dataclasses.replace(
            result,
            accepted=[str(upload.client_id) for upload in valid],
            weights=[1.0 / len(valid)] * len(valid),
            dropped=dropped,
            metrics={
                "dp_epsilon": epsilon if math.isfinite(epsilon) else None,
                "dp_delta": self.delta,
                "dp_noise_multiplier": self.noise_multiplier,
                "dp_clip": self.settings.clip,
                **statistics_of_round,
            },
        )

    @staticmethod
    def _secure_noised_mean(valid: Sequence[Upload]) -> Upload:
        """The one noised mean every record of a secure round carries; anything else means a client's own upload
        reached this code, which distributed DP must never aggregate without its noise."""
        first = valid[0]
        for upload in valid[1:]:
            same = upload.layers.keys() == first.layers.keys() and all(
                upload.layers[name].keys() == first.layers[name].keys()
                and all(torch.equal(upload.layers[name][key], first.layers[name][key]) for key in first.layers[name])
                for name in first.layers
            ) and upload.extras.keys() == first.extras.keys() and all(
                torch.equal(upload.extras[key], first.extras[key]) for key in first.extras
            )  # fmt: skip
            if not same:
                raise ValueError(
                    "client-level DP with noise from the clients expects every upload to be the securely aggregated "
                    f"noised mean, but {upload.client_id}'s differs from {first.client_id}'s"
                )
        return first

    def _aggregate_layers(self, state, uploads, weights):
        return self.inner._aggregate_layers(state, uploads, weights)

    # ------------------------------------------------------------------ client side: the inner method's

    def client_begin(
        self, broadcast: Broadcast, client_state: ClientState, gradient_fn: GradientFn | None = None
    ) -> ClientStart:
        return self.inner.client_begin(broadcast, client_state, gradient_fn)

    def client_loss(self, factors: Mapping[str, LowRank], start: ClientStart) -> torch.Tensor | None:
        return self.inner.client_loss(factors, start)

    def client_end(self, trained, extras, start, client_state, num_samples, backbone_version):
        return self.inner.client_end(trained, extras, start, client_state, num_samples, backbone_version)


def model_card_facts(strategy: Strategy, rounds: int) -> dict[str, Any]:
    """What :class:`~peft_fed.export.FederatedRunInfo` ``extra`` needs for the model card to state the guarantee
    after ``rounds`` rounds: ``{"differential_privacy": ...}`` for a DP run, ``{}`` otherwise."""
    return strategy.model_card_facts(rounds)
