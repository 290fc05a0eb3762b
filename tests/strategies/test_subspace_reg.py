"""Subspace-Reg: the regulariser against its explicit formula, the server factorisation, norm restoration
and clipping."""

from __future__ import annotations

import pytest
import torch

from peft_fed.linalg import LowRank
from peft_fed.state import Upload


def _factors(specs, seed, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in specs.items():
        B = torch.randn(s.B_shape, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)
        A = torch.randn(s.A_shape, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)
        out[n] = LowRank(B, A)
    return out


def explicit_regularizer(specs, factors, globals_, mu, beta, lam, per_layer=True):
    total = 0
    for n, s in specs.items():
        B, A = factors[n].B, factors[n].A
        Bg, Ag = globals_[n].B, globals_[n].A
        total = total + mu / 2 * torch.sum((s.scale * B @ A - s.scale * Bg @ Ag) ** 2)
        total = total + beta / 2 * torch.sum((B - Bg) ** 2) + lam / 2 * (torch.sum(A**2) + torch.sum(B**2))
    return total / len(specs) if per_layer else total


@pytest.mark.parametrize("normalize", [True, False])
def test_regularizer_value_and_gradient_match_formula(build, specs, normalize):
    mu, beta, lam = 0.3, 0.7, 0.11
    strategy = build("subspace_reg", specs, mu=mu, beta=beta, lam=lam, normalize_by_num_layers=normalize)
    globals_ = _factors(specs, 1)
    context = {n: {"B_g": f.B, "A_g": f.A} for n, f in globals_.items()}
    live = _factors(specs, 2, requires_grad=True)
    value = strategy.regularizer(live, context)
    expected = explicit_regularizer(specs, live, globals_, mu, beta, lam, normalize)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    value.backward()
    P = len(specs) if normalize else 1
    for n, s in specs.items():
        B, A, Bg, Ag = live[n].B, live[n].A, globals_[n].B, globals_[n].A
        residual = s.scale**2 * (B @ A - Bg @ Ag)
        grad_B = (mu * residual @ A.T + beta * (B - Bg) + lam * B) / P
        grad_A = (mu * B.T @ residual + lam * A) / P
        torch.testing.assert_close(B.grad, grad_B.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(A.grad, grad_A.detach(), rtol=1e-10, atol=1e-12)


def test_no_loss_term_when_all_weights_are_zero(build, specs):
    strategy = build("subspace_reg", specs, mu=0, beta=0, lam=0)
    state, _ = strategy.init_server()
    start = strategy.client_begin(strategy.configure(state), _client())
    assert strategy.client_loss(start.factors, start) is None


def _client():
    from peft_fed.state import ClientState

    return ClientState("c")


def _uploads(specs, seeds_and_sizes):
    uploads = []
    for seed, size in seeds_and_sizes:
        f = _factors(specs, seed)
        uploads.append(Upload(str(seed), size, {n: {"B": x.B, "A": x.A} for n, x in f.items()}))
    return uploads


def _delta(specs, uploads, weights):
    return {
        n: sum(w * s.scale * u.layers[n]["B"] @ u.layers[n]["A"] for w, u in zip(weights, uploads, strict=True))
        for n, s in specs.items()
    }


def test_server_B_is_orthonormal_and_norm_is_restored(build, specs):
    strategy = build("subspace_reg", specs, clip_norm=None)
    state, _ = strategy.init_server()
    uploads = _uploads(specs, [(3, 2), (4, 5), (5, 1)])
    result = strategy.aggregate(state, uploads)
    delta = _delta(specs, uploads, result.weights)
    for n, s in specs.items():
        B_g, A_g = result.state.layers[n]["B"], result.state.layers[n]["A"]
        torch.testing.assert_close(B_g.T @ B_g, torch.eye(s.rank, dtype=B_g.dtype), atol=1e-10, rtol=0)
        restored = torch.linalg.norm(s.scale * B_g @ A_g)
        torch.testing.assert_close(restored, torch.linalg.norm(delta[n]), rtol=1e-10, atol=0)
        # the column space is the top-r left singular space of Delta
        U, _, _ = torch.linalg.svd(delta[n])
        overlap = torch.linalg.norm(U[:, : s.rank].T @ B_g) ** 2 / s.rank
        assert float(overlap) == pytest.approx(1.0, abs=1e-10)


def test_restore_into_both_gives_the_same_product(build, specs):
    uploads = _uploads(specs, [(3, 2), (4, 5)])
    products = []
    for where in ("A", "both"):
        strategy = build("subspace_reg", specs, clip_norm=None, restore_norm_into=where)
        state, _ = strategy.init_server()
        result = strategy.aggregate(state, uploads)
        products.append({n: t["B"] @ t["A"] for n, t in result.state.layers.items()})
    for n in specs:
        torch.testing.assert_close(products[0][n], products[1][n], rtol=1e-10, atol=1e-12)


def test_clipping_bounds_the_update_norm(build, specs):
    tau = 0.5
    strategy = build("subspace_reg", specs, clip_norm=tau)
    state, _ = strategy.init_server()
    uploads = _uploads(specs, [(3, 2), (4, 5)])
    result = strategy.aggregate(state, uploads)
    delta = _delta(specs, uploads, result.weights)
    for n, s in specs.items():
        assert float(torch.linalg.norm(delta[n])) > tau  # the test needs an update that gets clipped
        got = torch.linalg.norm(s.scale * result.state.layers[n]["B"] @ result.state.layers[n]["A"])
        assert float(got) == pytest.approx(tau, rel=1e-10)


def test_not_merged_into_backbone(build, specs):
    strategy = build("subspace_reg", specs)
    state, _ = strategy.init_server()
    result = strategy.aggregate(state, _uploads(specs, [(3, 2)]))
    assert result.backbone_update == {} and result.state.backbone_version == 0


@pytest.mark.parametrize("bad", [{"mu": -1.0}, {"beta": -0.1}, {"lam": -1e-3}, {"clip_norm": 0.0}, {"restore_norm_into": "B"}])
def test_bad_hyperparameters(build, specs, bad):
    with pytest.raises(ValueError):
        build("subspace_reg", specs, **bad)
