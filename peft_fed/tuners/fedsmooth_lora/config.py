"""Config of FedSmoothLoRA (arXiv 2605.29460): LoRA layers plus the method's round-matching hyperparameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from peft import LoraConfig
from torch import nn

from ..base import FederatedLoraConfig, check_bool, check_choice, check_int, check_real
from ..layer_shapes import AdaptedLayerShape, check_ranks_fit

ZETA_SCHEDULES = ("constant", "cosine")
SVD_METHODS = ("auto", "full", "randomized")


@dataclass
class FedSmoothLoraConfig(FederatedLoraConfig):
    """
    Configuration of a FedSmoothLoRA adapter: the LoRA layers (every field of [`~peft.LoraConfig`]) and the
    hyperparameters the FedSmoothLoRA strategy reads (see the peft-fed SPEC, section FedSmoothLoRA).

    The adapted layers are plain LoRA layers; the strategy sets their factors at the start of each round (the
    gradient-aligned / round-matching initialisation) and shifts the client's frozen backbone, so
    `init_lora_weights` only matters before the first round.

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
    """

    FEDERATED_METHOD: ClassVar[str] = "fedsmoothlora"

    federated_method: str = field(
        default="fedsmoothlora",
        metadata={"help": "The federated method of this adapter; always 'fedsmoothlora' for this class."},
    )
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
    svd_method: Literal["auto", "full", "randomized"] = field(
        default="auto",
        metadata={
            "help": (
                "SVD of each layer's gradient: 'full', 'randomized' (torch.svd_lowrank) or 'auto' (randomized for "
                "large layers with a small rank, full otherwise)."
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

    def __post_init__(self) -> None:
        super().__post_init__()
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
        self.svd_method = check_choice("svd_method", self.svd_method, SVD_METHODS)
        if self.svd_oversampling is not None:
            # The gradient-aligned direction needs singular vectors r+1..2r, so fewer than 2r test vectors can
            # never produce it, whatever the layer.
            check_int("svd_oversampling", self.svd_oversampling, minimum=2 * self.max_rank)
        self.svd_power_iterations = check_int("svd_power_iterations", self.svd_power_iterations, minimum=0)
        self.exact_round_matching = check_bool("exact_round_matching", self.exact_round_matching)
        if getattr(self, "target_parameters", None):  # the field exists from PEFT 0.17 on
            raise ValueError(
                "FedSmoothLoraConfig needs whole layer weight matrices (the gradient-aligned init takes the SVD "
                "of each adapted layer's m x n weight gradient); `target_parameters` is not supported."
            )

    def zeta_at(self, round_index: int, num_rounds: int) -> float:
        """``zeta_t`` for round ``round_index`` (0-based) of ``num_rounds`` under the configured schedule."""
        check_int("num_rounds", num_rounds, minimum=1)
        check_int("round_index", round_index, minimum=0)
        if self.zeta_schedule == "constant":
            return self.zeta
        progress = min(round_index, num_rounds) / num_rounds
        return self.zeta_min + 0.5 * (self.zeta - self.zeta_min) * (1.0 + math.cos(math.pi * progress))

    def validate_model(self, model: nn.Module) -> list[AdaptedLayerShape]:
        """Check ``2r <= min(m, n)`` on every layer this config adapts in ``model``; see
        :func:`validate_fedsmooth_ranks`."""
        return validate_fedsmooth_ranks(self, model)


def validate_fedsmooth_ranks(config: LoraConfig, model: nn.Module) -> list[AdaptedLayerShape]:
    """Check that every layer ``config`` adapts in ``model`` satisfies FedSmoothLoRA's ``2r <= min(m, n)``.

    The gradient-aligned init takes singular vectors ``r+1..2r`` of each adapted layer's ``m x n`` weight
    gradient (``B_ga = U[:, r:2r]``), which only exist when ``2r <= min(m, n)``. This needs the model, so it
    cannot run in ``__post_init__``; once peft_fed is imported, ``get_peft_model`` and
    ``PeftModel.from_pretrained`` run it before any layer is replaced.

    Args:
        config: a ``FedSmoothLoraConfig`` (or any ``LoraConfig`` meant for FedSmoothLoRA); ``target_modules``,
            ``exclude_modules``, ``layers_to_transform``, ``rank_pattern`` and ``all-linear`` are honoured as in
            PEFT.
        model: the base model, or a ``PeftModel``/``LoraModel`` wrapping it.

    Returns:
        The adapted layers with their ``(m, n)`` and rank.

    Raises:
        ValueError: naming each offending layer, its shape, its ``r`` and the largest valid ``r``; also for a
            targeted layer whose weight matrix cannot be read (supported: ``nn.Linear``, transformers'
            ``Conv1D`` (stored transposed, ``fan_in_fan_out``), ``nn.Embedding``, ``nn.Conv1d/2d/3d``).
    """
    return check_ranks_fit(
        config,
        model,
        rank_multiplier=2,
        method="FedSmoothLoRA",
        reason="the gradient-aligned init uses singular vectors r+1..2r of the layer's weight gradient",
    )
