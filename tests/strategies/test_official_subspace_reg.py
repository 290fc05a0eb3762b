"""Subspace-Reg's round against the published code (github.com/sadia-sigma-lab/
Subspace-Constrained-Federated-learning-with-Lora), re-derived here without peft-fed.

The server step (``aggregate_subspace_reg`` -> ``aggregate_svd_like`` -> ``factorize_effective_delta`` with
``factorization='orthogonal_b'``, src/aggregation.py and src/lora_utils.py) and the client's regulariser
(``_regularization_term``, src/client.py) are transcribed below. Over several rounds with the same clients,
weights and "local training", peft-fed's ``restore_norm_into="both"`` must give the published factors;
``"A"`` the same products with an orthonormal ``B_g``, so the two forms start the next round from different
factors and anchor ``beta`` to a different ``B_g``.
"""

from __future__ import annotations

import math

import pytest
import torch

from peft_fed.linalg import LowRank
from peft_fed.state import ClientState

SAMPLES = {"0": 20, "1": 50, "2": 30}


def official_factorize_orthogonal_b(delta_effective, scaling, rank, max_effective_fro_norm):
    """``factorize_effective_delta`` (src/lora_utils.py lines 112-143) with ``factorize_delta_orthogonal_b``
    (lines 95-100) and ``maybe_clip_frobenius`` (lines 103-109)."""
    target_effective = delta_effective
    norm = float(torch.linalg.matrix_norm(target_effective, ord="fro"))
    if max_effective_fro_norm is not None and max_effective_fro_norm > 0 and norm > max_effective_fro_norm:
        target_effective = target_effective * (max_effective_fro_norm / max(norm, 1e-12))
    target_unscaled = target_effective / scaling
    u, s, vh = torch.linalg.svd(target_unscaled, full_matrices=False)
    r = min(rank, s.numel())
    new_b, new_a = u[:, :r], s[:r].unsqueeze(1) * vh[:r, :]
    recon_effective = (new_b @ new_a) * scaling
    target_norm = float(torch.linalg.matrix_norm(target_effective, ord="fro"))
    recon_norm = float(torch.linalg.matrix_norm(recon_effective, ord="fro"))
    if target_norm > 0.0 and recon_norm > 0.0:
        ratio = math.sqrt(target_norm / max(recon_norm, 1e-12))  # line 140: sqrt(c) on both factors
        new_a, new_b = new_a * ratio, new_b * ratio
    return new_b, new_a


def official_server_step(specs, client_factors, weights, clip):
    """``aggregate_svd_like`` (src/aggregation.py lines 28-60): ``sum_c w_c * s B_c A_c`` per layer, factorised."""
    out = {}
    for n, spec in specs.items():
        delta = sum(w * (f[n][0] @ f[n][1]) * spec.scale for w, f in zip(weights, client_factors, strict=True))
        out[n] = official_factorize_orthogonal_b(delta, spec.scale, spec.rank, clip)
    return out


def official_regularizer(specs, live, global_factors, mu, alpha, lambda_reg):
    """``_regularization_term`` (src/client.py lines 47-85); ``refs`` from ``build_reference_bundle``
    (src/aggregation.py lines 121-126): ``global_delta = s B_g A_g`` and ``global_b = B_g``."""
    total = 0.0
    for n, spec in specs.items():
        a, b = live[n][1], live[n][0]
        delta = (b @ a) * spec.scale
        ref_delta = (global_factors[n][0] @ global_factors[n][1]) * spec.scale
        layer_reg = 0.5 * mu * torch.sum((delta - ref_delta) ** 2)
        layer_reg = layer_reg + 0.5 * alpha * torch.sum((b - global_factors[n][0]) ** 2)
        layer_reg = layer_reg + 0.5 * lambda_reg * (torch.sum(a**2) + torch.sum(b**2))
        total = total + layer_reg
    return total / len(specs)


def _client_gradients(specs, round_index, client):
    g = torch.Generator().manual_seed(100 * round_index + int(client))
    return {n: torch.randn(s.out_features, s.in_features, generator=g, dtype=torch.float64) for n, s in specs.items()}


def _local_step(B, A, G, step=1.0):
    """One gradient step on the client loss <G, B A>. Like real training it commutes with flipping the sign of
    a singular pair, (B, A) -> (B D, D A): the SVDs of the two codes may differ in exactly that way."""
    return B - step * G @ A.mT, A - step * B.mT @ G


