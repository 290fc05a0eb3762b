"""FLoRA: fresh LoRA each round; the server stacks the factors and merges the exact average.

The update ``sum_c p_c B_c A_c`` is represented exactly as stacked factors
``[p_1 B_1, ..., p_K B_K] @ [A_1; ...; A_K]`` (rank ``|S_t| r``), merged into the backbone, and sent
down as such: the downlink grows with the number of clients, the price of exactness (Wang et al., 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import LowRank
from ..state import ClientState, LayerTensors, ServerState, Upload
from .base import Strategy, lora_default_init


class FLoRA(Strategy):
    name = "flora"
    merges_into_backbone = True

    def _broadcast_layers(self, state: ServerState, client: ClientState) -> LayerTensors:
        # The starting factors are a fresh LoRA init drawn from (seed, round): every client can draw
        # it itself, so nothing but the merged updates needs to cross the network.
        return {}

    def client_begin(self, broadcast, client_state, gradient_fn=None):
        start = super().client_begin(broadcast, client_state, gradient_fn)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + broadcast.round + 1)
        start.factors = {name: lora_default_init(spec, generator, self.dtype) for name, spec in self.specs.items()}
        return start

    def global_factors(self, state, client_states=None) -> dict[str, LowRank]:
        return self._zero_factors()  # everything is merged into the backbone

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        update = {
            name: self._weighted_product_sum(uploads, weights, name, scale=spec.scale)
            for name, spec in self.specs.items()
        }
        return state.layers, update, None
