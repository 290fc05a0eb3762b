"""Low-rank linear algebra shared by every strategy.

Everything here works on one adapted layer in the *weight orientation* ``W`` (out ``m`` x in ``n``);
the conversion from transformers' ``Conv1D`` (which stores ``W^T``) happens once, in
:mod:`peft_fed.peft_bridge`, so strategies never see ``fan_in_fan_out``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

SvdMethod = Literal["auto", "full", "randomized"]

# Below this many columns/rows a full SVD is as fast as the randomised one and exact.
_AUTO_RANDOMIZED_MIN_DIM = 512
# Factorizations of matrices up to this side run single-threaded (see lapack_threads).
_SINGLE_THREAD_MAX_DIM = 4096


@dataclass
class LowRank:
    """A matrix held as the product ``B @ A`` (``B``: m x k, ``A``: k x n).

    Used both for LoRA factors (where the layer multiplies the product by its scale ``s``) and for
    exact low-rank representations of updates (stacked factors).
    """

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        # Contiguous factors make every later matmul take the same BLAS path whether a tensor was just
        # computed (possibly a transposed view) or reloaded from a checkpoint: resumed runs stay bit-exact.
        self.B, self.A = self.B.contiguous(), self.A.contiguous()
        if self.B.dim() != 2 or self.A.dim() != 2:
            raise ValueError(f"LowRank needs 2-D factors, got B{tuple(self.B.shape)} and A{tuple(self.A.shape)}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRank factors do not chain: B is {tuple(self.B.shape)}, A is {tuple(self.A.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.B) + tensor_nbytes(self.A)

    def to(self, *args, **kwargs) -> LowRank:
        return LowRank(self.B.to(*args, **kwargs), self.A.to(*args, **kwargs))

    def clone(self) -> LowRank:
        return LowRank(self.B.detach().clone(), self.A.detach().clone())

    def scaled(self, factor: float) -> LowRank:
        """The product times ``factor`` (applied to ``B`` only, so ``A`` keeps its rows)."""
        return LowRank(self.B * factor, self.A)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def stack_low_rank(terms: list[tuple[float, LowRank]]) -> LowRank:
    """Exact factors of ``sum_i c_i B_i A_i``: ``[c_1 B_1, ..., c_k B_k] @ [A_1; ...; A_k]``.

    This is how FLoRA and FedEx-LoRA aggregate without any approximation; the rank is the sum of
    the terms' ranks.
    """
    if not terms:
        raise ValueError("stack_low_rank needs at least one term")
    return LowRank(
        torch.cat([c * lr.B for c, lr in terms], dim=1),
        torch.cat([lr.A for _, lr in terms], dim=0),
    )


@contextlib.contextmanager
def lapack_threads(matrix_dims: tuple[int, ...]) -> Iterator[None]:
    """One thread for the small factorizations LoRA needs (sides up to a few thousand).

    Measured on a 2-core machine with a second busy process: a 384 x 384 SVD took 17 ms on one thread
    and 129 ms on two (threads fight for cores); small LAPACK calls gain nothing from threading anyway.
    """
    if max(matrix_dims) > _SINGLE_THREAD_MAX_DIM or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _compute_dtype(matrix: torch.Tensor) -> torch.dtype:
    # SVD is not implemented for half precisions on CPU and is badly conditioned there anyway.
    return matrix.dtype if matrix.dtype in (torch.float32, torch.float64) else torch.float32


def _use_randomized(matrix: torch.Tensor, rank: int, method: SvdMethod) -> bool:
    if method == "full":
        return False
    if method == "randomized":
        return True
    if method != "auto":
        raise ValueError(f"svd_method must be 'auto', 'full' or 'randomized', got {method!r}")
    return min(matrix.shape) >= _AUTO_RANDOMIZED_MIN_DIM and 4 * rank < min(matrix.shape)


def truncated_svd(
    matrix: torch.Tensor | LowRank,
    rank: int,
    *,
    method: SvdMethod = "auto",
    oversampling: int | None = None,
    power_iterations: int = 4,
    generator_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets ``(U_r, S_r, V_r)`` with ``U_r S_r V_r^T ~= matrix``.

    ``matrix`` may be a :class:`LowRank`; then the SVD is taken through a QR of each factor, which is
    exact and never forms the dense ``m x n`` product (this is what makes FLoRA/FlexLoRA aggregation
    cheap for large layers). ``method="randomized"`` uses :func:`torch.svd_lowrank` (Halko et al.) with
    ``q = oversampling or 4 * rank`` columns and ``power_iterations`` subspace iterations; ``"auto"``
    picks it for layers with both sides >= 512 and a small rank.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if isinstance(matrix, LowRank):
        with lapack_threads(matrix.shape):
            return _low_rank_svd(matrix, rank)
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    with lapack_threads(tuple(matrix.shape)):
        return _dense_truncated_svd(matrix, rank, method, oversampling, power_iterations, generator_seed)


def _dense_truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    method: SvdMethod,
    oversampling: int | None,
    power_iterations: int,
    generator_seed: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    original_dtype = matrix.dtype
    work = matrix.to(_compute_dtype(matrix))
    rank = min(rank, *work.shape)
    if _use_randomized(work, rank, method):
        q = min(oversampling or 4 * rank, *work.shape)
        if generator_seed is not None:
            # svd_lowrank draws its test matrix from the global RNG; fork it so callers stay deterministic
            # without perturbing the training RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(generator_seed)
                U, S, V = torch.svd_lowrank(work, q=q, niter=power_iterations)
        else:
            U, S, V = torch.svd_lowrank(work, q=q, niter=power_iterations)
    else:
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        V = Vh.mH
    U, S, V = U[:, :rank], S[:rank], V[:, :rank]
    return U.to(original_dtype), S.to(original_dtype), V.to(original_dtype)


def _low_rank_svd(product: LowRank, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = _compute_dtype(product.B)
    B, A = product.B.to(dtype), product.A.to(dtype)
    Qb, Rb = torch.linalg.qr(B)  # B = Qb Rb
    Qa, Ra = torch.linalg.qr(A.mT)  # A^T = Qa Ra
    core = Rb @ Ra.mT  # k x k
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    rank = min(rank, S.shape[0])
    U = (Qb @ Uc)[:, :rank]
    V = (Qa @ Vch.mH)[:, :rank]
    out = product.B.dtype
    return U.to(out), S[:rank].to(out), V.to(out)


def split_factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> LowRank:
    """Balanced factors of ``U S V^T``: ``B = U sqrt(S)``, ``A = sqrt(S) V^T``."""
    root = S.clamp_min(0).sqrt()
    return LowRank(U * root, root[:, None] * V.mT)


def best_rank_r(
    matrix: torch.Tensor | LowRank, rank: int, *, method: SvdMethod = "auto", **svd_kwargs
) -> LowRank:
    """Split factors of ``SVD_r(matrix)``, the best rank-``rank`` approximation (Eckart-Young)."""
    U, S, V = truncated_svd(matrix, rank, method=method, **svd_kwargs)
    factors = split_factors(U, S, V)
    missing = rank - factors.rank
    if missing > 0:
        # Keep the declared LoRA rank even when the matrix is smaller: pad with zero directions.
        factors = LowRank(
            torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], missing)], dim=1),
            torch.cat([factors.A, factors.A.new_zeros(missing, factors.A.shape[1])], dim=0),
        )
    return factors


def orthonormal_basis(matrix: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of the column space of ``matrix`` (``orth`` in SPEC).

    Taken from the SVD so that a rank-deficient matrix (e.g. a LoRA ``B`` that is still zero) gives
    only the directions it really spans, not arbitrary completions as a plain QR would.
    """
    with lapack_threads(tuple(matrix.shape)):
        U, S, _ = torch.linalg.svd(matrix.to(_compute_dtype(matrix)), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0]
    return U[:, S > rtol * S[0]]
