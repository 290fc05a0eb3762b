"""The Gaussian mechanism of client-level DP-FedAvg on a strategy's uploads: pure tensor code.

A client's *update* is what it uploads minus what the server holds for those tensors (``ServerState.layers`` for the
method's :attr:`~peft_fed.strategies.Strategy.uploaded` tensors, ``ServerState.extras`` for the heads), flattened
into one vector per client; its L2 norm over all layers, factors and heads together is what is clipped.

Two places add the noise. Central DP (:func:`noised_mean`): the server clips every update it received and adds
``N(0, (z C)^2)`` to their sum once. Distributed DP (:class:`ClientNoise`, for secure aggregation, where the server
only ever sees the sum): each client clips its own update, measured against the broadcast it started from (which
holds the server's tensors), and adds ``N(0, (z C)^2 / k)``, where ``k`` is the fewest clients whose sum the server
can ever unmask (SecAgg+'s reconstruction threshold); any sum the server learns then carries noise of variance at
least ``(z C)^2``, the central mechanism's, whoever dropped out.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..state import LayerTensors, Upload

# One update as the flat list of (where, tensor) pairs in a fixed order: ("layer", name, key) or ("extra", key).
UpdateParts = list[tuple[tuple[str, ...], torch.Tensor]]


class HoldsServerTensors(Protocol):
    """What an update is measured against: the server's state, or the broadcast a client started from (which
    carries the server's tensors of every uploaded factor and head)."""

    layers: LayerTensors
    extras: dict[str, torch.Tensor]


def tensor_parts(holder: HoldsServerTensors, uploaded: Sequence[str]) -> UpdateParts:
    """``holder``'s tensors of every uploaded factor and every head, in the mechanism's fixed order."""
    parts: UpdateParts = [
        (("layer", name, key), holder.layers[name][key]) for name in sorted(holder.layers) for key in uploaded
    ]
    parts += [(("extra", key), holder.extras[key]) for key in sorted(holder.extras)]
    return parts


def _tensor_at(holder: HoldsServerTensors, where: tuple[str, ...]) -> torch.Tensor:
    return holder.layers[where[1]][where[2]] if where[0] == "layer" else holder.extras[where[1]]


def upload_update(state: HoldsServerTensors, upload: Upload, uploaded: Sequence[str]) -> UpdateParts:
    """``upload - state`` for every uploaded tensor and every head, in float64, in a fixed order."""
    return [
        (where, _tensor_at(upload, where).double() - reference.double()) for where, reference in tensor_parts(state, uploaded)
    ]


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


def parts_as_upload(parts: UpdateParts, client_id: str, reference: HoldsServerTensors | None = None) -> Upload:
    """The update as an :class:`Upload` of the method (``reference + parts`` when a reference is given, the update
    itself otherwise), each tensor in its reference's dtype (float64 without one)."""
    layers: LayerTensors = {}
    extras: dict[str, torch.Tensor] = {}
    for where, delta in parts:
        base = None if reference is None else _tensor_at(reference, where)
        tensor = delta if base is None else (base.double() + delta).to(base.dtype)
        if where[0] == "layer":
            layers.setdefault(where[1], {})[where[2]] = tensor
        else:
            extras[where[1]] = tensor
    return Upload(client_id=client_id, num_samples=1, layers=layers, extras=extras)


@dataclass(frozen=True)
class ClientNoise:
    """Client-level DP with the noise added by the clients (distributed DP, for secure aggregation).

    Each client sends :meth:`contribution`: its update clipped to ``clip`` plus Gaussian noise of std
    ``noise_multiplier * clip / sqrt(k)``; the server, knowing only the sum of the contributions, takes
    :meth:`noised_mean_upload`: its tensors plus that sum over the round's cohort size ``m``. With at least ``k``
    contributions the sum's noise has std at least ``noise_multiplier * clip``: the central mechanism's or more.
    """

    clip: float
    noise_multiplier: float
    uploaded: tuple[str, ...]

    def noise_std(self, contributors: int) -> float:
        """The std of the noise one client adds when the server can unmask sums of ``contributors`` or more."""
        if contributors < 1:
            raise ValueError(f"the noise is shared by at least one client, got {contributors}")
        return self.noise_multiplier * self.clip / math.sqrt(contributors)

    def contribution(
        self, broadcast: HoldsServerTensors, upload: Upload, contributors: int, generator: torch.Generator
    ) -> tuple[Upload, bool]:
        """The client's clipped, noised update (as an :class:`Upload` of update tensors) and whether it was clipped."""
        clipped, norm = clip_update(upload_update(broadcast, upload, self.uploaded), self.clip)
        std = self.noise_std(contributors)
        noised = [
            (where, tensor + std * torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
            for where, tensor in clipped
        ]
        return parts_as_upload(noised, upload.client_id), norm > self.clip

    def noised_mean_upload(self, broadcast: HoldsServerTensors, summed: Upload, cohort_size: int) -> Upload:
        """The server's tensors plus the sum of the contributions over ``cohort_size``, as one upload of the method."""
        parts = [(where, tensor.double() / cohort_size) for where, tensor in tensor_parts(summed, self.uploaded)]
        return parts_as_upload(parts, "dp_noised_mean", broadcast)


def secure_noise_generator() -> torch.Generator:
    """A noise stream seeded from the operating system's entropy: a client's noise must be unknown to the server
    (a seed it could replay would cancel it). Sampling stays torch's, so floating-point attacks on Gaussian
    sampling (Mironov 2012) are not ruled out; docs/privacy.md says so."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def noise_generator(seed: int, round_index: int) -> torch.Generator:
    """The noise stream of one round, seeded by ``(seed, round)`` so a simulated run replays exactly (a deployment
    should draw from a cryptographically secure source instead; see docs/privacy.md)."""
    seed_value = int(np.random.SeedSequence([seed, round_index, 0xD9]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed_value)