def _play(build, specs, restore_norm_into, clip, rounds=3, official_trains_ours=False):
    """peft-fed's and the official rounds side by side; yields (round, strategy, result, official server
    factors, peft-fed's client starts, official start factors) per round. Each side trains from its own start
    unless ``official_trains_ours``: then the official server step aggregates peft-fed's trained factors."""
    mu, beta, lam = 0.05, 0.01, 1e-5
    strategy = build("subspace_reg", specs, mu=mu, beta=beta, lam=lam, clip_norm=clip, restore_norm_into=restore_norm_into)
    state, _ = strategy.init_server()
    theirs = {n: (state.layers[n]["B"].clone(), state.layers[n]["A"].clone()) for n in specs}  # the same init
    clients = {c: ClientState(c) for c in SAMPLES}
    total = sum(SAMPLES.values())
    weights = [SAMPLES[c] / total for c in SAMPLES]  # src/trainer.py line 105
    for round_index in range(rounds):
        uploads, their_trained, starts = [], [], []
        for c in SAMPLES:
            broadcast = strategy.configure(state, clients[c])
            start = strategy.client_begin(broadcast, clients[c])
            gradients = _client_gradients(specs, round_index, c)
            trained = {n: LowRank(*_local_step(f.B, f.A, gradients[n])) for n, f in start.factors.items()}
            upload, clients[c] = strategy.client_end(trained, {}, start, clients[c], SAMPLES[c], broadcast.backbone_version)
            uploads.append(upload)
            starts.append(start)
            their_trained.append(
                {n: (f.B, f.A) for n, f in trained.items()} if official_trains_ours
                else {n: _local_step(*theirs[n], gradients[n]) for n in specs}
            )  # fmt: skip
        result = strategy.aggregate(state, uploads)
        their_start = theirs
        theirs = official_server_step(specs, their_trained, weights, clip)
        yield round_index, strategy, result, theirs, starts, their_start
        state = result.state


def _pair_signs(ours_B, theirs_B):
    # peft-fed's SVD runs through the stacked factors, the official one densely: a singular pair may differ in
    # sign; it cancels in B_g A_g. Fixed once per layer, the sign must then hold for every tensor compared.
    return torch.sign((ours_B * theirs_B).sum(0))


