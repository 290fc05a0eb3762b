"""FedSA-LoRA: both factors trained, only ``A`` shared and averaged; each client keeps its own ``B``.

``A`` captures general knowledge and ``B`` client-specific knowledge (Guo et al., 2025). A client that
has never trained starts from ``B = 0``, as a fresh LoRA does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import LowRank
from ..state import Broadcast, ClientStart, ClientState, LayerTensors, ServerState, Upload
from .base import GradientFn, Strategy, pick_factors


class FedSALoRA(Strategy):
    name = "fedsa_lora"
    uploaded = ("A",)
    keeps_client_state = True  # its own private B

    def _broadcast_layers(self, state: ServerState, client: ClientState) -> LayerTensors:
        return {name: {"A": t["A"]} for name, t in state.layers.items()}

    def global_factors(self, state, client_states=None) -> dict[str, LowRank]:
        """Shared ``A`` with the mean of the clients' private ``B`` (uniform over clients that trained).

        FedSA-LoRA is personalised: the server never sees a ``B``. For one global model to evaluate and
        export, the simulation averages the clients' ``B``; without client states ``B`` is zero.
        """
        factors = {}
        for name, spec in self.specs.items():
            own = [c.layers[name]["B"] for c in (client_states or {}).values() if name in c.layers]
            B = torch.stack(own).mean(0) if own else torch.zeros(spec.B_shape, dtype=self.dtype)
            factors[name] = LowRank(B, state.layers[name]["A"])
        return factors

    def client_begin(
        self, broadcast: Broadcast, client_state: ClientState, gradient_fn: GradientFn | None = None
    ) -> ClientStart:
        factors = {}
        for name, tensors in broadcast.layers.items():
            own = client_state.layers.get(name)
            B = own["B"] if own is not None else torch.zeros(self.specs[name].B_shape, dtype=tensors["A"].dtype)
            factors[name] = LowRank(B, tensors["A"])
        return ClientStart(round=broadcast.round, factors=factors, extras=dict(broadcast.extras))

    def _client_end_layers(self, trained, start):
        return pick_factors(trained, ("A",)), pick_factors(trained, ("B",))  # B stays on the client

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        # The server never sees a B; it keeps only the shared A (the diagnostics use the clients' own B).
        layers = {
            name: {"B": state.layers[name]["B"], "A": self._weighted_mean(uploads, weights, name, "A")}
            for name in self.specs
        }
        return layers, {}, None
