"""Uploads and heads for the privacy tests (pure tensors, float64)."""

from __future__ import annotations

import torch

from peft_fed.state import Upload


def random_uploads(strategy, state, count: int, *, scale: float = 1.0, seed: int = 0) -> list[Upload]:
    """``count`` uploads of ``state``'s tensors plus random updates of norm about ``scale`` (various sample counts)."""
    generator = torch.Generator().manual_seed(seed)
    uploads = []
    for client in range(count):
        layers = {
            name: {key: state.layers[name][key] + scale * torch.randn(strategy._uploaded_shape(spec, key),
                                                                       generator=generator, dtype=torch.float64)
                   for key in strategy.uploaded}
            for name, spec in strategy.specs.items()
        }  # fmt: skip
        extras = {k: v + scale * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in state.extras.items()}
        uploads.append(Upload(client_id=str(client), num_samples=10 * (client + 1), layers=layers, extras=extras))
    return uploads


def head(seed: int = 3) -> dict[str, torch.Tensor]:
    return {"classifier.weight": torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)}
