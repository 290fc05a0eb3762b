"""FedIT / FedAvg-LoRA: average ``A`` and ``B`` separately; clients start from the averages.

Inexact: ``mean(B) @ mean(A) != mean(B @ A)`` on heterogeneous clients, which is what FLoRA,
FedEx-LoRA and FlexLoRA fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import LowRank
from ..state import LayerTensors, ServerState, Upload
from .base import Strategy


class FedIT(Strategy):
    name = "fedit"

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        layers = {
            name: {key: self._weighted_mean(uploads, weights, name, key) for key in ("B", "A")}
            for name in self.specs
        }
        return layers, {}, {name: t["B"] for name, t in layers.items()}
