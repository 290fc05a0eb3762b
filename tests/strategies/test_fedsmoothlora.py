"""FedSmoothLoRA: offset cancellation, Round-Matching resume (also with partial participation),
upload and merge as SPEC, zeta schedule, rank and zeta validation."""

from __future__ import annotations

import math

import pytest
import torch
from strategy_sim import quadratic_gradient_fn

from peft_fed.linalg import LowRank, best_rank_r
from peft_fed.state import ClientState, LayerSpec
from peft_fed.strategies.fedsmoothlora import FedSmoothLoRAHyperparameters

SAMPLES = {"0": 4, "1": 6, "2": 5}


def _rank_r_training(start, generator):
    """Local training whose change keeps the rank at r: B fixed, A moved (``B_0 Z`` is rank r)."""
    return {
        n: LowRank(f.B.clone(), f.A + 0.2 * torch.randn(f.A.shape, generator=generator, dtype=f.A.dtype))
        for n, f in start.factors.items()
    }


class Simulation:
    """Pure-tensor FedSmoothLoRA run that tracks the dense backbone ``W`` and every client's end point."""

    def __init__(self, strategy, specs, seed=0):
        self.strategy, self.specs = strategy, specs
        self.state, _ = strategy.init_server()
        generator = torch.Generator().manual_seed(seed)
        self.W = {n: torch.randn(s.out_features, s.in_features, generator=generator, dtype=torch.float64) for n, s in specs.items()}
        self.clients = {c: ClientState(c) for c in SAMPLES}
        self.gradient_fn = quadratic_gradient_fn(specs)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.starts, self.ends = {}, {}

    def effective(self, start, factors):
        return {n: self.W[n] + start.backbone_offsets[n] + s.scale * factors[n].dense() for n, s in self.specs.items()}

    def play(self, participants, training=_rank_r_training):
        uploads = []
        for c in participants:
            broadcast = self.strategy.configure(self.state, self.clients[c])
            start = self.strategy.client_begin(broadcast, self.clients[c], self.gradient_fn)
            self.starts[c] = self.effective(start, start.factors)
            trained = training(start, self.generator)
            self.ends[c] = self.effective(start, trained)
            upload, self.clients[c] = self.strategy.client_end(
                trained, {}, start, self.clients[c], SAMPLES[c], broadcast.backbone_version
            )
            uploads.append((upload, start, trained))
        result = self.strategy.aggregate(self.state, [u for u, _, _ in uploads])
        for n, update in result.backbone_update.items():
            self.W[n] = self.W[n] + update.dense()
        self.state = result.state
        return result, uploads


