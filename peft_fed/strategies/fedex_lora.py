"""FedEx-LoRA: FedAvg of ``A`` and ``B`` plus the exact residual merged into the backbone.

The residual ``s * (sum_c p_c B_c A_c - Bbar Abar)`` is what FedAvg of the factors loses; adding it to
``W`` makes the effective global model exactly the p-weighted average of the clients' effective models
(Singhal et al., 2025). It is held and sent as stacked factors, rank ``(|S_t| + 1) r``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import LowRank, stack_low_rank
from ..state import LayerTensors, ServerState, Upload
from .base import Strategy


class FedExLoRA(Strategy):
    name = "fedex_lora"
    merges_into_backbone = True

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        layers: LayerTensors = {}
        residual: dict[str, LowRank] = {}
        for name, spec in self.specs.items():
            B_bar = self._weighted_mean(uploads, weights, name, "B")
            A_bar = self._weighted_mean(uploads, weights, name, "A")
            layers[name] = {"B": B_bar, "A": A_bar}
            exact = self._weighted_product_sum(uploads, weights, name, scale=spec.scale)
            residual[name] = stack_low_rank([(1.0, exact), (-spec.scale, LowRank(B_bar, A_bar))])
        return layers, residual, {name: t["B"] for name, t in layers.items()}
