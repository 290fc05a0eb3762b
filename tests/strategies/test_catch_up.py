"""The backbone catch-up a returning client is sent: the exact sum of the updates it missed, never more bytes than one
dense delta per layer, and FedSmoothLoRA's ``D_c`` from it equal to the per-version sum up to float rounding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from peft_fed.linalg import LowRank, exact_sum
from peft_fed.state import BackboneCatchUp, ClientState, LayerSpec, ServerState, low_rank_dict_nbytes
from peft_fed.strategies import STRATEGIES, get_strategy

#: two layers whose rank-4 updates are sent stacked for up to 5 missed updates and dense from 6 on
SPECS = {"q": LayerSpec(48, 40, 4, 2.0), "v": LayerSpec(40, 48, 4, 2.0)}
MERGING = sorted(name for name, cls in STRATEGIES.items() if cls.merges_into_backbone)
#: D_c from the catch-up (one product of the stacked factors) against the per-version sum, in float32, relative to the
#: largest entry of the sum: the same t*r products per entry summed in another order (measured: under 1e-6)
RELATIVE_TOLERANCE = 1e-5


def _history(versions: int, seed: int = 0) -> list[dict[str, LowRank]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {n: LowRank(s.scale * 0.1 * torch.randn(s.out_features, s.rank, generator=g), 0.1 * torch.randn(s.rank, s.in_features, generator=g))
         for n, s in SPECS.items()}
        for _ in range(versions)
    ]  # fmt: skip


def _returning_client(version: int, seed: int = 1) -> ClientState:
    g = torch.Generator().manual_seed(seed)
    layers = {n: {"U_B": torch.randn(s.out_features, s.rank, generator=g), "U_A": torch.randn(s.rank, s.in_features, generator=g)}
              for n, s in SPECS.items()}  # fmt: skip
    return ClientState("0", last_round=version, backbone_version=version, layers=layers)


def _check_round_matching(strategy, state: ServerState, client: ClientState) -> None:
    """``round_matching`` with the broadcast's catch-up equals ``zeta (U_c - sum_v B_v A_v / s)`` over the missed
    versions, added one by one as the per-version broadcast did (bit-identical for one missed update)."""
    broadcast = strategy.configure(state, client)
    got = strategy.round_matching(broadcast, client)
    zeta = strategy.zeta_at(broadcast.round)
    missed = state.backbone_history[client.backbone_version :]
    for name, spec in SPECS.items():
        own = client.layers[name]
        per_version = sum((update[name].dense() for update in missed), torch.zeros(spec.out_features, spec.in_features))
        expected = zeta * (own["U_B"] @ own["U_A"] - per_version / spec.scale)
        if len(missed) == 1:
            assert torch.equal(got[name], expected), name
        else:
            bound = RELATIVE_TOLERANCE * zeta * float(per_version.abs().max()) / spec.scale
            assert float((got[name] - expected).abs().max()) <= bound, name


@pytest.mark.parametrize("away", [1, 3, 12, 60])
def test_round_matching_with_the_catch_up_equals_the_per_version_sum(away):
    strategy = get_strategy("fedsmoothlora", SPECS, zeta=0.7)
    state = ServerState(round=80, backbone_history=_history(80))
    client = _returning_client(80 - away)
    forms = {delta.form for delta in strategy.configure(state, client).backbone_catch_up.layers.values()}
    assert forms == ({"low_rank"} if away <= 5 else {"dense"})  # both forms are covered
    _check_round_matching(strategy, state, client)


@pytest.mark.parametrize("away", [3, 12])
def test_a_catch_up_of_only_the_last_update_fails_the_exactness_check(away, monkeypatch):
    strategy = get_strategy("fedsmoothlora", SPECS, zeta=0.7)
    state = ServerState(round=20, backbone_history=_history(20))

    def last_update_only(self, version):  # a wrong catch-up: what a client would get from "send the newest merge"
        last = self.backbone_history[-1]
        return BackboneCatchUp(version, self.backbone_version, {n: exact_sum([u]) for n, u in last.items()})

    monkeypatch.setattr(ServerState, "catch_up", last_update_only)
    with pytest.raises(AssertionError):
        _check_round_matching(strategy, state, _returning_client(20 - away))


def test_the_form_never_changes_the_sum():
    terms = [update["q"] for update in _history(12)]
    sent = exact_sum(terms)
    assert sent.form == "dense"
    stacked = LowRank(torch.cat([t.B for t in terms], dim=1), torch.cat([t.A for t in terms], dim=0))
    assert torch.equal(sent.dense(), stacked.dense())  # the dense form is the stacked factors' product, bit for bit


@pytest.mark.parametrize("method", MERGING)
def test_downlink_is_bounded_by_one_dense_delta_and_unchanged_for_one_missed_update(method):
    strategy = get_strategy(method, SPECS)
    g = torch.Generator().manual_seed(5)
    base = {n: torch.randn(s.out_features, s.in_features, generator=g) for n, s in SPECS.items()}
    initial, _ = strategy.init_server(base_weights=base)
    history = _history(40)
    state = replace(initial, round=40, backbone_history=history)
    dense_bound = sum(4 * s.out_features * s.in_features for s in SPECS.values())
    for version in range(0, 41):
        client = ClientState("0", last_round=None if version == 0 else version - 1, backbone_version=version)
        broadcast = strategy.configure(state, client)
        catch_up = broadcast.backbone_catch_up
        away = 40 - version
        old = sum(low_rank_dict_nbytes(update) for update in state.updates_since(version))  # the per-version list
        assert (catch_up.start, catch_up.end, catch_up.num_updates) == (version, 40, away)
        assert catch_up.nbytes == sum(4 * min(away * s.rank * (s.out_features + s.in_features), s.out_features * s.in_features)
                                      for s in SPECS.values())  # fmt: skip
        assert catch_up.nbytes <= min(old, dense_bound)
        if away == 0:
            assert catch_up.layers == {} and catch_up.nbytes == 0
        if away == 1:  # exactly the missed update: the same tensors, the same bytes as the per-version broadcast
            assert catch_up.nbytes == old
            assert all(delta.factors is history[-1][n] for n, delta in catch_up.layers.items())
        if away >= 6:
            assert catch_up.nbytes == dense_bound


def test_a_method_that_does_not_merge_sends_no_catch_up():
    strategy = get_strategy("fedit", SPECS)
    state, _ = strategy.init_server()
    catch_up = strategy.configure(state, ClientState("0")).backbone_catch_up
    assert (catch_up.start, catch_up.end, catch_up.layers, catch_up.nbytes) == (0, 0, {}, 0)