def _gap(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_first_round_offset_cancels(build, specs):
    sim = Simulation(build("fedsmoothlora", specs), specs)
    W0 = {n: w.clone() for n, w in sim.W.items()}
    sim.play(["0", "1", "2"])
    for c in SAMPLES:
        assert _gap(sim.starts[c], W0) < 1e-12


@pytest.mark.parametrize("participation", [[["0", "1", "2"]] * 2, [["0", "1"], ["1", "2"], ["0", "2"]]])
def test_exact_round_matching_resumes_where_client_ended(build, specs, participation):
    """A client's next start equals its last end point, also after rounds it missed.

    Checked from each client's first participation to its second: the first local change (B fixed, A
    moved) is rank r, so the upload U_c loses nothing, and any mismatch would come from Round-Matching.
    Later changes also carry W_rm and are truncated by the rank-r upload, as SPEC says.
    """
    sim = Simulation(build("fedsmoothlora", specs, exact_round_matching=True), specs)
    first_end: dict[str, dict] = {}
    checked = set()
    for participants in participation:
        sim.play(participants)
        for c in participants:
            if c in first_end and c not in checked:
                assert _gap(sim.starts[c], first_end[c]) < 1e-10
                checked.add(c)
            first_end.setdefault(c, sim.ends[c])
    assert len(checked) >= 2


def test_paper_mode_resumes_exactly_when_nothing_is_truncated(build):
    """One client, full participation: SVD_r(U_c) = U_c, so D_c = U_c, W_rm = 0 and nothing is truncated."""
    specs = {"w": LayerSpec(10, 8, 2, 1.5)}
    strategy = build("fedsmoothlora", specs)
    sim = Simulation(strategy, specs)
    sim.clients = {"0": ClientState("0")}
    sim.play(["0"])
    end = sim.ends["0"]
    sim.play(["0"])
    assert _gap(sim.starts["0"], end) < 1e-10


def test_paper_mode_start_error_is_the_truncation_residual(build, specs):
    sim = Simulation(build("fedsmoothlora", specs), specs)
    sim.play(["0", "1"])
    end = sim.ends["0"]
    sim.play(["1", "2"])
    broadcast = sim.strategy.configure(sim.state, sim.clients["0"])
    start = sim.strategy.client_begin(broadcast, sim.clients["0"], sim.gradient_fn)
    W_rm = sim.strategy.round_matching(broadcast, sim.clients["0"])
    W_ga = {n: -start.backbone_offsets[n] / s.scale for n, s in specs.items()}
    for n, s in specs.items():
        target = W_ga[n] + W_rm[n]
        residual = target - best_rank_r(target, s.rank).dense()
        got = sim.effective(start, start.factors)[n] - end[n]
        torch.testing.assert_close(got, -s.scale * residual, atol=1e-10, rtol=0)
        assert residual.abs().max() > 1e-6  # the test would be vacuous without truncation


def test_upload_and_merge_follow_spec(build, specs):
    sim = Simulation(build("fedsmoothlora", specs), specs)
    W_before = {n: w.clone() for n, w in sim.W.items()}
    result, uploads = sim.play(["0", "1", "2"])
    for upload, start, trained in uploads:
        for n, s in specs.items():
            W_ga = -start.backbone_offsets[n] / s.scale
            expected = best_rank_r(trained[n].dense() - W_ga, s.rank).dense()
            got = upload.layers[n]["B"] @ upload.layers[n]["A"]
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    for n, s in specs.items():
        full = sum(w * (u.layers[n]["B"] @ u.layers[n]["A"]) for w, (u, _, _) in zip(result.weights, uploads, strict=True))
        merged = s.scale * best_rank_r(full, s.rank).dense()
        torch.testing.assert_close(sim.W[n] - W_before[n], merged, atol=1e-10, rtol=0)
        # only rank-r factors travel, in both directions
        assert result.backbone_update[n].rank == s.rank
    assert all(u.layers[n]["B"].shape[1] == specs[n].rank for u, _, _ in uploads for n in specs)


def test_gradient_aligned_factors(build, specs):
    strategy = build("fedsmoothlora", specs, gamma=16.0)
    gradients = quadratic_gradient_fn(specs)({n: torch.zeros(s.out_features, s.in_features) for n, s in specs.items()})
    aligned = strategy.gradient_aligned(gradients)
    for n, s in specs.items():
        U, _, Vh = torch.linalg.svd(gradients[n].double())
        stable = s.out_features**0.25 / math.sqrt(16.0)
        # singular vectors are defined up to sign, so compare magnitudes: B from vectors r..2r, A from 0..r
        torch.testing.assert_close(aligned[n].B.abs(), (U[:, s.rank : 2 * s.rank] * stable).abs(), atol=1e-5, rtol=0)
        torch.testing.assert_close(aligned[n].A.abs(), (Vh[: s.rank] * stable).abs(), atol=1e-5, rtol=0)


def test_randomized_svd_matches_full_on_large_layer():
    from peft_fed.linalg import truncated_svd

    generator = torch.Generator().manual_seed(0)
    low = torch.randn(600, 12, generator=generator) @ torch.randn(12, 700, generator=generator)
    noisy = low + 1e-3 * torch.randn(600, 700, generator=generator)
    _, S_full, _ = truncated_svd(noisy, 8, method="full")
    _, S_rand, _ = truncated_svd(noisy, 8, method="randomized", generator_seed=0)
    torch.testing.assert_close(S_rand, S_full, rtol=1e-3, atol=0)


def test_cosine_zeta_schedule():
    cosine = FedSmoothLoRAHyperparameters(zeta=1.0, zeta_schedule="cosine", zeta_min=0.5)
    values = [cosine.zeta_at(t, 10) for t in range(11)]
    assert values[0] == pytest.approx(1.0) and values[10] == pytest.approx(0.5)
    assert values[5] == pytest.approx(0.75)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert FedSmoothLoRAHyperparameters(zeta=0.8).zeta_at(7, None) == 0.8


def test_zeta_zero_ignores_history(build, specs):
    sim = Simulation(build("fedsmoothlora", specs, zeta=0.0), specs)
    sim.play(["0"])
    broadcast = sim.strategy.configure(sim.state, sim.clients["0"])
    assert all(float(m.abs().max()) == 0.0 for m in sim.strategy.round_matching(broadcast, sim.clients["0"]).values())


@pytest.mark.parametrize("bad", [{"zeta": 1.5}, {"zeta": -0.1}, {"zeta": 0.5, "zeta_min": 0.7}, {"gamma": 0.0},
                                 {"zeta_schedule": "linear"}, {"zeta_schedule": "cosine"}])
def test_bad_hyperparameters_are_rejected(build, specs, bad):
    with pytest.raises(ValueError):
        build("fedsmoothlora", specs, **bad)


def test_rank_too_large_for_a_layer(build):
    specs = {"ok": LayerSpec(16, 16, 4, 1.0), "small": LayerSpec(16, 6, 4, 1.0)}
    with pytest.raises(ValueError, match=r"2\*r <= min.*small \(16x6, largest valid r = 3\)"):
        build("fedsmoothlora", specs)


def test_needs_a_gradient_function(build, specs):
    strategy = build("fedsmoothlora", specs)
    state, _ = strategy.init_server()
    with pytest.raises(ValueError, match="gradient_fn"):
        strategy.client_begin(strategy.configure(state), ClientState("0"))
