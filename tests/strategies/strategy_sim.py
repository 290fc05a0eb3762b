"""Pure-tensor protocol simulation for strategy tests: fake local training and one round of the protocol."""

from __future__ import annotations

import torch

from peft_fed.linalg import LowRank


def fake_training(start, generator: torch.Generator, step: float = 0.3) -> dict[str, LowRank]:
    """Heterogeneous "local training": a client-specific random move of the trainable factors."""
    trained = {}
    for name, f in start.factors.items():
        B = f.B + step * torch.randn(f.B.shape, generator=generator, dtype=f.B.dtype) if start.train_B else f.B
        A = f.A + step * torch.randn(f.A.shape, generator=generator, dtype=f.A.dtype) if start.train_A else f.A
        trained[name] = LowRank(B.clone(), A.clone())
    return trained


def quadratic_gradient_fn(specs, seed: int = 0):
    """Gradient of a fixed quadratic loss 0.5 ||W + offset - T||^2 per layer, with W = 0."""
    generator = torch.Generator().manual_seed(seed)
    targets = {n: torch.randn(s.out_features, s.in_features, generator=generator) for n, s in specs.items()}

    def gradient_fn(offsets):
        return {n: offsets[n] - targets[n] for n in specs}

    return gradient_fn


def play_round(strategy, server_state, client_states, client_ids, num_samples, generator, gradient_fn=None):
    """One round of the protocol on pure tensors; returns (result, uploads, trained factors, starts)."""
    uploads, trained_all, starts = [], [], []
    for cid in client_ids:
        broadcast = strategy.configure(server_state, client_states[cid])
        start = strategy.client_begin(broadcast, client_states[cid], gradient_fn)
        trained = fake_training(start, generator)
        upload, client_states[cid] = strategy.client_end(
            trained, {}, start, client_states[cid], num_samples[cid], broadcast.backbone_version
        )
        uploads.append(upload)
        trained_all.append(trained)
        starts.append(start)
    result = strategy.aggregate(server_state, uploads)
    return result, uploads, trained_all, starts
