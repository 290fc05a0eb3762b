"""FedSmoothLoRA (arXiv 2605.29460): round-aware initialisation, merged into the backbone every round.

Client ``c`` in round ``t`` (SPEC, section FedSmoothLoRA):

1. Round-Matching matrix ``W_rm = zeta_t (U_c - D_c)``: ``U_c`` is the client's last upload and ``D_c``
   the sum of the server updates merged since it last trained (read from the broadcast's backbone
   updates, which is what makes partial participation work). ``W_rm = 0`` on first participation.
2. Gradient estimate ``G`` at ``W^t + s W_rm`` with the adapters out of the forward pass.
3. Gradient-Aligned matrix (LoRA-GA "ArB2r", "stable" scaling): ``A_ga = V[:, :r]^T``,
   ``B_ga = U[:, r:2r]``, both times ``m**0.25 / sqrt(gamma)``.
4. Start: first participation ``(B_ga, A_ga)``, else split factors of ``SVD_r(W_ga + W_rm)``; the
   frozen backbone is offset by ``-s W_ga`` for this client's local training.
5. Upload ``U_c = SVD_r(B A + offset / s)`` (= ``SVD_r(B A - W_ga)`` with the paper's offset).

Server: ``Delta = sum_c p_c U_c``, ``(B_s, A_s) = SVD_r(Delta)``, merge ``W += s B_s A_s``; only the
rank-``r`` factors cross the network in either direction.

Design choice (``exact_round_matching``): the paper's start ``W - s W_ga + s SVD_r(W_ga + W_rm)`` misses
``W + s W_rm`` by the truncation residual. With ``exact_round_matching=True`` that residual is kept in
the client's local (never uploaded) backbone offset, ``offset = s (W_rm - B A)``, so the client starts
exactly at ``W + s W_rm``. The upload formula above covers both choices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from ..linalg import LowRank, best_rank_r, truncated_svd
from ..state import Broadcast, ClientStart, ClientState, LayerSpec, LayerTensors, ServerState, Upload
from .base import GradientFn, Strategy

ZetaSchedule = Literal["constant", "cosine"]


def zeta_at_round(
    round_index: int, *, zeta: float, schedule: ZetaSchedule, zeta_min: float, num_rounds: int | None
) -> float:
    """``zeta_t``: constant, or ``zeta_min + 0.5 (zeta_0 - zeta_min)(1 + cos(pi t / T))`` (t 0-based)."""
    if schedule == "constant":
        return zeta
    if num_rounds is None or num_rounds < 1:
        raise ValueError("the cosine zeta schedule needs num_rounds >= 1")
    progress = min(round_index, num_rounds) / num_rounds
    return zeta_min + 0.5 * (zeta - zeta_min) * (1.0 + math.cos(math.pi * progress))


def check_gradient_aligned_ranks(specs: Mapping[str, LayerSpec]) -> None:
    """Raise if any layer breaks ``2r <= min(m, n)`` (the Gradient-Aligned init uses 2r singular vectors)."""
    bad = [(name, s) for name, s in specs.items() if 2 * s.rank > min(s.out_features, s.in_features)]
    if bad:
        details = ", ".join(
            f"{name} ({s.out_features}x{s.in_features}, largest valid r = {min(s.out_features, s.in_features) // 2})"
            for name, s in bad[:5]
        )
        raise ValueError(
            f"FedSmoothLoRA needs 2*r <= min(out_features, in_features) for every adapted layer; "
            f"r={bad[0][1].rank} is too large for {len(bad)} layer(s): {details}"
        )


class FedSmoothLoRA(Strategy):
    """FedSmoothLoRA. Hyperparameters as in :class:`peft_fed.FedSmoothLoraConfig`.

    Args:
        zeta, zeta_schedule, zeta_min: the Round-Matching weight and its schedule over ``num_rounds``.
        gamma: the Gradient-Aligned "stable" scale ``m**0.25 / sqrt(gamma)``.
        svd_oversampling, svd_power_iterations: randomised SVD settings (``q`` defaults to ``4r``).
        exact_round_matching: keep the truncation residual in the local backbone offset (see module doc).
    """

    name = "fedsmoothlora"
    merges_into_backbone = True
    needs_gradient = True

    def __init__(
        self,
        specs: Mapping[str, LayerSpec],
        *,
        zeta: float = 1.0,
        zeta_schedule: ZetaSchedule = "constant",
        zeta_min: float = 0.0,
        num_rounds: int | None = None,
        gamma: float = 64.0,
        svd_oversampling: int | None = None,
        svd_power_iterations: int = 4,
        exact_round_matching: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(specs, **kwargs)
        if not 0.0 <= zeta <= 1.0:
            raise ValueError(f"zeta must be in [0, 1], got {zeta}")
        if zeta_schedule not in ("constant", "cosine"):
            raise ValueError(f"zeta_schedule must be 'constant' or 'cosine', got {zeta_schedule!r}")
        if not 0.0 <= zeta_min <= zeta:
            raise ValueError(f"zeta_min must be in [0, zeta={zeta}], got {zeta_min}")
        if zeta_schedule == "cosine" and (num_rounds is None or num_rounds < 1):
            raise ValueError("zeta_schedule='cosine' needs num_rounds >= 1")
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        check_gradient_aligned_ranks(self.specs)
        self.zeta = zeta
        self.zeta_schedule: ZetaSchedule = zeta_schedule
        self.zeta_min = zeta_min
        self.num_rounds = num_rounds
        self.gamma = gamma
        self.svd_oversampling = svd_oversampling
        self.svd_power_iterations = svd_power_iterations
        self.exact_round_matching = exact_round_matching

    def zeta_at(self, round_index: int) -> float:
        return zeta_at_round(
            round_index,
            zeta=self.zeta,
            schedule=self.zeta_schedule,
            zeta_min=self.zeta_min,
            num_rounds=self.num_rounds,
        )

    # ------------------------------------------------------------------ server

    def _init_layers(self, generator, base_weights) -> LayerTensors:
        return {}  # no global factors: every client builds its own start

    def _broadcast_layers(self, state: ServerState, client: ClientState) -> LayerTensors:
        return {}  # only the merged updates the client has not seen travel down

    def global_factors(self, state, client_states=None) -> dict[str, LowRank]:
        return self._zero_factors()  # the global model is the merged backbone

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        update: dict[str, LowRank] = {}
        global_B: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            delta = self._weighted_product_sum(uploads, weights, name)  # full-rank aggregation, exact
            server = best_rank_r(delta, spec.rank)
            update[name] = LowRank(spec.scale * server.B, server.A)
            global_B[name] = server.B
        return {}, update, global_B

    # ------------------------------------------------------------------ client

    def round_matching(self, broadcast: Broadcast, client_state: ClientState) -> dict[str, torch.Tensor]:
        """``W_rm = zeta_t (U_c - D_c)`` per layer (zeros on first participation)."""
        zeta = self.zeta_at(broadcast.round)
        matrices: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            if client_state.last_round is None or zeta == 0.0:
                matrices[name] = torch.zeros(spec.out_features, spec.in_features, dtype=self.dtype)
                continue
            own = client_state.layers[name]
            last_upload = own["U_B"] @ own["U_A"]
            merged = sum(
                (update[name].dense() for update in broadcast.backbone_updates),
                torch.zeros_like(last_upload),
            )
            matrices[name] = zeta * (last_upload - merged / spec.scale)
        return matrices

    def gradient_aligned(self, gradients: Mapping[str, torch.Tensor]) -> dict[str, LowRank]:
        """LoRA-GA's ArB2r factors of each layer's gradient with the "stable" scale."""
        factors: dict[str, LowRank] = {}
        for name, spec in self.specs.items():
            G = gradients[name]
            r = spec.rank
            U, _, V = truncated_svd(
                G,
                2 * r,
                method=self.svd_method,
                oversampling=self.svd_oversampling or 4 * r,  # SPEC: q = 4r for the 2r vectors needed
                power_iterations=self.svd_power_iterations,
                generator_seed=self.seed,
            )
            stable = spec.out_features**0.25 / math.sqrt(self.gamma)
            factors[name] = LowRank(
                (U[:, r : 2 * r] * stable).to(self.dtype).contiguous(),
                (V[:, :r].mT * stable).to(self.dtype).contiguous(),
            )
        return factors

    def client_begin(
        self, broadcast: Broadcast, client_state: ClientState, gradient_fn: GradientFn | None = None
    ) -> ClientStart:
        if gradient_fn is None:
            raise ValueError("FedSmoothLoRA's Gradient-Aligned init needs a gradient_fn from the runtime")
        round_matching = self.round_matching(broadcast, client_state)
        start_offsets = {name: spec.scale * round_matching[name] for name, spec in self.specs.items()}
        gradients = gradient_fn(start_offsets)
        aligned = self.gradient_aligned(gradients)
        first = client_state.last_round is None
        factors: dict[str, LowRank] = {}
        offsets: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            W_ga = aligned[name].dense()
            if first:
                factors[name] = aligned[name]
            else:
                factors[name] = best_rank_r(W_ga + round_matching[name], spec.rank, method=self.svd_method)
            if self.exact_round_matching:
                offsets[name] = spec.scale * (round_matching[name] - factors[name].dense())
            else:
                offsets[name] = -spec.scale * W_ga
        return ClientStart(
            round=broadcast.round,
            factors=factors,
            backbone_offsets=offsets,
            extras=dict(broadcast.extras),
            info={
                "zeta": self.zeta_at(broadcast.round),
                "gradient_norm": float(sum(g.float().pow(2).sum() for g in gradients.values()) ** 0.5),
            },
        )

    def _client_end_layers(self, trained, start):
        """Upload ``U_c = SVD_r(B A + offset / s)`` (= ``SVD_r(B A - W_ga)``) and keep it for Round-Matching."""
        uploads: LayerTensors = {}
        kept: LayerTensors = {}
        for name, spec in self.specs.items():
            local_change = trained[name].dense().detach() + start.backbone_offsets[name] / spec.scale
            U_c = best_rank_r(local_change, spec.rank, method=self.svd_method)
            uploads[name] = {"B": U_c.B, "A": U_c.A}
            kept[name] = {"U_B": U_c.B.clone(), "U_A": U_c.A.clone()}
        return uploads, kept
