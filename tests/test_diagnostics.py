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


TWO_LAYERS = {"small": LayerSpec(8, 6, 2, 0.5), "large": LayerSpec(5, 7, 3, 2.0)}


def _random_clients(num_clients: int, seed: int) -> list[dict[str, LowRank]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            name: LowRank(
                torch.randn(spec.out_features, spec.rank, generator=g, dtype=torch.float64) * (1 + c),
                torch.randn(spec.rank, spec.in_features, generator=g, dtype=torch.float64),
            )
            for name, spec in TWO_LAYERS.items()
        }
        for c in range(num_clients)
    ]


def _official_whole_model(specs, clients, weights) -> dict[str, float]:
    """The Subspace-Reg code's diagnostics (sadia-sigma-lab/Subspace-Constrained-Federated-learning-with-Lora,
    src/metrics.py lines 31-84: ``cancellation_ratio``, ``mean_client_global_cosine``,
    ``mean_pairwise_client_cosine``), transcribed: each client's ``s B A`` of every layer concatenated into one
    vector (``_flattened_effective_delta``, lines 41-49)."""
    vectors = [torch.cat([(specs[n].scale * f[n].B @ f[n].A).reshape(-1) for n in specs]) for f in clients]
    aggregate = sum(w * v for w, v in zip(weights, vectors, strict=True))
    client_norm_sum = sum(w * float(v.norm()) for w, v in zip(weights, vectors, strict=True))
    total = sum(weights)
    global_vector = sum((w / total) * v for w, v in zip(weights, vectors, strict=True))

    def cosine(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    pairs = [cosine(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
    return {
        "whole_model_cancellation_ratio": float(aggregate.norm()) / client_norm_sum,
        "whole_model_client_global_cosine": sum(cosine(v, global_vector) for v in vectors) / len(vectors),
        "whole_model_pairwise_cosine": sum(pairs) / len(pairs),
    }


@pytest.mark.parametrize("num_clients", [2, 3])
def test_whole_model_form_equals_the_published_code(num_clients):
    clients = _random_clients(num_clients, seed=num_clients)
    weights = [0.2, 0.8] if num_clients == 2 else [0.5, 0.3, 0.2]
    d = round_diagnostics(TWO_LAYERS, clients, weights).as_dict()
    for key, value in _official_whole_model(TWO_LAYERS, clients, weights).items():
        assert d[key] == pytest.approx(value, rel=1e-12), key


def test_whole_model_and_per_layer_forms_differ_when_layers_disagree():
    """One small layer cancels exactly, one large layer agrees: the per-layer mean of the cancellation ratio is
    (0 + 1) / 2, the whole-model ratio is close to 1 because the large layer dominates the flattened norm."""
    g = torch.Generator().manual_seed(5)
    B_s, A_s = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    B_l, A_l = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    small = 1e-3
    clients = [
        {"small": LowRank(small * B_s, A_s), "large": LowRank(B_l, A_l)},
        {"small": LowRank(-small * B_s, A_s), "large": LowRank(B_l, A_l)},
    ]
    d = round_diagnostics(TWO_LAYERS, clients, [0.5, 0.5])
    assert d.cancellation_ratio == pytest.approx(0.5)
    assert d.pairwise_cosine == pytest.approx(0.0)
    assert d.whole_model_cancellation_ratio == pytest.approx(1.0, abs=1e-5)
    assert d.whole_model_pairwise_cosine == pytest.approx(1.0, abs=1e-5)
    assert d.whole_model_cancellation_ratio == pytest.approx(
        _official_whole_model(TWO_LAYERS, clients, [0.5, 0.5])["whole_model_cancellation_ratio"], rel=1e-12
    )


def test_whole_model_pairwise_cosine_needs_two_clients():
    d = round_diagnostics(TWO_LAYERS, _random_clients(1, seed=0), [1.0])
    assert d.whole_model_cancellation_ratio == pytest.approx(1.0)
    assert d.whole_model_client_global_cosine == pytest.approx(1.0)
    assert d.whole_model_pairwise_cosine != d.whole_model_pairwise_cosine  # nan, as the per-layer form
