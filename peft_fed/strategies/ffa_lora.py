"""FFA-LoRA: ``A`` frozen at a shared random init, only ``B`` trained and averaged.

With ``A`` common to every client, ``mean(B) @ A == mean(B @ A)``: the aggregation is exact.
The frozen ``A`` is sent only to a client that has never trained (it cannot have it yet); afterwards
only ``B`` crosses the network in both directions, and the client reuses the ``A`` it keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import LowRank
from ..state import Broadcast, ClientStart, ClientState, LayerTensors, ServerState, Upload
from .base import GradientFn, Strategy, pick_factors


class FFALoRA(Strategy):
    name = "ffa_lora"
    uploaded = ("B",)
    keeps_client_state = True  # the fixed A it was sent once

    def _broadcast_layers(self, state: ServerState, client: ClientState) -> LayerTensors:
        if client.last_round is None:
            return {name: dict(t) for name, t in state.layers.items()}
        return {name: {"B": t["B"]} for name, t in state.layers.items()}

    def client_begin(
        self, broadcast: Broadcast, client_state: ClientState, gradient_fn: GradientFn | None = None
    ) -> ClientStart:
        factors = {}
        for name, tensors in broadcast.layers.items():
            A = tensors["A"] if "A" in tensors else client_state.layers[name]["A"]
            factors[name] = LowRank(tensors["B"], A)
        return ClientStart(round=broadcast.round, factors=factors, train_A=False, extras=dict(broadcast.extras))

    def _client_end_layers(self, trained, start):
        # upload B only; keep the frozen A so later broadcasts need not carry it
        return pick_factors(trained, ("B",)), pick_factors(start.factors, ("A",))

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        layers = {
            name: {"B": self._weighted_mean(uploads, weights, name, "B"), "A": state.layers[name]["A"]}
            for name in self.specs
        }
        return layers, {}, {name: t["B"] for name, t in layers.items()}
