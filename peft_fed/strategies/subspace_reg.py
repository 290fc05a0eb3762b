"""Subspace-Reg: subspace-constrained federated LoRA.

Client objective, with ``(B_g, A_g)`` the global factors the client started the round from::

    L_c(W + s B A) + (1/P) sum_layers [ mu/2 ||s B A - s B_g A_g||_F^2
                                      + beta/2 ||B - B_g||_F^2
                                      + lam/2 (||A||_F^2 + ||B||_F^2) ]

Server: ``Delta = sum_c p_c s B_c A_c``, clipped to ``||Delta||_F <= tau`` per layer,
``U S V^T = SVD_r(Delta / s)``, ``B_g = U`` (orthonormal columns), ``A_g = S V^T``, then the norm lost by
truncation is restored: ``c = ||Delta||_F / ||s B_g A_g||_F``.

Design choice (``restore_norm_into``): SPEC multiplies both factors by ``sqrt(c)``, which scales the
columns of ``B_g`` and so breaks the orthonormality the method is named for. The default ``"A"`` puts
the whole ``c`` into ``A_g``: the product is identical and ``B_g`` stays orthonormal. ``"both"`` is SPEC's
literal form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from ..linalg import LowRank, truncated_svd
from ..state import ClientStart, LayerSpec, LayerTensors, ServerState, Upload
from .base import Strategy


class SubspaceReg(Strategy):
    """Subspace-Reg. Hyperparameters as in :class:`peft_fed.SubspaceRegLoraConfig`.

    Args:
        mu, beta, lam: weights of the product-proximal, ``B``-proximal and weight-decay terms.
        normalize_by_num_layers: divide the regulariser by the number of adapted layers ``P``.
        clip_norm: per-layer Frobenius bound ``tau`` on the aggregated update (``None``: no clipping).
        restore_norm_into: where the norm-restoration factor goes (see module doc).
    """

    name = "subspace_reg"

    def __init__(
        self,
        specs: Mapping[str, LayerSpec],
        *,
        mu: float = 0.05,
        beta: float = 0.01,
        lam: float = 1e-5,
        normalize_by_num_layers: bool = True,
        clip_norm: float | None = 15.0,
        restore_norm_into: Literal["A", "both"] = "A",
        **kwargs,
    ) -> None:
        super().__init__(specs, **kwargs)
        for label, value in (("mu", mu), ("beta", beta), ("lam", lam)):
            if value < 0:
                raise ValueError(f"{label} must be >= 0, got {value}")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
        if restore_norm_into not in ("A", "both"):
            raise ValueError(f"restore_norm_into must be 'A' or 'both', got {restore_norm_into!r}")
        self.mu, self.beta, self.lam = mu, beta, lam
        self.normalize_by_num_layers = normalize_by_num_layers
        self.clip_norm = clip_norm
        self.restore_norm_into = restore_norm_into

    def client_begin(self, broadcast, client_state, gradient_fn=None) -> ClientStart:
        start = super().client_begin(broadcast, client_state, gradient_fn)
        start.context = {name: {"B_g": f.B.clone(), "A_g": f.A.clone()} for name, f in start.factors.items()}
        return start

    def regularizer(self, factors: Mapping[str, LowRank], context: LayerTensors) -> torch.Tensor:
        """The bracketed sum of the client objective (differentiable in ``factors``)."""
        total = None
        for name, spec in self.specs.items():
            B, A = factors[name].B, factors[name].A
            # the broadcast lives on the CPU (server side); the live factors on the training device
            B_g, A_g = context[name]["B_g"].to(B.device, B.dtype), context[name]["A_g"].to(A.device, A.dtype)
            term = B.new_zeros(())
            if self.mu:
                # ||s(BA - B_g A_g)||^2 without forming m x n: ||[B, -B_g][A; A_g]||_F^2 = tr(Gb Ga)
                left = torch.cat([B, -B_g], dim=1)
                right = torch.cat([A, A_g], dim=0)
                term = term + 0.5 * self.mu * spec.scale**2 * ((left.mT @ left) * (right @ right.mT)).sum()
            if self.beta:
                term = term + 0.5 * self.beta * (B - B_g).pow(2).sum()
            if self.lam:
                term = term + 0.5 * self.lam * (A.pow(2).sum() + B.pow(2).sum())
            total = term if total is None else total + term
        if self.normalize_by_num_layers:
            total = total / len(self.specs)
        return total

    def client_loss(self, factors: Mapping[str, LowRank], start: ClientStart) -> torch.Tensor | None:
        if not (self.mu or self.beta or self.lam):
            return None
        return self.regularizer(factors, start.context)

    def _aggregate_layers(
        self, state: ServerState, uploads: Sequence[Upload], weights: Sequence[float]
    ) -> tuple[LayerTensors, dict[str, LowRank], dict[str, torch.Tensor] | None]:
        layers: LayerTensors = {}
        for name, spec in self.specs.items():
            delta = self._weighted_product_sum(uploads, weights, name, scale=spec.scale)
            # All singular values of the stacked factors give the exact Frobenius norm of Delta.
            _, S_all, _ = truncated_svd(delta, delta.rank)
            norm = float(S_all.double().pow(2).sum().sqrt())
            clip = 1.0 if self.clip_norm is None or norm <= self.clip_norm else self.clip_norm / norm
            norm *= clip
            U, S, V = truncated_svd(delta, spec.rank)
            S = S * clip / spec.scale
            truncated_norm = float(spec.scale * S.double().pow(2).sum().sqrt())
            restore = norm / truncated_norm if truncated_norm > 0 else 1.0
            B_g = torch.zeros(spec.B_shape, dtype=delta.B.dtype)
            A_g = torch.zeros(spec.A_shape, dtype=delta.B.dtype)
            k = S.shape[0]
            B_g[:, :k] = U
            A_g[:k] = S[:, None] * V.mT
            if self.restore_norm_into == "A":
                A_g = A_g * restore
            else:
                B_g, A_g = B_g * restore**0.5, A_g * restore**0.5
            layers[name] = {"B": B_g, "A": A_g}
        return layers, {}, {name: t["B"] for name, t in layers.items()}
