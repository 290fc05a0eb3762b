"""Config of Subspace-Reg (Subspace-Constrained Federated Learning with LoRA): LoRA layers plus the
client regulariser and server factorisation hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from peft import LoraConfig
from torch import nn

from ..base import FederatedLoraConfig, check_bool, check_choice, check_real
from ..layer_shapes import AdaptedLayerShape, check_ranks_fit

RESTORE_NORM_TARGETS = ("A", "both")


@dataclass
class SubspaceRegLoraConfig(FederatedLoraConfig):
    """
    Configuration of a Subspace-Reg adapter: the LoRA layers (every field of [`~peft.LoraConfig`]) and the
    hyperparameters the Subspace-Reg strategy reads (see the peft-fed SPEC, section Subspace-Reg).

    Client objective, summed over the `P` adapted layers with `(B_g, A_g)` the round's global factors:
    `L + (1/P) * sum [mu/2 ||s*B A - s*B_g A_g||^2 + beta/2 ||B - B_g||^2 + lam/2 (||A||^2 + ||B||^2)]`.
    `mu = beta = lam = 0` is the "orthonormal-B factorisation only" ablation.

    Args:
        mu (`float`):
            Weight of the proximal term on the update, `mu/2 * ||s*B A - s*B_g A_g||_F^2`, >= 0. Default 0.05
            (published runs; the paper's text says 0.1).
        beta (`float`):
            Weight of the basis anchor `beta/2 * ||B - B_g||_F^2`, >= 0.
        lam (`float`):
            Weight decay on the factors, `lam/2 * (||A||_F^2 + ||B||_F^2)`, >= 0.
        normalize_by_num_layers (`bool`):
            Divide the summed regulariser by `P`, the number of adapted layers (the published code does).
        clip_norm (`Optional[float]`):
            `tau`: the server clips each layer's aggregated update `Delta` to `||Delta||_F <= tau` before
            factorising it; > 0, or `None` for no clipping. Published runs: 15 for encoders, 25 for decoders.
        restore_norm_into (`Literal["A", "both"]`):
            Where the server puts the norm-restoring factor `c = ||Delta||_F / ||s*B_g A_g||_F`. `both` is the
            SPEC's literal rule (B and A each times `sqrt(c)`), which breaks the orthonormality of `B_g`. `A`
            (default) multiplies `A_g` by `c` and leaves `B_g = U` orthonormal; the product `B_g A_g`, hence the
            model, is identical.
    """

    FEDERATED_METHOD: ClassVar[str] = "subspace_reg"

    federated_method: str = field(
        default="subspace_reg",
        metadata={"help": "The federated method of this adapter; always 'subspace_reg' for this class."},
    )
    mu: float = field(
        default=0.05,
        metadata={
            "help": (
                "Weight of the proximal term mu/2 * ||s*B A - s*B_g A_g||_F^2 in the client loss, >= 0. 0.05 as "
                "in the published runs (the paper's text says 0.1)."
            )
        },
    )
    beta: float = field(
        default=0.01,
        metadata={"help": "Weight of the basis anchor beta/2 * ||B - B_g||_F^2 in the client loss, >= 0."},
    )
    lam: float = field(
        default=1e-5,
        metadata={"help": "Weight decay lam/2 * (||A||_F^2 + ||B||_F^2) on the LoRA factors, >= 0."},
    )
    normalize_by_num_layers: bool = field(
        default=True,
        metadata={
            "help": "Divide the summed per-layer regulariser by P, the number of adapted layers (the public code does)."
        },
    )
    clip_norm: float | None = field(
        default=15.0,
        metadata={
            "help": (
                "tau: per-layer Frobenius clip ||Delta||_F <= tau of the aggregated update before the server's "
                "SVD, > 0, or None for no clipping. Published runs: 15 for encoders, 25 for decoders."
            )
        },
    )
    restore_norm_into: Literal["A", "both"] = field(
        default="A",
        metadata={
            "help": (
                "Where the server puts the norm-restoring factor c = ||Delta||_F / ||s*B_g A_g||_F: 'A' multiplies "
                "A_g by c and keeps B_g orthonormal; 'both' multiplies B_g and A_g by sqrt(c) (the SPEC's literal "
                "rule, which breaks B_g's orthonormality). The product B_g A_g is the same either way."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mu = check_real("mu", self.mu, minimum=0.0)
        self.beta = check_real("beta", self.beta, minimum=0.0)
        self.lam = check_real("lam", self.lam, minimum=0.0)
        self.normalize_by_num_layers = check_bool("normalize_by_num_layers", self.normalize_by_num_layers)
        if self.clip_norm is not None:
            self.clip_norm = check_real("clip_norm", self.clip_norm, minimum=0.0, exclusive_minimum=True)
        self.restore_norm_into = check_choice(
            "restore_norm_into", self.restore_norm_into, RESTORE_NORM_TARGETS
        )

    def validate_model(self, model: nn.Module) -> list[AdaptedLayerShape]:
        """Check ``r <= min(m, n)`` on every layer this config adapts; see :func:`validate_subspace_reg_ranks`."""
        return validate_subspace_reg_ranks(self, model)


def validate_subspace_reg_ranks(config: LoraConfig, model: nn.Module) -> list[AdaptedLayerShape]:
    """Check that every layer ``config`` adapts in ``model`` satisfies Subspace-Reg's ``r <= min(m, n)``.

    The server sets ``B_g = U_r``, ``r`` orthonormal columns of ``m``-dimensional space, from ``SVD_r`` of the
    ``m x n`` aggregated update; PEFT itself accepts a larger ``r``, for which that factorisation cannot fill
    the LoRA factors. Run automatically by ``get_peft_model`` once peft_fed is imported.

    Raises:
        ValueError: naming each offending layer, its shape, its ``r`` and the largest valid ``r``.
    """
    return check_ranks_fit(
        config,
        model,
        rank_multiplier=1,
        method="Subspace-Reg",
        reason="the server's B_g has r orthonormal columns from the rank-r SVD of the layer's update",
    )
