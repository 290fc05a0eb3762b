"""FRLoRA: FedAvg of the factors, merged into a residual backbone; every round restarts from ``(B_0, A_0)``.

Once (PiSSA-style, from the SVD of the pretrained ``W_0``): ``B_0 = U_r sqrt(S_r / s)``,
``A_0 = sqrt(S_r / s) V_r^T`` and ``W <- W - s B_0 A_0`` (the model is unchanged). Each round:
``W <- W + s (Bbar Abar - B_0 A_0)``, so the global model is ``W + s Bbar Abar`` and clients restart
from the principal factors (Yan et al., 2025). The backbone update is held as stacked factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from ..linalg import LowRank, stack_low_rank, truncated_svd
from ..state import ClientState, LayerTensors, ServerState, Upload
from .base import Strategy, pick_factors
from .hyperparameters import SvdHyperparameters


class FRLoRA(Strategy):
    name = "frlora"
    Hyperparameters = SvdHyperparameters  # the SVD of the pretrained W at initialisation
    merges_into_backbone = True
    keeps_client_state = True

    def _init_layers(self, generator, base_weights: Mapping[str, torch.Tensor] | None) -> LayerTensors:
        if base_weights is None or set(base_weights) != set(self.specs):
            missing = sorted(set(self.specs) - set(base_weights or {}))
            raise ValueError(f"FRLoRA initialises from the pretrained weights: base_weights lacks {missing[:3]}")
        layers: LayerTensors = {}
        for name, spec in self.specs.items():
            W = base_weights[name]
            if tuple(W.shape) != (spec.out_features, spec.in_features):
                raise ValueError(
                    f"FRLoRA: base weight of {name!r} has shape {tuple(W.shape)}, "
                    f"expected {(spec.out_features, spec.in_features)} (out x in)"
                )
            U, S, V = truncated_svd(W, spec.rank, method=self.hyperparameters.svd_method, generator_seed=self.seed)
            root = (S / spec.scale).sqrt()
            B0, A0 = (U * root).to(self.dtype), (root[:, None] * V.mT).to(self.dtype)
            layers[name] = {"B0": B0, "A0": A0}
        return layers

    def _initial_backbone_update(self, state: ServerState) -> dict[str, LowRank]:
        return {
            name: LowRank(-spec.scale * state.layers[name]["B0"], state.layers[name]["A0"])
            for name, spec in self.specs.items()
        }

    def global_factors(self, state, client_states=None) -> dict[str, LowRank]:
        # the residual backbone plus the principal factors every client restarts from
        return {name: LowRank(t["B0"], t["A0"]) for name, t in state.layers.items()}

    def _broadcast_layers(self, state: ServerState, client: ClientState) -> LayerTensors:
        # (B_0, A_0) never change: a client that has trained before keeps them.
        if client.last_round is None:
            return {name: {"B": t["B0"], "A": t["A0"]} for name, t in state.layers.items()}
        return {}

    def client_begin(self, broadcast, client_state, gradient_fn=None):
        # A returning client is sent nothing but backbone updates: it restarts from the (B_0, A_0) it kept.
        layers = broadcast.layers or client_state.layers
        return super().client_begin(replace(broadcast, layers=layers), client_state)

    def _client_end_layers(self, trained, start):
        # keep (B_0, A_0): a returning client is sent only backbone updates
        return pick_factors(trained, ("B", "A")), pick_factors(start.factors, ("B", "A"))

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        update: dict[str, LowRank] = {}
        global_B: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            B_bar = self._weighted_mean(uploads, weights, name, "B")
            A_bar = self._weighted_mean(uploads, weights, name, "A")
            principal = LowRank(state.layers[name]["B0"], state.layers[name]["A0"])
            update[name] = stack_low_rank([(spec.scale, LowRank(B_bar, A_bar)), (-spec.scale, principal)])
            global_B[name] = B_bar
        return state.layers, update, global_B
