"""FedSmoothLoRA's round against the authors' code (github.com/wangzehao0704/FedSmoothLoRA), re-derived here.

``OfficialFedSmoothLoRA`` transcribes the per-layer mathematics of ``IC_exp/fedsmoothlora.py`` (image
classification) and ``NLG_exp/fedsmoothlora.py`` (generation) with the helpers they call, on dense tensors and
without peft-fed: Round-Matching, the gradient-aligned factors, the start factors, the backbone shift, the
upload, the server's factors and the merge. Both runs get the same backbone, the same client gradients (a
quadratic loss per client) and the same "local training" (a fixed perturbation added to each side's own start
factors), so every tensor the two produce must agree, with each of the two factor splits the code bases use.
"""

from __future__ import annotations

import math

import pytest
import torch

from peft_fed.linalg import LowRank
from peft_fed.state import ClientState

CLIENTS = ("0", "1", "2")
SAMPLES = {"0": 30, "1": 70, "2": 45}  # unequal: the weighting matters
NUM_ROUNDS = 3


def official_svd_split(matrix: torch.Tensor, rank: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix_truncated_svd_every_layer``: IC_exp/utils.py lines 102-111 (``u sqrt(s)``, ``sqrt(s) v``) and
    NLG_exp/utils.py lines 94-99 (``u s``, ``v``). ``torch.svd`` there is ``torch.linalg.svd`` with ``V = Vh^T``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    u, s, v = u[:, :rank], s[:rank], vh[:rank, :]
    if split == "balanced":  # IC_exp
        return u @ torch.diag(torch.sqrt(s)), torch.diag(torch.sqrt(s)) @ v
    return u @ torch.diag(s), v  # NLG_exp


def official_gradient_aligned(gradient: torch.Tensor, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``LocalUpdate.get_ga_dict``: IC_exp/update.py lines 133-142 (the NLG code's LoRA-GA "stable" init is
    the same: ``B = U[:, r:2r]``, ``A = V^T[:r]``, both times ``m**0.25 / sqrt(gamma)``)."""
    U, S, Vh = torch.linalg.svd(gradient, full_matrices=False)
    B = U[:, rank : 2 * rank]
    A = Vh[:rank, :]
    p, _ = gradient.shape
    return B * p**0.25 / gamma**0.5, A * p**0.25 / gamma**0.5


def official_cosine_zeta(current_round: int, total_rounds: int, initial_zeta: float, min_zeta: float) -> float:
    """``cosine_zeta_schedule``: IC_exp/utils.py line 70."""
    return min_zeta + 0.5 * (initial_zeta - min_zeta) * (1 + math.cos(math.pi * current_round / total_rounds))


class OfficialFedSmoothLoRA:
    """The official round, per layer, every client in every round (the NLG code's ``get_clients_this_round``)."""

    def __init__(self, specs, backbone, *, gamma, zeta, zeta_mode, min_zeta, split):
        self.specs, self.W = specs, {n: w.clone() for n, w in backbone.items()}
        self.gamma, self.zeta, self.zeta_mode, self.min_zeta, self.split = gamma, zeta, zeta_mode, min_zeta, split
        self.local = {}  # local_weights_list / local_dict_list: each client's last upload (B, A)
        self.global_svd = None  # global_weights_svd / global_dict: the server's last factors

    def client_round(self, epoch, client, gradient_at, train):
        starts, offsets, ga_products = {}, {}, {}
        if epoch > 0:
            # IC_exp/fedsmoothlora.py lines 139-151: W_rm = zeta_t (B_c A_c - B_s A_s)
            zeta = self.zeta if self.zeta_mode == "constant" else official_cosine_zeta(epoch, NUM_ROUNDS, self.zeta, self.min_zeta)
            rm = {n: zeta * (self.local[client][n][0] @ self.local[client][n][1] - self.global_svd[n][0] @ self.global_svd[n][1])
                  for n in self.specs}  # fmt: skip
        else:
            rm = {n: torch.zeros_like(w) for n, w in self.W.items()}
        # update.py lines 73-81: the gradient is estimated at W + s W_rm
        gradients = gradient_at({n: self.W[n] + s.scale * rm[n] for n, s in self.specs.items()})
        for n, spec in self.specs.items():
            B_ga, A_ga = official_gradient_aligned(gradients[n], spec.rank, self.gamma)
            ga_products[n] = B_ga @ A_ga
            # lines 113-133 (first round: the GA factors) and 166-185 (later: SVD_r(W_ga + W_rm)); both shift
            # the backbone by -s W_ga
            starts[n] = (B_ga, A_ga) if epoch == 0 else official_svd_split(ga_products[n] + rm[n], spec.rank, self.split)
            offsets[n] = -spec.scale * ga_products[n]
        trained = train(starts)
        # lines 188-195: upload SVD_r(B A - W_ga)
        self.local[client] = {
            n: official_svd_split(trained[n][0] @ trained[n][1] - ga_products[n], s.rank, self.split)
            for n, s in self.specs.items()
        }
        return starts, offsets, self.local[client]

    def server_round(self, clients):
        # NLG_exp/utils.py line 241 (``global_aggregate``): each client weighted by its own sample count
        total = sum(SAMPLES[c] for c in clients)
        self.global_svd = {}
        for n, spec in self.specs.items():
            average = sum(self.local[c][n][0] @ self.local[c][n][1] * SAMPLES[c] / total for c in clients)
            self.global_svd[n] = official_svd_split(average, spec.rank, self.split)  # IC line 211, NLG line 291
            # IC line 242 / NLG line 298, merge_and_unload: W += s B_s A_s
            self.W[n] = self.W[n] + spec.scale * self.global_svd[n][0] @ self.global_svd[n][1]
        return self.global_svd


def _targets(specs, client):
    g = torch.Generator().manual_seed(100 + int(client))
    return {n: torch.randn(s.out_features, s.in_features, generator=g, dtype=torch.float64) for n, s in specs.items()}


def _training_moves(specs, round_index, client):
    g = torch.Generator().manual_seed(1000 * round_index + int(client))
    return {n: (0.3 * torch.randn(s.B_shape, generator=g, dtype=torch.float64),
                0.3 * torch.randn(s.A_shape, generator=g, dtype=torch.float64)) for n, s in specs.items()}  # fmt: skip


def _assert_factors(ours: LowRank, theirs: tuple[torch.Tensor, torch.Tensor], what: str, *, pair_signs: bool = False) -> None:
    if pair_signs:
        # peft-fed takes the server's SVD through the stacked uploads' factors (exact, never forming the
        # m x n sum), the official code densely: a singular pair (u_i, v_i) may come out as (-u_i, -v_i). The
        # sign cancels in B_s A_s, the only form in which either code uses the server's factors.
        signs = torch.sign((ours.B * theirs[0]).sum(0))
        ours = LowRank(ours.B * signs, signs[:, None] * ours.A)
    torch.testing.assert_close(ours.B, theirs[0], rtol=1e-9, atol=1e-10, msg=lambda m: f"{what} B: {m}")
    torch.testing.assert_close(ours.A, theirs[1], rtol=1e-9, atol=1e-10, msg=lambda m: f"{what} A: {m}")


@pytest.mark.parametrize("split", ["balanced", "singular_values_in_B"])
@pytest.mark.parametrize(("zeta_schedule", "zeta_min"), [("constant", 0.0), ("cosine", 0.5)])
def test_round_equals_the_official_code(build, specs, split, zeta_schedule, zeta_min):
    gamma, zeta = 16.0, 0.9
    strategy = build("fedsmoothlora", specs, gamma=gamma, zeta=zeta, zeta_schedule=zeta_schedule, zeta_min=zeta_min,
                     svd_factor_split=split, num_rounds=NUM_ROUNDS)  # fmt: skip
    g = torch.Generator().manual_seed(7)
    W = {n: torch.randn(s.out_features, s.in_features, generator=g, dtype=torch.float64) for n, s in specs.items()}
    official = OfficialFedSmoothLoRA(specs, W, gamma=gamma, zeta=zeta, zeta_mode="constant" if zeta_schedule == "constant" else "decay",
                                     min_zeta=zeta_min, split=split)  # fmt: skip
    state, _ = strategy.init_server()
    clients = {c: ClientState(c) for c in CLIENTS}
    for round_index in range(NUM_ROUNDS):
        uploads = []
        for c in CLIENTS:
            targets = _targets(specs, c)
            moves = _training_moves(specs, round_index, c)

            def gradient_at(weights, targets=targets):  # dL/dW of 0.5 ||W - T_c||^2
                return {n: weights[n] - targets[n] for n in specs}

            def train(starts, moves=moves):
                return {n: (starts[n][0] + moves[n][0], starts[n][1] + moves[n][1]) for n in specs}

            their_start, their_offsets, their_upload = official.client_round(round_index, c, gradient_at, train)

            broadcast = strategy.configure(state, clients[c])
            start = strategy.client_begin(broadcast, clients[c], lambda offsets: gradient_at({n: W[n] + offsets[n] for n in specs}))
            trained = {n: LowRank(*train({n: (f.B, f.A) for n, f in start.factors.items()})[n]) for n in specs}
            upload, clients[c] = strategy.client_end(trained, {}, start, clients[c], SAMPLES[c], broadcast.backbone_version)
            uploads.append(upload)
            for n in specs:
                _assert_factors(start.factors[n], their_start[n], f"round {round_index} client {c} start {n}")
                torch.testing.assert_close(start.backbone_offsets[n], their_offsets[n], rtol=1e-9, atol=1e-10)
                _assert_factors(LowRank(upload.layers[n]["B"], upload.layers[n]["A"]), their_upload[n], f"upload {n}")
        result = strategy.aggregate(state, uploads)
        their_server = official.server_round(CLIENTS)
        for n, spec in specs.items():
            update = result.backbone_update[n]
            _assert_factors(LowRank(update.B / spec.scale, update.A), their_server[n], f"round {round_index} server {n}",
                            pair_signs=True)  # fmt: skip
            W[n] = W[n] + update.dense()
            torch.testing.assert_close(W[n], official.W[n], rtol=1e-9, atol=1e-10)
        state = result.state


def test_the_two_splits_differ_in_factors_not_in_products(build, specs):
    """The setting changes where local training starts (the factors), never the start point (the product)."""
    strategies = {split: build("fedsmoothlora", specs, svd_factor_split=split) for split in ("balanced", "singular_values_in_B")}
    g = torch.Generator().manual_seed(3)
    for spec in specs.values():
        matrix = torch.randn(spec.out_features, spec.in_features, generator=g, dtype=torch.float64)
        balanced = strategies["balanced"].rank_r_factors(matrix, spec.rank)
        in_B = strategies["singular_values_in_B"].rank_r_factors(matrix, spec.rank)
        torch.testing.assert_close(balanced.dense(), in_B.dense(), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(balanced.B, in_B.B)
        # B = U S, A = V^T: the rows of A are orthonormal; balanced: B^T B = A A^T = S
        torch.testing.assert_close(in_B.A @ in_B.A.mT, torch.eye(spec.rank, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(balanced.B.mT @ balanced.B, balanced.A @ balanced.A.mT, rtol=1e-10, atol=1e-12)


def test_rank_r_factors_keep_the_declared_rank_for_a_smaller_matrix(build, specs):
    strategy = build("fedsmoothlora", specs, svd_factor_split="singular_values_in_B")
    low = LowRank(torch.ones(12, 1, dtype=torch.float64), torch.ones(1, 10, dtype=torch.float64))
    factors = strategy.rank_r_factors(low, 2)
    assert factors.B.shape == (12, 2) and factors.A.shape == (2, 10)
    torch.testing.assert_close(factors.dense(), low.dense(), rtol=1e-12, atol=1e-12)


def official_ic_average_weights(w, count_list, idxs_users):
    """``average_weights``: IC_exp/utils.py lines 289-308, verbatim; line 304 weights the i-th *selected* client
    by ``count_list[i]``, the size of client ``i`` (the loop index), not of client ``idxs_users[i]``."""
    temp_count_list = [count_list[i] for i in idxs_users]
    temp_w = [w[i] for i in idxs_users]
    total_count = sum(temp_count_list)
    keys = list(temp_w[0].keys())
    w_avg = {key: 0 for key in keys}
    for i, weights in enumerate(temp_w):
        weight_factor = count_list[i] / total_count
        for key in keys:
            w_avg[key] += weights[key] * weight_factor
    return w_avg


def test_official_image_code_weights_by_loop_index_and_peft_fed_by_client(build):
    """Finding 5: with unequal sizes and a selection that is not clients 0..m-1 in order (a partial sample, or
    every client in the random order of ``np.random.choice``), the image-classification code's average differs
    from the sample-weighted mean (with a partial sample its weights need not sum to 1); peft-fed's server
    weighting is the per-client one, as the generation code's ``global_aggregate``."""
    from peft_fed.state import LayerSpec

    specs = {"l": LayerSpec(out_features=6, in_features=6, rank=2, scale=1.0)}
    strategy = build("fedsmoothlora", specs)
    sizes = [10, 40, 25, 25]
    chosen = [2, 1]
    g = torch.Generator().manual_seed(11)
    updates = [{"l": torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 6, generator=g, dtype=torch.float64)}
               for _ in sizes]  # fmt: skip
    theirs = official_ic_average_weights(updates, sizes, chosen)["l"]
    per_client = sum(sizes[c] * updates[c]["l"] for c in chosen) / sum(sizes[c] for c in chosen)
    expected_loop_index = (sizes[0] * updates[2]["l"] + sizes[1] * updates[1]["l"]) / 65
    torch.testing.assert_close(theirs, expected_loop_index, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(theirs, per_client)
    # full participation (the code's default frac = 1) draws the clients in a random order: still permuted weights
    everyone = [3, 0, 2, 1]
    permuted = official_ic_average_weights(updates, sizes, everyone)["l"]
    torch.testing.assert_close(permuted, sum(sizes[i] * updates[c]["l"] for i, c in enumerate(everyone)) / 100)
    assert not torch.allclose(permuted, sum(sizes[c] * updates[c]["l"] for c in everyone) / 100)

    gradient = torch.randn(6, 6, generator=g, dtype=torch.float64)
    uploads, state = [], strategy.init_server()[0]
    for c in chosen:
        client = ClientState(str(c))
        broadcast = strategy.configure(state, client)
        start = strategy.client_begin(broadcast, client, lambda offsets: {"l": gradient + offsets["l"]})
        U, S, Vh = torch.linalg.svd(updates[c]["l"])
        # trained factors [U S, B_ga][V^T; A_ga]: the upload SVD_r(B A - W_ga) is exactly this client's update
        trained = {"l": LowRank(torch.cat([U[:, :2] * S[:2], start.factors["l"].B], 1),
                                torch.cat([Vh[:2], start.factors["l"].A], 0))}  # fmt: skip
        uploads.append(strategy.client_end(trained, {}, start, client, sizes[c], broadcast.backbone_version)[0])
    result = strategy.aggregate(state, uploads)
    # the rank-2 server update of the per-client mean, not of the loop-index mean
    U, S, Vh = torch.linalg.svd(per_client)
    torch.testing.assert_close(result.backbone_update["l"].dense(), (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("policy", "expected_batches"), [("available", 5), ("cycle", 8)])
def test_small_client_gradient_batches_follow_the_setting(tmp_path, policy, expected_batches):
    """A client of 20 examples in batches of 4 has 5 batches, fewer than N_ga = 8. ``available`` is the official
    estimate (IC_exp/update.py lines 96-109: stop at ``sample_size // bsz`` batches or when the loader ends,
    divide by the count): every example once. ``cycle`` repeats reshuffled passes up to 8 batches. The trainer
    reads the choice from the strategy."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from fed_setup import client_dataset, make_trainer

    clients = [client_dataset(i, n=20) for i in range(2)]
    trainer = make_trainer("fedsmoothlora", tmp_path, clients=clients, num_gradient_batches=8,
                           method_kwargs={"small_client_gradient_batches": policy})  # fmt: skip
    batches = trainer._gradient_batches(clients[0], seed=3)()
    assert len(batches) == expected_batches
    rows = sorted(tuple(row) for batch in batches for row in batch["input_ids"].tolist())
    dataset_rows = sorted(tuple(row) for row in clients[0]["input_ids"])
    if policy == "available":
        assert rows == dataset_rows  # each example exactly once
    else:
        assert set(rows) == set(dataset_rows) and len(rows) == 32  # repeats: 32 rows from 20 examples
