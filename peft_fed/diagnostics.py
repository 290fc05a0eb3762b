"""Per-round diagnostics every method logs (SPEC, section Subspace-Reg, "Diagnostics").

All functions take the participating clients' *trained* LoRA factors (the runtime has them even for
methods that upload only one factor), their weights ``p_c`` and the layer specs. Update matrices are
``dW_c = s B_c A_c``; inner products are taken without forming a dense ``m x n`` matrix where possible.

Two forms of the cancellation ratio and the cosines: the unprefixed fields are means over layers of per-layer
values; the ``whole_model_`` fields treat the update of every adapted layer as one flattened vector, as the
Subspace-Reg code computes them (``src/metrics.py``: ``cancellation_ratio``, ``mean_client_global_cosine``,
``mean_pairwise_client_cosine``), so they are the ones to compare with published values. A layer whose updates
are large dominates the whole-model form; every layer counts once in the per-layer mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .linalg import LowRank, orthonormal_basis, stack_low_rank, truncated_svd
from .state import LayerSpec


@dataclass
class RoundDiagnostics:
    """One round's diagnostics: means over layers (and clients, or client pairs), and the whole-model forms."""

    basis_overlap: float
    """``||Q_c^T Q_g||_F / sqrt(r)`` with ``Q_g`` = orth(new global B), in [0, 1]."""
    basis_overlap_squared: float
    """The paper's ``||Q_g^T Q_c||_F^2 / r`` with ``Q_g`` the top-r left singular vectors of the aggregate."""
    cancellation_ratio: float
    """``||sum_c p_c dW_c|| / sum_c p_c ||dW_c||``: 1 when clients agree, near 0 when updates cancel."""
    client_global_cosine: float
    """Mean cosine between each ``dW_c`` and the aggregate ``sum_c p_c dW_c``."""
    pairwise_cosine: float
    """Mean cosine between pairs of client updates (nan with a single client)."""
    whole_model_cancellation_ratio: float
    """``||sum_c p_c dW_c|| / sum_c p_c ||dW_c||`` with ``dW_c`` every layer's update flattened into one vector."""
    whole_model_client_global_cosine: float
    """Mean over clients of the cosine between the flattened ``dW_c`` and the flattened aggregate."""
    whole_model_pairwise_cosine: float
    """Mean cosine between pairs of flattened client updates (nan with a single client)."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _inner(x: LowRank, y: LowRank) -> torch.Tensor:
    """Frobenius inner product ``<B_x A_x, B_y A_y>`` via ``tr((B_x^T B_y)(A_y A_x^T))``."""
    return ((x.B.mT @ y.B) * (x.A @ y.A.mT)).sum()


def _cosine(x: LowRank, y: LowRank) -> float:
    denominator = (_inner(x, x) * _inner(y, y)).clamp_min(0).sqrt()
    return float(_inner(x, y) / denominator) if denominator > 0 else float("nan")


def _overlap(Q_c: torch.Tensor, Q_g: torch.Tensor, rank: int) -> tuple[float, float]:
    if Q_c.shape[1] == 0 or Q_g.shape[1] == 0:
        return float("nan"), float("nan")
    product = Q_c.mT @ Q_g.to(Q_c.dtype)
    return float(product.norm() / rank**0.5), float(product.norm() ** 2 / rank)


def round_diagnostics(
    specs: Mapping[str, LayerSpec],
    client_factors: Sequence[Mapping[str, LowRank]],
    weights: Sequence[float],
    global_B: Mapping[str, torch.Tensor] | None = None,
) -> RoundDiagnostics:
    """Diagnostics of one round from the clients' trained factors and the server's new global ``B``.

    Where a method has no global ``B`` (FedSA-LoRA keeps ``B`` private), ``Q_g`` for the first overlap is
    the aggregate's top-r left singular vectors, as in the squared form.
    """
    if len(client_factors) != len(weights) or not client_factors:
        raise ValueError("round_diagnostics needs one weight per client and at least one client")
    sums = {"overlap": 0.0, "overlap_sq": 0.0, "cancel": 0.0, "cg": 0.0, "pair": 0.0}
    counts = {"overlap": 0, "overlap_sq": 0, "cancel": 0, "cg": 0, "pair": 0}
    # Gram matrix of the flattened whole-model updates: index len(clients) is the aggregate.
    num_clients = len(client_factors)
    gram = torch.zeros(num_clients + 1, num_clients + 1, dtype=torch.float64)

    def add(key: str, value: float) -> None:
        if value == value:  # skip nan (an all-zero update has no direction)
            sums[key] += value
            counts[key] += 1

    for name, spec in specs.items():
        updates = [
            LowRank(spec.scale * f[name].B.detach().double(), f[name].A.detach().double()) for f in client_factors
        ]
        aggregate = stack_low_rank([(w, u) for w, u in zip(weights, updates, strict=True)])
        U_agg, S_agg, _ = truncated_svd(aggregate, spec.rank)
        Q_agg = U_agg[:, S_agg > 1e-12 * max(float(S_agg.max()) if S_agg.numel() else 0.0, 1e-300)]
        Q_global = orthonormal_basis(global_B[name].double()) if global_B is not None else Q_agg
        for update in updates:
            Q_c = orthonormal_basis(update.B)
            overlap, _ = _overlap(Q_c, Q_global, spec.rank)
            _, overlap_sq = _overlap(Q_c, Q_agg, spec.rank)
            add("overlap", overlap)
            add("overlap_sq", overlap_sq)
            add("cg", _cosine(update, aggregate))
        norms = [float(_inner(u, u).clamp_min(0).sqrt()) for u in updates]
        mean_norm = sum(w * n for w, n in zip(weights, norms, strict=True))
        if mean_norm > 0:
            add("cancel", float(_inner(aggregate, aggregate).clamp_min(0).sqrt()) / mean_norm)
        for i in range(len(updates)):
            for j in range(i + 1, len(updates)):
                add("pair", _cosine(updates[i], updates[j]))
        layer_vectors = [*updates, aggregate]
        for i in range(num_clients + 1):
            for j in range(i, num_clients + 1):
                inner = _inner(layer_vectors[i], layer_vectors[j])
                gram[i, j] += inner
                if j != i:
                    gram[j, i] += inner

    def mean(key: str) -> float:
        return sums[key] / counts[key] if counts[key] else float("nan")

    whole = _whole_model_diagnostics(gram, weights)
    return RoundDiagnostics(
        basis_overlap=mean("overlap"),
        basis_overlap_squared=mean("overlap_sq"),
        cancellation_ratio=mean("cancel"),
        client_global_cosine=mean("cg"),
        pairwise_cosine=mean("pair"),
        **whole,
    )


def _whole_model_diagnostics(gram: torch.Tensor, weights: Sequence[float]) -> dict[str, float]:
    """Cancellation ratio and cosines of the flattened updates from their Gram matrix (last row: aggregate)."""
    num_clients = gram.shape[0] - 1
    norms = gram.diagonal().clamp_min(0).sqrt()

    def cosine(i: int, j: int) -> float:
        denominator = float(norms[i] * norms[j])
        return float(gram[i, j]) / denominator if denominator > 0 else float("nan")

    def mean(values: list[float]) -> float:
        finite = [v for v in values if v == v]
        return sum(finite) / len(finite) if finite else float("nan")

    mean_norm = sum(w * float(n) for w, n in zip(weights, norms[:num_clients], strict=True))
    return {
        "whole_model_cancellation_ratio": float(norms[-1]) / mean_norm if mean_norm > 0 else float("nan"),
        "whole_model_client_global_cosine": mean([cosine(c, num_clients) for c in range(num_clients)]),
        "whole_model_pairwise_cosine": mean(
            [cosine(i, j) for i in range(num_clients) for j in range(i + 1, num_clients)]
        ),
    }
