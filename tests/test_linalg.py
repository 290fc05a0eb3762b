"""Truncated SVD through factors equals the dense SVD; split factors and padding; stacked sums are exact."""

from __future__ import annotations

import pytest
import torch

from peft_fed.linalg import (
    ExactSum,
    LowRank,
    best_rank_r,
    exact_sum,
    orthonormal_basis,
    stack_low_rank,
    truncated_svd,
)


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


def test_exact_sum_picks_the_smaller_exact_form_and_travels_as_it():
    g = torch.Generator().manual_seed(3)
    terms = [LowRank(torch.randn(10, 2, generator=g), torch.randn(2, 8, generator=g)) for _ in range(3)]
    assert exact_sum(terms[:2]).form == "low_rank"  # 2 * 2 * 18 = 72 <= 80 numbers
    assert exact_sum(terms[:1]).factors is terms[0]  # one term: itself, no copy
    dense = exact_sum(terms)  # 108 > 80
    assert dense.form == "dense" and dense.nbytes == 4 * 80 and dense.num_terms == 3
    for sent in (exact_sum(terms[:2]), dense):
        received = ExactSum.from_tensors(sent.tensors())
        assert received.form == sent.form and received.nbytes == sent.nbytes
        assert torch.equal(received.dense(), sent.dense())
    with pytest.raises(ValueError, match="received dense"):
        _ = ExactSum.from_tensors(dense.tensors()).factors
    with pytest.raises(ValueError, match="travels as"):
        ExactSum.from_tensors({"B": torch.ones(2, 1)})
    with pytest.raises(ValueError, match="different shapes"):
        exact_sum([terms[0], LowRank(torch.ones(3, 1), torch.ones(1, 8))])


@pytest.mark.parametrize("shape", [(600, 520), (520, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_svd_is_svd_lowrank_with_its_sketch_drawn_on_the_cpu(shape, dtype):
    """Bit for bit torch.svd_lowrank on the CPU (seeded: as the former fork_rng + manual_seed; unseeded: from the
    global generator as before), and a seeded call leaves the global generator alone. On another device the same
    CPU-drawn sketch is used (tests/strategies/test_fedsmoothlora_devices.py, tests/runtime/test_cuda.py)."""
    from peft_fed.linalg import truncated_svd

    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        expected = torch.svd_lowrank(matrix, q=16, niter=3)
    state = torch.get_rng_state()
    got = truncated_svd(matrix, 16, method="randomized", oversampling=16, power_iterations=3, generator_seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    torch.manual_seed(3)
    expected = torch.svd_lowrank(matrix, q=16, niter=3)
    torch.manual_seed(3)
    got = truncated_svd(matrix, 16, method="randomized", oversampling=16, power_iterations=3)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
