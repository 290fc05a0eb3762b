"""Truncated SVD through factors equals the dense SVD; split factors and padding; stacked sums are exact."""

from __future__ import annotations

import torch

from peft_fed.linalg import LowRank, best_rank_r, orthonormal_basis, stack_low_rank, truncated_svd


def test_low_rank_svd_matches_dense():
    g = torch.Generator().manual_seed(0)
    product = LowRank(torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(6, 20, generator=g, dtype=torch.float64))
    U, S, V = truncated_svd(product, 4)
    _, S_dense, _ = torch.linalg.svd(product.dense())
    torch.testing.assert_close(S, S_dense[:4])
    approx = (U * S) @ V.T
    Ud, Sd, Vhd = torch.linalg.svd(product.dense())
    torch.testing.assert_close(approx, (Ud[:, :4] * Sd[:4]) @ Vhd[:4])


def test_best_rank_r_is_balanced_and_padded():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(5, 3, generator=g, dtype=torch.float64)
    f = best_rank_r(M, 4)  # rank larger than the matrix: exact, padded with zero directions
    assert f.B.shape == (5, 4) and f.A.shape == (4, 3)
    torch.testing.assert_close(f.dense(), M)
    torch.testing.assert_close(f.B.norm(dim=0), f.A.norm(dim=1))  # sqrt(S) on both sides


def test_stack_low_rank_is_exact():
    g = torch.Generator().manual_seed(2)
    terms = [(0.3, LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 6, generator=g))),
             (-1.5, LowRank(torch.randn(4, 3, generator=g), torch.randn(3, 6, generator=g)))]
    stacked = stack_low_rank(terms)
    torch.testing.assert_close(stacked.dense(), sum(c * t.dense() for c, t in terms))
    assert stacked.rank == 5


def test_orthonormal_basis_ignores_zero_columns():
    B = torch.zeros(6, 3)
    assert orthonormal_basis(B).shape == (6, 0)
    B[:, 0] = 1.0
    Q = orthonormal_basis(B)
    assert Q.shape == (6, 1)
