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

Two settings offer the authors' code's choices where they differ from peft-fed's default or from each other
(``docs/methods.md``): ``svd_factor_split`` (how each rank-r SVD is split into ``B`` and ``A``:
``U sqrt(S)``/``sqrt(S) V^T`` in the image-classification code, ``U S``/``V^T`` in the generation code; the
same product, but a returning client starts local training from different factors) and
``small_client_gradient_batches`` (a client with fewer than ``N_ga`` batches: its data cycled up to ``N_ga``
batches, peft-fed's default, or only the batches it has, as both official code bases do).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..linalg import LowRank, best_rank_r, truncated_svd
from ..state import Broadcast, ClientStart, ClientState, LayerSpec, LayerTensors, ServerState, Upload
from .base import GradientFn, Strategy
from .hyperparameters import SvdHyperparameters, check_bool, check_choice, check_int, check_real

ZETA_SCHEDULES = ("constant", "cosine")
SVD_FACTOR_SPLITS = ("balanced", "singular_values_in_B")
SMALL_CLIENT_GRADIENT_BATCHES = ("cycle", "available")


@dataclass
class FedSmoothLoRAHyperparameters(SvdHyperparameters):
    """FedSmoothLoRA's hyperparameters (SPEC, section FedSmoothLoRA), declared once for the strategy, the
    ``FedSmoothLoraConfig`` PEFT type and the CLI.

    Args:
        zeta (`float`):
            `zeta_0`, the weight of the Round-Matching matrix `W_rm = zeta_t * (U_c - D_c)`, in [0, 1]. With 1 a
            returning client starts from exactly its own last local model; 0 disables round matching.
        zeta_schedule (`Literal["constant", "cosine"]`):
            `constant`: `zeta_t = zeta` every round (the paper's IID setting). `cosine`:
            `zeta_t = zeta_min + 0.5 * (zeta - zeta_min) * (1 + cos(pi * t / T))` over the `T` rounds (non-IID).
        zeta_min (`float`):
            Final value of the cosine schedule, in [0, zeta]. SPEC defaults: 0 for classification, 0.5 for
            generation. Unused with the constant schedule.
        gamma (`float`):
            Scale of the gradient-aligned factors: both are multiplied by `m**0.25 / sqrt(gamma)` (LoRA-GA's
            "stable" scaling), > 0. Reference runs: 64 (generation), 256 (images).
        num_gradient_batches (`int`):
            `N_ga`, the number of the client's own training mini-batches averaged for the full-weight gradient
            estimate each round, >= 1.
        svd_method (`Literal["auto", "full", "randomized"]`):
            SVD used on each layer's gradient: `full` (`torch.linalg.svd`), `randomized` (`torch.svd_lowrank`),
            or `auto` (randomized for large layers with a small rank, full otherwise).
        svd_oversampling (`Optional[int]`):
            Randomized SVD only: `q`, the number of random test vectors (q itself, not q - 2r). `None` leaves
            it to the strategy's default (the SPEC's `q = 4r`, `r` the layer's rank). Must be >= 2r, since the
            direction uses the top 2r singular vectors.
        svd_power_iterations (`int`):
            Randomized SVD only: subspace (power) iterations, >= 0.
        exact_round_matching (`bool`):
            `False` (the paper's behaviour): a returning client starts at `W - s*W_ga + s*SVD_r(W_ga + W_rm)`,
            which equals `W + s*W_rm` only up to the rank-r truncation. `True`: the truncation residual
            `(W_ga + W_rm) - SVD_r(W_ga + W_rm)` is also added (times `s`) to the frozen local backbone offset, so
            the client starts at exactly `W + s*W_rm`; the offset stays local and is never uploaded.
        svd_factor_split (`Literal["balanced", "singular_values_in_B"]`):
            How every rank-r SVD `U S V^T` the method takes (a returning client's start, its upload, the
            server's update) is split into factors: `balanced` `B = U sqrt(S)`, `A = sqrt(S) V^T` (the official
            image-classification code); `singular_values_in_B` `B = U S`, `A = V^T` (the official generation
            code). The products are equal; a returning client's local training starts from different factors.
        small_client_gradient_batches (`Literal["cycle", "available"]`):
            A client with fewer than `num_gradient_batches` batches: `cycle` repeats its (reshuffled) data up to
            `num_gradient_batches` batches; `available` averages only the batches it has, once each (both
            official code bases).
    """

    zeta: float = field(
        default=1.0,
        metadata={
            "help": (
                "zeta_0, weight of the Round-Matching matrix W_rm = zeta_t * (U_c - D_c), in [0, 1]. 1 (default) "
                "restarts a returning client from exactly its own last local model; 0 disables round matching."
            )
        },
    )
    zeta_schedule: Literal["constant", "cosine"] = field(
        default="constant",
        metadata={
            "help": (
                "Schedule of zeta over rounds: 'constant' (zeta_t = zeta, the paper's IID setting) or 'cosine' "
                "(zeta_t = zeta_min + 0.5*(zeta - zeta_min)*(1 + cos(pi*t/T)), for non-IID data)."
            )
        },
    )
    zeta_min: float = field(
        default=0.0,
        metadata={
            "help": (
                "Final zeta of the cosine schedule, in [0, zeta]: 0 for classification, 0.5 for generation in the "
                "reference runs. Ignored by the constant schedule."
            )
        },
    )
    gamma: float = field(
        default=64.0,
        metadata={
            "help": (
                "Stable-scaling constant of the gradient-aligned init: both factors are multiplied by "
                "m**0.25 / sqrt(gamma), > 0. Reference runs: 64 (generation), 256 (images)."
            )
        },
    )
    num_gradient_batches: int = field(
        default=8,
        metadata={
            "help": (
                "N_ga: number of the client's own training mini-batches averaged for the full-weight gradient "
                "estimate at the start of each round, >= 1."
            )
        },
    )
    svd_oversampling: int | None = field(
        default=None,
        metadata={
            "help": (
                "Randomized SVD: q, the number of random test vectors (q itself, not q - 2r). None leaves it to "
                "the strategy's default (the SPEC's q = 4r, r the layer's rank). Must be >= 2r."
            )
        },
    )
    svd_power_iterations: int = field(
        default=4,
        metadata={"help": "Randomized SVD: number of subspace (power) iterations, >= 0."},
    )
    exact_round_matching: bool = field(
        default=False,
        metadata={
            "help": (
                "False (the paper's behaviour): a returning client starts at W - s*W_ga + s*SVD_r(W_ga + W_rm), "
                "i.e. W + s*W_rm up to the rank-r truncation. True: the truncation residual of SVD_r(W_ga + W_rm) "
                "is kept in the frozen local backbone offset, so the client starts exactly at W + s*W_rm."
            )
        },
    )

    svd_factor_split: Literal["balanced", "singular_values_in_B"] = field(
        default="balanced",
        metadata={
            "help": (
                "Split of every rank-r SVD U S V^T (a returning client's start, its upload, the server update): "
                "'balanced' B = U sqrt(S), A = sqrt(S) V^T (the official image-classification code) or "
                "'singular_values_in_B' B = U S, A = V^T (the official generation code). Same product, different "
                "starting factors for local training."
            )
        },
    )
    small_client_gradient_batches: Literal["cycle", "available"] = field(
        default="cycle",
        metadata={
            "help": (
                "A client with fewer than num_gradient_batches batches: 'cycle' repeats its reshuffled data up to "
                "num_gradient_batches batches; 'available' averages only the batches it has, once each (the "
                "official code)."
            )
        },
    )

    def validate_hyperparameters(self) -> None:
        super().validate_hyperparameters()
        self.zeta = check_real("zeta", self.zeta, minimum=0.0, maximum=1.0)
        self.zeta_schedule = check_choice("zeta_schedule", self.zeta_schedule, ZETA_SCHEDULES)
        self.zeta_min = check_real("zeta_min", self.zeta_min, minimum=0.0)
        if self.zeta_min > self.zeta:
            raise ValueError(
                f"`zeta_min` must be in [0, zeta] (the cosine schedule decays from zeta to zeta_min); got "
                f"zeta_min={self.zeta_min} > zeta={self.zeta}."
            )
        self.gamma = check_real("gamma", self.gamma, minimum=0.0, exclusive_minimum=True)
        self.num_gradient_batches = check_int("num_gradient_batches", self.num_gradient_batches, minimum=1)
        if self.svd_oversampling is not None:
            check_int("svd_oversampling", self.svd_oversampling, minimum=2)
        self.svd_power_iterations = check_int("svd_power_iterations", self.svd_power_iterations, minimum=0)
        self.exact_round_matching = check_bool("exact_round_matching", self.exact_round_matching)
        self.svd_factor_split = check_choice("svd_factor_split", self.svd_factor_split, SVD_FACTOR_SPLITS)
        self.small_client_gradient_batches = check_choice(
            "small_client_gradient_batches", self.small_client_gradient_batches, SMALL_CLIENT_GRADIENT_BATCHES
        )

    def zeta_at(self, round_index: int, num_rounds: int | None) -> float:
        """``zeta_t`` for round ``round_index`` (0-based) of ``num_rounds``: constant, or
        ``zeta_min + 0.5 (zeta_0 - zeta_min)(1 + cos(pi t / T))``."""
        check_int("round_index", round_index, minimum=0)
        if self.zeta_schedule == "constant":
            return self.zeta
        if num_rounds is None:
            raise ValueError("the cosine zeta schedule needs num_rounds >= 1 (the run's length)")
        check_int("num_rounds", num_rounds, minimum=1)
        progress = min(round_index, num_rounds) / num_rounds
        return self.zeta_min + 0.5 * (self.zeta - self.zeta_min) * (1.0 + math.cos(math.pi * progress))


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
    """FedSmoothLoRA; hyperparameters in :class:`FedSmoothLoRAHyperparameters`.

    ``num_rounds`` (the run's length) drives the cosine zeta schedule.
    """

    name = "fedsmoothlora"
    Hyperparameters = FedSmoothLoRAHyperparameters
    merges_into_backbone = True
    needs_gradient = True
    keeps_client_state = True
    hyperparameters: FedSmoothLoRAHyperparameters

    def __init__(self, specs: Mapping[str, LayerSpec], **kwargs) -> None:
        super().__init__(specs, **kwargs)
        if self.hyperparameters.zeta_schedule == "cosine" and self.num_rounds is None:
            raise ValueError("zeta_schedule='cosine' needs num_rounds >= 1")
        check_gradient_aligned_ranks(self.specs)

    def gradient_batches(self) -> int:
        return self.hyperparameters.num_gradient_batches

    def repeats_small_client_data(self) -> bool:
        """Whether a runtime cycles a client with fewer than ``gradient_batches()`` batches up to that count
        (``True``) or averages only the batches the client has (``False``)."""
        return self.hyperparameters.small_client_gradient_batches == "cycle"

    def rank_r_factors(self, matrix: torch.Tensor | LowRank, rank: int) -> LowRank:
        """Factors of ``SVD_r(matrix)`` split as ``svd_factor_split`` says (zero-padded to ``rank``)."""
        if self.hyperparameters.svd_factor_split == "balanced":
            return best_rank_r(matrix, rank, method=self.hyperparameters.svd_method)
        U, S, V = truncated_svd(matrix, rank, method=self.hyperparameters.svd_method)
        missing = rank - S.shape[0]
        return LowRank(
            torch.cat([U * S, U.new_zeros(U.shape[0], missing)], dim=1).contiguous(),
            torch.cat([V.mT, V.new_zeros(missing, V.shape[0])], dim=0).contiguous(),
        )

    def zeta_at(self, round_index: int) -> float:
        return self.hyperparameters.zeta_at(round_index, self.num_rounds)

    def follows_run_length(self) -> str | None:
        schedule = self.hyperparameters.zeta_schedule
        return None if schedule == "constant" else f"zeta_schedule={schedule!r}"

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
            server = self.rank_r_factors(delta, spec.rank)
            update[name] = LowRank(spec.scale * server.B, server.A)
            global_B[name] = server.B
        return {}, update, global_B

    # ------------------------------------------------------------------ client

    def round_matching(self, broadcast: Broadcast, client_state: ClientState) -> dict[str, torch.Tensor]:
        """``W_rm = zeta_t (U_c - D_c)`` per layer (zeros on first participation).

        ``s D_c`` is the broadcast's backbone catch-up, the exact sum of the updates merged since the client last
        trained, read as ``B_cat @ A_cat`` (one product of the stacked factors, or that product as sent dense): the
        per-version sum ``sum_v B_v A_v`` up to float rounding (bit-identical for one missed update; within
        ``1e-5 * max |sum|`` in float32, tested in ``tests/strategies/test_catch_up.py``)."""
        zeta = self.zeta_at(broadcast.round)
        matrices: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            if client_state.last_round is None or zeta == 0.0:
                matrices[name] = torch.zeros(spec.out_features, spec.in_features, dtype=self.dtype)
                continue
            own = client_state.layers[name]
            last_upload = own["U_B"] @ own["U_A"]
            missed = broadcast.backbone_catch_up.layers.get(name)
            merged = missed.dense() if missed is not None else torch.zeros_like(last_upload)
            matrices[name] = zeta * (last_upload - merged / spec.scale)
        return matrices

    def gradient_aligned(self, gradients: Mapping[str, torch.Tensor]) -> dict[str, LowRank]:
        """LoRA-GA's ArB2r factors of each layer's gradient with the "stable" scale, on the gradient's device.

        ``B A = U[:, r:2r] V[:, :r]^T`` pairs vectors of different singular triplets, so it depends on each one's
        arbitrary sign: the SVD takes LAPACK's signs on every device (``cpu_signs``), so that a GPU client starts
        where the same client on the CPU does."""
        factors: dict[str, LowRank] = {}
        for name, spec in self.specs.items():
            G = gradients[name]
            r = spec.rank
            U, _, V = truncated_svd(
                G,
                2 * r,
                method=self.hyperparameters.svd_method,
                oversampling=self.hyperparameters.svd_oversampling or 4 * r,  # SPEC: q = 4r for the 2r vectors needed
                power_iterations=self.hyperparameters.svd_power_iterations,
                generator_seed=self.seed,
                cpu_signs=True,
            )
            stable = spec.out_features**0.25 / math.sqrt(self.hyperparameters.gamma)
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
        # Built from the client's state and the broadcast (CPU tensors, like a server's); the runtime's gradient_fn
        # puts the offsets where the model is.
        round_matching = self.round_matching(broadcast, client_state)
        start_offsets = {name: spec.scale * round_matching[name] for name, spec in self.specs.items()}
        gradients = gradient_fn(start_offsets)
        # From here on the client's mathematics runs where its gradients are (the model's device): the SVDs (but the
        # small step that fixes the signs, see gradient_aligned), the start factors and the dense offsets stay there
        # and go into the model without a round trip.
        aligned = self.gradient_aligned(gradients)
        first = client_state.last_round is None
        exact = self.hyperparameters.exact_round_matching
        factors: dict[str, LowRank] = {}
        offsets: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            W_ga = aligned[name].dense()
            W_rm = round_matching[name].to(W_ga.device) if exact or not first else None  # moved once, if used
            if first:
                factors[name] = aligned[name]
            else:
                factors[name] = self.rank_r_factors(W_ga + W_rm, spec.rank)
            if exact:
                offsets[name] = spec.scale * (W_rm - factors[name].dense())
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
        """Upload ``U_c = SVD_r(B A + offset / s)`` (= ``SVD_r(B A - W_ga)``) and keep it for Round-Matching.

        Computed where the offset lives (``client_begin``'s device: the model's), the small trained factors moved
        there; the rank-r result goes to the device of ``trained`` (the bridge's CPU copies), so what the client
        sends and keeps crosses once, at rank r, and never as an ``m x n`` matrix."""
        uploads: LayerTensors = {}
        kept: LayerTensors = {}
        for name, spec in self.specs.items():
            offset = start.backbone_offsets[name]
            local_change = trained[name].to(offset.device).dense().detach() + offset / spec.scale
            U_c = self.rank_r_factors(local_change, spec.rank).to(trained[name].B.device)
            uploads[name] = {"B": U_c.B, "A": U_c.A}
            kept[name] = {"U_B": U_c.B.clone(), "U_A": U_c.A.clone()}
        return uploads, kept
