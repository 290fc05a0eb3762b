"""Invariants of the baselines: FedSVD's orthonormal A, FFA-LoRA's frozen A, FedSA-LoRA's private B,
FRLoRA's backbone update and reset, and exact byte counts."""

from __future__ import annotations

import torch
from strategy_sim import play_round

from peft_fed.linalg import LowRank


def _run(build, specs, new_clients, method, rounds=3, base_weights=None):
    strategy = build(method, specs)
    state, initial = strategy.init_server(base_weights=base_weights)
    clients = new_clients(3)
    generator = torch.Generator().manual_seed(11)
    history = [state]
    outputs = []
    for r in range(rounds):
        participants = ["0", "1"] if r % 2 == 0 else ["1", "2"]
        result, uploads, trained, starts = play_round(
            strategy, state, clients, participants, {"0": 3, "1": 4, "2": 6}, generator
        )
        outputs.append((result, uploads, trained, starts))
        state = result.state
        history.append(state)
    return strategy, initial, history, outputs, clients


def test_fedsvd_keeps_orthonormal_rows(build, specs, new_clients):
    _, _, history, outputs, _ = _run(build, specs, new_clients, "fedsvd")
    for state in history:
        for n, s in specs.items():
            A = state.layers[n]["A"]
            torch.testing.assert_close(A @ A.T, torch.eye(s.rank, dtype=A.dtype), atol=1e-10, rtol=0)
    for _, uploads, _, starts in outputs:
        assert all(not st.train_A for st in starts)
        assert all(set(t) == {"B"} for u in uploads for t in u.layers.values())


def test_fedsvd_server_product_is_exact_average(build, specs, new_clients):
    strategy = build("fedsvd", specs)
    state, _ = strategy.init_server()
    result, uploads, _, _ = play_round(
        strategy, state, new_clients(2), ["0", "1"], {"0": 1, "1": 3}, torch.Generator().manual_seed(0)
    )
    for n in specs:
        A_prev = state.layers[n]["A"]
        expected = sum(w * u.layers[n]["B"] @ A_prev for w, u in zip(result.weights, uploads, strict=True))
        got = result.state.layers[n]["B"] @ result.state.layers[n]["A"]
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_ffa_lora_never_changes_A(build, specs, new_clients):
    _, _, history, outputs, clients = _run(build, specs, new_clients, "ffa_lora")
    A0 = {n: history[0].layers[n]["A"] for n in specs}
    for state in history:
        for n in specs:
            assert torch.equal(state.layers[n]["A"], A0[n])
    for _, uploads, trained, starts in outputs:
        for st, tr in zip(starts, trained, strict=True):
            assert not st.train_A
            assert all(torch.equal(tr[n].A, A0[n]) for n in specs)
        assert all(set(t) == {"B"} for u in uploads for t in u.layers.values())


def test_ffa_lora_sends_A_only_on_first_contact(build, specs, new_clients):
    strategy, _, history, _, clients = _run(build, specs, new_clients, "ffa_lora", rounds=1)
    returning = strategy.configure(history[-1], clients["0"])
    newcomer = strategy.configure(history[-1], clients["2"])
    assert all(set(t) == {"B"} for t in returning.layers.values())
    assert all(set(t) == {"B", "A"} for t in newcomer.layers.values())
    size = sum(4 * s.out_features * s.rank for s in specs.values())  # float32? no: float64 here
    assert returning.nbytes == 2 * size


def test_fedsa_lora_never_shares_B(build, specs, new_clients):
    strategy, _, history, outputs, clients = _run(build, specs, new_clients, "fedsa_lora")
    for _, uploads, _, _ in outputs:
        assert all(set(t) == {"A"} for u in uploads for t in u.layers.values())
    broadcast = strategy.configure(history[-1], clients["1"])
    assert all(set(t) == {"A"} for t in broadcast.layers.values())
    # each client resumes from its own B
    start = strategy.client_begin(broadcast, clients["1"])
    last_trained = outputs[-1][2][1]  # the last round was ["0", "1"]
    for n in specs:
        assert torch.equal(start.factors[n].B, last_trained[n].B)


def test_frlora_backbone_update_and_reset(build, specs, new_clients):
    generator = torch.Generator().manual_seed(5)
    W0 = {n: torch.randn(s.out_features, s.in_features, generator=generator, dtype=torch.float64) for n, s in specs.items()}
    strategy, initial, history, outputs, clients = _run(build, specs, new_clients, "frlora", rounds=2, base_weights=W0)
    principal = {n: LowRank(history[0].layers[n]["B0"], history[0].layers[n]["A0"]) for n in specs}
    for n, s in specs.items():
        U, S, Vh = torch.linalg.svd(W0[n])
        # s * B0 A0 is the best rank-r part of W0, and the initial update removes it
        torch.testing.assert_close(s.scale * principal[n].dense(), (U[:, : s.rank] * S[: s.rank]) @ Vh[: s.rank], atol=1e-10, rtol=0)
        torch.testing.assert_close(initial[n].dense(), -s.scale * principal[n].dense(), atol=1e-12, rtol=0)
    W = {n: W0[n] + initial[n].dense() for n in specs}
    for result, uploads, _, starts in outputs:
        for st in starts:  # every client restarts from (B0, A0)
            for n in specs:
                torch.testing.assert_close(st.factors[n].dense(), principal[n].dense(), atol=0, rtol=0)
        for n, s in specs.items():
            B_bar = sum(w * u.layers[n]["B"] for w, u in zip(result.weights, uploads, strict=True))
            A_bar = sum(w * u.layers[n]["A"] for w, u in zip(result.weights, uploads, strict=True))
            expected = s.scale * (B_bar @ A_bar - principal[n].dense())
            torch.testing.assert_close(result.backbone_update[n].dense(), expected, atol=1e-10, rtol=0)
            # the global model (backbone + restart factors) is the FedAvg model on the previous backbone
            W_next = W[n] + result.backbone_update[n].dense()
            torch.testing.assert_close(
                W_next + s.scale * principal[n].dense(), W[n] + s.scale * B_bar @ A_bar, atol=1e-10, rtol=0
            )
            W[n] = W_next


def test_upload_bytes_are_exact(build, specs, new_clients):
    for method, per_layer in (("fedit", lambda s: s.rank * (s.out_features + s.in_features)),
                              ("ffa_lora", lambda s: s.rank * s.out_features),
                              ("fedsa_lora", lambda s: s.rank * s.in_features)):
        _, _, _, outputs, _ = _run(build, specs, new_clients, method, rounds=1)
        upload = outputs[0][1][0]
        assert upload.nbytes == 8 * sum(per_layer(s) for s in specs.values())  # float64


def test_flora_downlink_carries_stacked_update(build, specs, new_clients):
    strategy, _, history, outputs, clients = _run(build, specs, new_clients, "flora", rounds=1)
    broadcast = strategy.configure(history[-1], clients["0"])
    assert broadcast.backbone_catch_up.num_updates == 1
    # the 2 clients' stacked update (rank 2r), or the dense m x n matrix where that is fewer numbers (8 x 14, r = 3)
    assert broadcast.nbytes == 8 * sum(min(2 * s.rank * (s.out_features + s.in_features), s.out_features * s.in_features)
                                       for s in specs.values())  # fmt: skip
    assert [d.form for d in broadcast.backbone_catch_up.layers.values()] == ["low_rank", "dense"]
    assert broadcast.backbone_version == 1
