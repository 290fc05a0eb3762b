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


SumForm = Literal["low_rank", "dense"]


class ExactSum:
    """One layer's exact sum of low-rank updates ``sum_i B_i A_i``, held in the form that travels.

    * ``"low_rank"``: the stacked factors ``B_cat = [B_1, ..., B_t]`` (columns), ``A_cat = [A_1; ...; A_t]`` (rows),
      rank ``sum_i r_i``; ``B_cat @ A_cat`` is the sum, nothing is approximated;
    * ``"dense"``: the ``m x n`` matrix ``B_cat @ A_cat``.

    :func:`exact_sum` decides the form (the fewer bytes). On the sending side the terms are kept as given (no copy)
    and the dense matrix is formed on first use and kept; a receiver holds what it was sent (the stacked factors
    with each term's rank, so it splits them back into the terms, or the matrix). :meth:`dense` is
    ``B_cat @ A_cat`` in both forms (one product of the stacked factors, or the same product received), so the
    form is a transport choice that never changes a value. Against adding the terms' products one by one,
    ``B_cat @ A_cat`` differs only by float rounding: each entry is the same ``sum_i r_i`` products summed in
    another order. :meth:`additions` is what to add to a weight to apply the sum: the terms one by one in the
    low-rank form (the very additions, bit for bit, of a receiver that was sent every term), the matrix in the
    dense form.
    """

    __slots__ = ("form", "_terms", "_matrix")

    def __init__(
        self, form: SumForm, terms: tuple[LowRank, ...] | list[LowRank] = (), matrix: torch.Tensor | None = None
    ) -> None:
        if form not in ("low_rank", "dense"):
            raise ValueError(f"an exact sum's form is 'low_rank' or 'dense', got {form!r}")
        terms = tuple(terms)
        if not terms and matrix is None:
            raise ValueError("an exact sum needs its low-rank terms or its dense matrix")
        if form == "low_rank" and not terms:
            raise ValueError("a low-rank exact sum needs its factors")
        if matrix is not None and matrix.dim() != 2:
            raise ValueError(f"an exact sum's dense matrix must be 2-D, got shape {tuple(matrix.shape)}")
        shapes = {term.shape for term in terms} | ({tuple(matrix.shape)} if matrix is not None else set())
        if len(shapes) > 1:
            raise ValueError(f"the terms of an exact sum have different shapes: {sorted(shapes)}")
        self.form: SumForm = form
        self._terms = terms
        self._matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return self._terms[0].shape if self._terms else tuple(self._matrix.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._terms[0].B.dtype if self._terms else self._matrix.dtype

    @property
    def num_terms(self) -> int:
        """How many low-rank terms were summed (0 for a received dense matrix, whose terms are unknown)."""
        return len(self._terms)

    @property
    def term_ranks(self) -> tuple[int, ...]:
        """The rank of each term, in order (empty for a received dense matrix)."""
        return tuple(term.rank for term in self._terms)

    def additions(self) -> list[LowRank | torch.Tensor]:
        """What to add to a weight, in order, to add the sum: the terms (low-rank form) or the matrix (dense form)."""
        return list(self._terms) if self.form == "low_rank" else [self.dense()]

    @property
    def factors(self) -> LowRank:
        """The stacked factors (a single term as it is); a received dense sum has none."""
        if not self._terms:
            raise ValueError("this exact sum was received dense: it has no factors")
        if len(self._terms) == 1:
            return self._terms[0]
        return LowRank(torch.cat([t.B for t in self._terms], dim=1), torch.cat([t.A for t in self._terms], dim=0))

    def dense(self) -> torch.Tensor:
        """The ``m x n`` sum, ``B_cat @ A_cat`` (formed once, then kept)."""
        if self._matrix is None:
            self._matrix = self.factors.dense()
        return self._matrix

    @property
    def nbytes(self) -> int:
        """Exact bytes of the form that travels."""
        if self.form == "low_rank":
            return sum(term.nbytes for term in self._terms)
        m, n = self.shape
        return m * n * self.dtype.itemsize

    def tensors(self) -> dict[str, torch.Tensor]:
        """What travels: ``{"B": B_cat, "A": A_cat}`` or ``{"dense": matrix}``."""
        if self.form == "low_rank":
            factors = self.factors
            return {"B": factors.B, "A": factors.A}
        return {"dense": self.dense()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], term_ranks: tuple[int, ...] | list[int] = ()) -> ExactSum:
        """The exact sum :meth:`tensors` and :attr:`term_ranks` gave (its form from the keys; the stacked factors split
        back into terms of those ranks, one term when none are given); ``ValueError`` on anything else."""
        if set(tensors) == {"B", "A"}:
            B, A = tensors["B"], tensors["A"]
            ranks = list(term_ranks) or [B.shape[-1]]
            if any(r < 1 for r in ranks) or sum(ranks) != B.shape[-1] or B.dim() != 2:
                raise ValueError(f"term ranks {ranks} do not split stacked factors of rank {B.shape[-1]}")
            bounds = [0, *torch.tensor(ranks).cumsum(0).tolist()]
            return cls("low_rank", [LowRank(B[:, a:b], A[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)])
        if set(tensors) == {"dense"}:
            if term_ranks:
                raise ValueError("a dense exact sum has no term ranks")
            return cls("dense", matrix=tensors["dense"].contiguous())
        raise ValueError(f"an exact sum travels as 'B' and 'A' or as 'dense', got {sorted(tensors)}")


def exact_sum(terms: list[LowRank] | tuple[LowRank, ...]) -> ExactSum:
    """The exact sum of one layer's low-rank ``terms`` in whichever exact form is fewer bytes: the stacked factors,
    ``sum_i r_i (m + n)`` numbers, or the dense ``m x n`` matrix (the stacked factors on a tie).

    The one place that decides the form; its bytes are therefore at most ``min(sum_i r_i (m + n), m n)`` numbers,
    bounded by one dense matrix however many terms there are. A single term stays exactly itself (the same
    tensors) whenever its factors are no larger than the dense matrix.
    """
    terms = tuple(terms)
    if not terms:
        raise ValueError("exact_sum needs at least one term")
    (m, n), itemsize = terms[0].shape, terms[0].B.dtype.itemsize
    low_rank_bytes = sum(term.nbytes for term in terms)
    return ExactSum("low_rank" if low_rank_bytes <= m * n * itemsize else "dense", terms)


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
    cpu_signs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets ``(U_r, S_r, V_r)`` with ``U_r S_r V_r^T ~= matrix``.

    ``matrix`` may be a :class:`LowRank`; then the SVD is taken through a QR of each factor, which is
    exact and never forms the dense ``m x n`` product (this is what makes FLoRA/FlexLoRA aggregation
    cheap for large layers). ``method="randomized"`` is :func:`torch.svd_lowrank`'s algorithm (Halko et al.) with
    ``q = oversampling or 4 * rank`` columns and ``power_iterations`` subspace iterations, its test matrix drawn
    on the CPU (seeded by ``generator_seed``) whatever device ``matrix`` is on (:func:`_randomized_svd`); ``"auto"``
    picks it for layers with both sides >= 512 and a small rank. The results are on ``matrix``'s device.

    ``cpu_signs=True``: the singular vectors' signs are those the CPU's LAPACK gives, whatever device ``matrix`` is
    on. Each triplet's sign is arbitrary and CUDA's solver picks other signs than LAPACK (pytorch/pytorch#97410), so
    a result that pairs vectors of *different* triplets (LoRA-GA's ``U[:, r:2r] V[:, :r]^T``) would differ between
    a GPU and a CPU run by more than rounding. With it, the factorization that decides the signs runs on the CPU:
    the small ``q x n`` core of the randomized method (its products and QRs, whose Householder signs follow
    LAPACK's convention on either device, stay on the device), the whole matrix for the exact method (which
    ``"auto"`` picks only for layers with a side below 512). On a CPU matrix it changes nothing. Products of
    matching triplets (``best_rank_r``) do not depend on the signs and do not need it.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if isinstance(matrix, LowRank):
        with lapack_threads(matrix.shape):
            return _low_rank_svd(matrix, rank, cpu_signs)
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    with lapack_threads(tuple(matrix.shape)):
        return _dense_truncated_svd(matrix, rank, method, oversampling, power_iterations, generator_seed, cpu_signs)


def _dense_truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    method: SvdMethod,
    oversampling: int | None,
    power_iterations: int,
    generator_seed: int | None,
    cpu_signs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    original_dtype = matrix.dtype
    work = matrix.to(_compute_dtype(matrix))
    rank = min(rank, *work.shape)
    if _use_randomized(work, rank, method):
        q = min(oversampling or 4 * rank, *work.shape)
        U, S, V = _randomized_svd(work, q, power_iterations, generator_seed, cpu_signs)
    else:
        U, S, Vh = _svd(work, cpu_signs, keep=rank)
        V = Vh.mH
    U, S, V = U[:, :rank], S[:rank], V[:, :rank]
    return U.to(original_dtype), S.to(original_dtype), V.to(original_dtype)


def _svd(
    matrix: torch.Tensor, cpu_signs: bool, keep: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)`` (the first ``keep`` triplets when given), on the CPU when
    ``cpu_signs`` and ``matrix`` is elsewhere (LAPACK's signs, see :func:`truncated_svd`); the results on
    ``matrix``'s device, cut to ``keep`` before they travel back."""
    if not cpu_signs or matrix.device.type == "cpu":
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        U, S, Vh = torch.linalg.svd(matrix.cpu(), full_matrices=False)
        U, S, Vh = (t.to(matrix.device) for t in (U[:, :keep], S[:keep], Vh[:keep]))
    return U, S, Vh


def _randomized_svd(
    matrix: torch.Tensor, q: int, power_iterations: int, generator_seed: int | None, cpu_signs: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(matrix, q, niter=power_iterations)`` (Halko et al. 2009, Algorithm 5.1 with the subspace
    iterations of 4.4), the same operations in the same order, with the Gaussian test matrix drawn on the CPU and
    moved to the matrix's device.

    ``torch.svd_lowrank`` draws it from the global generator of the matrix's device, so a CUDA run would sketch with
    other numbers than a CPU run, and a seed set on the CPU generator would not reach it. Here it comes from
    ``torch.Generator().manual_seed(generator_seed)`` (the numbers the former ``fork_rng`` + ``manual_seed`` gave,
    without touching the global generator), or from the global CPU generator when no seed is given (as
    ``svd_lowrank`` on a CPU matrix). On the CPU the result is bit-identical to ``torch.svd_lowrank``; on another
    device the sketch is the same and everything else runs there (only the ``n x q`` test matrix crosses, and with
    ``cpu_signs`` the ``q x n`` core and its factors).
    """
    m, n = matrix.shape
    tall = matrix if m >= n else matrix.mH  # svd_lowrank works on the tall orientation
    generator = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    test = torch.randn(tall.shape[-1], q, dtype=tall.dtype, generator=generator).to(tall.device)
    Q = torch.linalg.qr(tall @ test).Q
    for _ in range(power_iterations):
        Q = torch.linalg.qr(tall.mH @ Q).Q
        Q = torch.linalg.qr(tall @ Q).Q
    U, S, Vh = _svd(Q.mH @ tall, cpu_signs)
    U, V = Q @ U, Vh.mH
    return (U, S, V) if m >= n else (V, S, U)


def _low_rank_svd(
    product: LowRank, rank: int, cpu_signs: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = _compute_dtype(product.B)
    B, A = product.B.to(dtype), product.A.to(dtype)
    Qb, Rb = torch.linalg.qr(B)  # B = Qb Rb
    Qa, Ra = torch.linalg.qr(A.mT)  # A^T = Qa Ra
    core = Rb @ Ra.mT  # k x k
    Uc, S, Vch = _svd(core, cpu_signs)
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
