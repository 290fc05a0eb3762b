"""The Gaussian mechanism of client-level DP-FedAvg on a strategy's uploads: pure tensor code.

A client's *update* is what it uploads minus what the server holds for those tensors (``ServerState.layers`` for the
method's :attr:`~peft_fed.strategies.Strategy.uploaded` tensors, ``ServerState.extras`` for the heads), flattened
into one vector per client; its L2 norm over all layers, factors and heads together is what is clipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..state import ServerState, Upload

# One update as the flat list of (where, tensor) pairs in a fixed order: ("layer", name, key) or ("extra", key).
UpdateParts = list[tuple[tuple[str, ...], torch.Tensor]]


def upload_update(state: ServerState, upload: Upload, uploaded: Sequence[str]) -> UpdateParts:
    """``upload - state`` for every uploaded tensor and every head, in float64, in a fixed order."""
    parts: UpdateParts = []
    for name in sorted(state.layers):
        for key in uploaded:
            parts.append((("layer", name, key), upload.layers[name][key].double() - state.layers[name][key].double()))
    for key in sorted(state.extras):
        parts.append((("extra", key), upload.extras[key].double() - state.extras[key].double()))
    return parts


def update_norm(parts: UpdateParts) -> float:
    """The L2 norm of the whole update (all its tensors as one vector)."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for _, t in parts])))


def clip_update(parts: UpdateParts, clip: float) -> tuple[UpdateParts, float]:
    """The update scaled to L2 norm at most ``clip`` (by ``min(1, clip / norm)``), and its norm before clipping."""
    norm = update_norm(parts)
    if norm <= clip:
        return parts, norm
    factor = clip / norm
    return [(where, tensor * factor) for where, tensor in parts], norm


@dataclass
class NoisedMean:
    """The round's private aggregate ``(sum of clipped updates + N(0, (z C)^2 I)) / m``, and the updates' norms
    before clipping (not private: for choosing the clip, see docs/privacy.md)."""

    parts: UpdateParts
    norms: list[float]
    clip: float

    @property
    def clipped_clients(self) -> int:
        return sum(norm > self.clip for norm in self.norms)


def noised_mean(
    updates: Sequence[UpdateParts], *, clip: float, noise_multiplier: float, cohort_size: int, generator: torch.Generator
) -> NoisedMean:
    """Clip each update, sum them, add Gaussian noise of std ``noise_multiplier * clip`` to every coordinate of the
    sum, and divide by ``cohort_size`` (the number of clients *sampled*, not the number that answered: a client that
    failed counts as a zero update, so the divisor, and with it the noise scale, does not depend on anyone's data)."""
    if not updates:
        raise ValueError("no update to aggregate")
    if len(updates) > cohort_size:
        raise ValueError(f"{len(updates)} updates for a round that samples {cohort_size} clients")
    norms: list[float] = []
    total: list[torch.Tensor] | None = None
    for parts in updates:
        clipped, norm = clip_update(parts, clip)
        norms.append(norm)
        tensors = [t for _, t in clipped]
        total = tensors if total is None else [a + b for a, b in zip(total, tensors, strict=True)]
    std = noise_multiplier * clip
    mean = [
        (tensor + std * torch.randn(tensor.shape, generator=generator, dtype=torch.float64)) / cohort_size
        for tensor in total
    ]
    return NoisedMean([(where, t) for (where, _), t in zip(updates[0], mean, strict=True)], norms, clip)


def noise_generator(seed: int, round_index: int) -> torch.Generator:
    """The noise stream of one round, seeded by ``(seed, round)`` so a simulated run replays exactly (a deployment
    should draw from a cryptographically secure source instead; see docs/privacy.md)."""
    seed_value = int(np.random.SeedSequence([seed, round_index, 0xD9]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed_value)
