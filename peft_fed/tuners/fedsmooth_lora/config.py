"""Config of FedSmoothLoRA (arXiv 2605.29460): LoRA layers plus the method's round-matching hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import LoraConfig
from torch import nn

from ...strategies.fedsmoothlora import FedSmoothLoRA, FedSmoothLoRAHyperparameters
from ...strategies.hyperparameters import check_int
from ..base import FederatedLoraConfig
from ..layer_shapes import AdaptedLayerShape, check_ranks_fit


@dataclass
class FedSmoothLoraConfig(FederatedLoraConfig, FedSmoothLoRAHyperparameters):
    """
    Configuration of a FedSmoothLoRA adapter: the LoRA layers (every field of [`~peft.LoraConfig`]) and the
    method's hyperparameters, the fields of [`~peft_fed.strategies.fedsmoothlora.FedSmoothLoRAHyperparameters`]
    (documented and validated there, once): `zeta`, `zeta_schedule`, `zeta_min`, `gamma`,
    `num_gradient_batches`, `svd_method`, `svd_oversampling`, `svd_power_iterations`, `exact_round_matching`,
    `svd_factor_split`, `small_client_gradient_batches`.

    The adapted layers are plain LoRA layers; the strategy sets their factors at the start of each round (the
    gradient-aligned / round-matching initialisation) and shifts the client's frozen backbone, so
    `init_lora_weights` only matters before the first round. `zeta_at(t, T)` gives the schedule's `zeta_t`.
    """

    FEDERATED_METHOD: ClassVar[str] = FedSmoothLoRA.name

    federated_method: str = field(
        default=FedSmoothLoRA.name,
        metadata={"help": f"The federated method of this adapter; always {FedSmoothLoRA.name!r} for this class."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.svd_oversampling is not None:
            # The gradient-aligned direction needs singular vectors r+1..2r, so fewer than 2r test vectors can
            # never produce it, whatever the layer.
            check_int("svd_oversampling", self.svd_oversampling, minimum=2 * self.max_rank)
        if getattr(self, "target_parameters", None):  # the field exists from PEFT 0.17 on
            raise ValueError(
                "FedSmoothLoraConfig needs whole layer weight matrices (the gradient-aligned init takes the SVD "
                "of each adapted layer's m x n weight gradient); `target_parameters` is not supported."
            )

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
            targeted layer of a type peft-fed cannot adapt (supported: ``nn.Linear`` and transformers' ``Conv1D``,
            stored transposed, ``fan_in_fan_out``).
    """
    return check_ranks_fit(
        config,
        model,
        rank_multiplier=2,
        method="FedSmoothLoRA",
        reason="the gradient-aligned init uses singular vectors r+1..2r of the layer's weight gradient",
    )
