"""Config of Subspace-Reg (Subspace-Constrained Federated Learning with LoRA): LoRA layers plus the
client regulariser and server factorisation hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import LoraConfig
from torch import nn

from ...strategies.subspace_reg import SubspaceReg, SubspaceRegHyperparameters
from ..base import FederatedLoraConfig
from ..layer_shapes import AdaptedLayerShape, check_ranks_fit


@dataclass
class SubspaceRegLoraConfig(FederatedLoraConfig, SubspaceRegHyperparameters):
    """
    Configuration of a Subspace-Reg adapter: the LoRA layers (every field of [`~peft.LoraConfig`]) and the
    method's hyperparameters, the fields of [`~peft_fed.strategies.subspace_reg.SubspaceRegHyperparameters`]
    (documented and validated there, once): `mu`, `beta`, `lam`, `normalize_by_num_layers`, `clip_norm`,
    `restore_norm_into`.

    Client objective, summed over the `P` adapted layers with `(B_g, A_g)` the round's global factors:
    `L + (1/P) * sum [mu/2 ||s*B A - s*B_g A_g||^2 + beta/2 ||B - B_g||^2 + lam/2 (||A||^2 + ||B||^2)]`.
    `mu = beta = lam = 0` is the "orthonormal-B factorisation only" ablation.
    """

    FEDERATED_METHOD: ClassVar[str] = SubspaceReg.name

    federated_method: str = field(
        default=SubspaceReg.name,
        metadata={"help": f"The federated method of this adapter; always {SubspaceReg.name!r} for this class."},
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
