"""FedSVD: clients train ``B`` with ``A`` frozen; the server re-factorises ``Bbar A`` by SVD.

``U S V^T = SVD_r(Bbar A_prev)``; the new ``A = V^T`` has orthonormal rows and ``B = U S``. Because
every client shares ``A_prev``, ``Bbar A_prev`` is the exact average of the clients' products, and the
refreshed ``A`` lets the frozen factor follow the data across rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import LowRank, truncated_svd
from ..state import LayerTensors, ServerState, Upload
from .base import Strategy


class FedSVD(Strategy):
    name = "fedsvd"
    uploaded = ("B",)

    def _init_layers(self, generator, base_weights) -> LayerTensors:
        # Start from orthonormal rows, the invariant every later A keeps.
        layers: LayerTensors = {}
        for name, spec in self.specs.items():
            gaussian = torch.randn(spec.in_features, spec.rank, generator=generator, dtype=torch.float64)
            Q, _ = torch.linalg.qr(gaussian)
            layers[name] = {"B": torch.zeros(spec.B_shape, dtype=self.dtype), "A": Q.mT.to(self.dtype).contiguous()}
        return layers

    def client_begin(self, broadcast, client_state, gradient_fn=None):
        start = super().client_begin(broadcast, client_state, gradient_fn)
        start.train_A = False
        return start

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        layers: LayerTensors = {}
        for name, spec in self.specs.items():
            B_bar = self._weighted_mean(uploads, weights, name, "B")
            U, S, V = truncated_svd(LowRank(B_bar, state.layers[name]["A"]), spec.rank)
            rank = S.shape[0]
            B = torch.zeros(spec.B_shape, dtype=B_bar.dtype)
            A = state.layers[name]["A"].clone()
            B[:, :rank] = U * S
            A[:rank] = V.mT
            layers[name] = {"B": B, "A": A}
        return layers, {}, {name: t["B"] for name, t in layers.items()}