@pytest.mark.parametrize("clip", [None, 0.02])
def test_published_form_equals_the_official_server_step_and_start(build, specs, clip):
    for round_index, _, result, theirs, starts, their_start in _play(build, specs, "both", clip):
        for n in specs:
            ours = result.state.layers[n]
            signs = _pair_signs(ours["B"], theirs[n][0])
            torch.testing.assert_close(ours["B"] * signs, theirs[n][0], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(signs[:, None] * ours["A"], theirs[n][1], rtol=1e-9, atol=1e-11)
            if round_index > 0:  # every client starts from the published global factors
                for start in starts:
                    signs = _pair_signs(start.factors[n].B, their_start[n][0])
                    torch.testing.assert_close(start.factors[n].B * signs, their_start[n][0], rtol=1e-9, atol=1e-11)
                    torch.testing.assert_close(signs[:, None] * start.factors[n].A, their_start[n][1], rtol=1e-9, atol=1e-11)
        if clip is not None:  # the clip was active: the update norm is tau
            for n, spec in specs.items():
                dense = spec.scale * theirs[n][0] @ theirs[n][1]
                assert float(dense.norm()) == pytest.approx(clip, rel=1e-9)


def test_peft_fed_default_has_the_same_products_and_an_orthonormal_basis(build, specs):
    for round_index, _, result, theirs, _, _ in _play(build, specs, "A", 0.5, official_trains_ours=True):
        for n, spec in specs.items():
            ours = result.state.layers[n]
            torch.testing.assert_close(ours["B"] @ ours["A"], theirs[n][0] @ theirs[n][1], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(ours["B"].mT @ ours["B"], torch.eye(spec.rank, dtype=torch.float64), rtol=0, atol=1e-10)
            # the published B_g is sqrt(c) times an orthonormal basis; c != 1 once truncation loses something (in
            # round 0 every client shares the initial A, so the sum is rank r and c = 1)
            gram = theirs[n][0].mT @ theirs[n][0]
            c = float(gram[0, 0])
            torch.testing.assert_close(gram, c * torch.eye(spec.rank, dtype=torch.float64), rtol=1e-9, atol=1e-11)
            assert round_index == 0 or abs(c - 1.0) > 1e-3


def test_client_regularizer_equals_the_official_term(build, specs):
    """The loss a client adds, anchored at the global factors it was sent (the published ``B_g``): value and
    gradient equal the official term at the same point."""
    rounds = _play(build, specs, "both", 0.5, rounds=2)
    next(rounds)
    _, strategy, _, _, starts, their_start = next(rounds)
    start = starts[0]
    g = torch.Generator().manual_seed(9)
    live = {n: LowRank((f.B + 0.1 * torch.randn(f.B.shape, generator=g, dtype=torch.float64)).requires_grad_(),
                       (f.A + 0.1 * torch.randn(f.A.shape, generator=g, dtype=torch.float64)).requires_grad_())
            for n, f in start.factors.items()}  # fmt: skip
    ours = strategy.client_loss(live, start)
    signs = {n: _pair_signs(start.factors[n].B, their_start[n][0]) for n in specs}
    # the same live point in the official orientation (pair signs as peft-fed's factors to the official ones)
    theirs_live = {n: (live[n].B * signs[n], signs[n][:, None] * live[n].A) for n in specs}
    theirs = official_regularizer(specs, theirs_live, their_start, mu=0.05, alpha=0.01, lambda_reg=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    ours_grads = torch.autograd.grad(ours, [t for f in live.values() for t in (f.B, f.A)])
    theirs_grads = torch.autograd.grad(theirs, [t for f in live.values() for t in (f.B, f.A)])
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_the_two_forms_start_the_same_product_on_different_paths(build, specs):
    """Finding 1: after the same round, ``"A"`` and ``"both"`` send the same ``B_g A_g`` but different factors,
    so one local step on the same task gradient already gives different products, and the ``beta`` term
    ``||B - B_g||^2`` pulls towards differently scaled bases."""
    sent = {}
    for form in ("A", "both"):
        *_, (_, strategy, result, _, _, _) = _play(build, specs, form, 0.5, rounds=2)  # round 0 has c = 1
        sent[form] = (strategy, {n: LowRank(t["B"], t["A"]) for n, t in result.state.layers.items()})
    gradients = _client_gradients(specs, 7, "0")
    for n in specs:
        a, both = sent["A"][1][n], sent["both"][1][n]
        torch.testing.assert_close(a.dense(), both.dense(), rtol=1e-10, atol=1e-12)
        stepped = {form: LowRank(*_local_step(f.B, f.A, gradients[n])).dense() for form, f in (("A", a), ("both", both))}
        assert not torch.allclose(stepped["A"], stepped["both"], rtol=1e-3, atol=0)
        assert not torch.allclose(a.B, both.B, rtol=1e-3, atol=0)


class _MeanCrossEntropyTask:
    """A task with its own loss (as the multiple-choice tasks have): the batch mean of the cross-entropy."""

    def compute_loss(self, model, inputs):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits, labels), logits


@pytest.mark.parametrize(
    ("method", "with_task", "optim"),
    [
        ("fedit", False, "adamw_torch"),
        ("fedit", True, "adamw_torch"),
        ("subspace_reg", False, "adamw_torch"),
        ("fedit", False, "sgd"),
        ("subspace_reg", False, "sgd"),
    ],
)
def test_gradient_accumulation_gives_the_same_update(tmp_path, method, with_task, optim):
    """The published setting is batch 1 x accumulation 8. One optimizer step over the same 8 examples as one
    batch of 8 or as 4 micro-batches of 2 must give the same update, with the model's loss, a task's own loss
    and Subspace-Reg's term (added on every micro-batch). With SGD the update is proportional to the gradient,
    so a missing 1/4 shows as a 4x update; AdamW (the default) hides most of it, not all."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
    from fed_setup import client_dataset, final_state, make_trainer

    ends = []
    for batch, accumulation in ((8, 1), (2, 4)):
        extra = {"task": _MeanCrossEntropyTask()} if with_task else {}
        trainer = make_trainer(method, tmp_path / f"{batch}x{accumulation}", clients=[client_dataset(0, n=8)],
                               clients_per_round=1, num_rounds=1, local_steps=1, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation, optim=optim,
                               learning_rate=0.5 if optim == "sgd" else 1e-2, disable_tqdm=True, eval_every=0,
                               **extra)  # fmt: skip
        start = {k: v.clone() for k, v in final_state(trainer).items()}
        trainer.train()
        ends.append(final_state(trainer))
    # the classifier head starts where the model put it (the LoRA factors are re-initialised by the strategy)
    head = [k for k in start if "classifier" in k]
    assert max(float((ends[0][k] - start[k]).abs().max()) for k in head) > 1e-3  # a step worth comparing
    for key, value in ends[0].items():
        torch.testing.assert_close(ends[1][key], value, rtol=6e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
