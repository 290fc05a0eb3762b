"""FlexLoRA / SVD redistribution: ``Delta = sum_c p_c B_c A_c``, clients restart from ``SVD_r(Delta)``.

Exact whenever ``rank(Delta) <= r`` (Bai et al., 2024); otherwise the best rank-``r`` approximation.
The SVD is taken through the stacked factors, never forming the dense ``m x n`` product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import LowRank, best_rank_r
from ..state import LayerTensors, ServerState, Upload
from .base import Strategy


class FlexLoRA(Strategy):
    name = "flexlora"

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        layers: LayerTensors = {}
        for name, spec in self.specs.items():
            delta = self._weighted_product_sum(uploads, weights, name)
            factors = best_rank_r(delta, spec.rank)
            layers[name] = {"B": factors.B, "A": factors.A}
        return layers, {}, {name: t["B"] for name, t in layers.items()}
