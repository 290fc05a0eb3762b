"""Exact aggregation: FLoRA, FedEx-LoRA and FlexLoRA (when the rank allows) reproduce the p-weighted
average of the clients' effective weights; FedIT does not."""

from __future__ import annotations

import torch
from strategy_sim import play_round

from peft_fed.linalg import LowRank
from peft_fed.state import Upload


def _base(specs):
    generator = torch.Generator().manual_seed(7)
    return {n: torch.randn(s.out_features, s.in_features, generator=generator, dtype=torch.float64) for n, s in specs.items()}


def _apply(W, updates):
    return {n: W[n] + (updates[n].dense() if n in updates else 0) for n in W}


def _client_effective(W, specs, trained):
    return {n: W[n] + specs[n].scale * trained[n].dense() for n in specs}


def _average(effectives, weights):
    return {n: sum(w * e[n] for w, e in zip(weights, effectives, strict=True)) for n in effectives[0]}


def _global_effective(strategy, W, result):
    """Backbone after the round's merge plus what every client starts from next round."""
    W_next = _apply(W, result.backbone_update)
    broadcast = strategy.configure(result.state, None)
    start = strategy.client_begin(broadcast, _fresh())
    return {n: W_next[n] + strategy.specs[n].scale * start.factors[n].dense() for n in W}


def _fresh():
    from peft_fed.state import ClientState

    return ClientState(client_id="probe")


def _gap(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _round(build, specs, new_clients, method, sizes=(3, 5, 9)):
    strategy = build(method, specs)
    state, _ = strategy.init_server()
    clients = new_clients(len(sizes))
    W = _base(specs)
    generator = torch.Generator().manual_seed(1)
    result, _, trained, _ = play_round(
        strategy, state, clients, list(clients), {c: n for c, n in zip(clients, sizes, strict=True)}, generator
    )
    target = _average([_client_effective(W, specs, t) for t in trained], result.weights)
    return strategy, W, result, target


def test_flora_is_exact(build, specs, new_clients):
    strategy, W, result, target = _round(build, specs, new_clients, "flora")
    # fresh LoRA next round has B = 0, so the global model is the merged backbone
    assert _gap(_apply(W, result.backbone_update), target) < 1e-10
    assert all(u.rank == 3 * specs[n].rank for n, u in result.backbone_update.items())


def test_fedex_lora_is_exact(build, specs, new_clients):
    strategy, W, result, target = _round(build, specs, new_clients, "fedex_lora")
    assert _gap(_global_effective(strategy, W, result), target) < 1e-10


def test_fedit_is_not_exact_on_heterogeneous_clients(build, specs, new_clients):
    strategy, W, result, target = _round(build, specs, new_clients, "fedit")
    gap = _gap(_global_effective(strategy, W, result), target)
    assert gap > 1e-2, f"FedIT should lose the cross terms of mean(B) mean(A); gap {gap}"


def test_weights_are_sample_counts(build, specs, new_clients):
    _, _, result, _ = _round(build, specs, new_clients, "fedit", sizes=(1, 1, 2))
    assert result.weights == [0.25, 0.25, 0.5]


def test_flexlora_exact_when_rank_allows(build, specs):
    """Clients whose updates share one r-dimensional column space: rank(Delta) <= r, no truncation."""
    strategy = build("flexlora", specs)
    state, _ = strategy.init_server()
    generator = torch.Generator().manual_seed(3)
    bases = {n: torch.randn(s.out_features, s.rank, generator=generator, dtype=torch.float64) for n, s in specs.items()}
    uploads, trained = [], []
    for cid, n_samples in (("a", 2), ("b", 6)):
        factors = {
            n: LowRank(
                bases[n] @ torch.randn(s.rank, s.rank, generator=generator, dtype=torch.float64),
                torch.randn(s.rank, s.in_features, generator=generator, dtype=torch.float64),
            )
            for n, s in specs.items()
        }
        trained.append(factors)
        uploads.append(Upload(cid, n_samples, {n: {"B": f.B, "A": f.A} for n, f in factors.items()}))
    result = strategy.aggregate(state, uploads)
    W = _base(specs)
    target = _average([_client_effective(W, specs, t) for t in trained], result.weights)
    assert _gap(_global_effective(strategy, W, result), target) < 1e-10


def test_flexlora_truncates_when_rank_does_not_allow(build, specs, new_clients):
    strategy, W, result, target = _round(build, specs, new_clients, "flexlora")
    assert _gap(_global_effective(strategy, W, result), target) > 1e-3
