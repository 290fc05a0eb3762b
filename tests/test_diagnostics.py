"""Diagnostics on constructed cases whose values are known."""

from __future__ import annotations

import pytest
import torch

from peft_fed.diagnostics import round_diagnostics
from peft_fed.linalg import LowRank
from peft_fed.state import LayerSpec

SPECS = {"l": LayerSpec(8, 6, 2, 1.0)}


def _f(B, A):
    return {"l": LowRank(B, A)}


def test_identical_clients():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    d = round_diagnostics(SPECS, [_f(B, A), _f(B, A)], [0.5, 0.5], {"l": B})
    assert d.basis_overlap == pytest.approx(1.0)
    assert d.basis_overlap_squared == pytest.approx(1.0)
    assert d.cancellation_ratio == pytest.approx(1.0)
    assert d.client_global_cosine == pytest.approx(1.0)
    assert d.pairwise_cosine == pytest.approx(1.0)


def test_opposite_clients_cancel():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    d = round_diagnostics(SPECS, [_f(B, A), _f(-B, A)], [0.5, 0.5])
    assert d.cancellation_ratio == pytest.approx(0.0, abs=1e-12)
    assert d.pairwise_cosine == pytest.approx(-1.0)


def test_orthogonal_subspaces_have_zero_overlap():
    eye = torch.eye(8, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64)
    d = round_diagnostics(SPECS, [_f(eye[:, :2], A)], [1.0], {"l": eye[:, 2:4]})
    assert d.basis_overlap == pytest.approx(0.0, abs=1e-12)
    assert d.basis_overlap_squared == pytest.approx(1.0)  # against its own aggregate


def test_half_overlap():
    eye = torch.eye(8, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64)
    d = round_diagnostics(SPECS, [_f(eye[:, :2], A)], [1.0], {"l": eye[:, 1:3]})
    assert d.basis_overlap == pytest.approx(0.5**0.5)  # ||Q_c^T Q_g||_F = 1, / sqrt(2)


def test_needs_matching_weights():
    with pytest.raises(ValueError):
        round_diagnostics(SPECS, [], [])
