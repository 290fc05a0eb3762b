"""Whether a method's server step is the weighted mean of its uploads, checked on its behaviour.

Two features need it and ask it here, never a method's name: client-level differential privacy (it replaces the
uploads by their noised mean, ``peft_fed/privacy``) and secure aggregation in a Flower deployment (the server only
ever learns the weighted mean, ``peft_fed/flower``). A method qualifies when one aggregation of three random
uploads on two small layers (float64) sets every uploaded tensor to their weighted mean, leaves the other server
tensors unchanged and merges nothing into the backbone.
"""

from __future__ import annotations

import dataclasses

import torch

from ..linalg import LowRank
from ..state import LayerSpec, ServerState, Upload
from .base import Strategy

PROBE_SPECS = {
    "probe.0": LayerSpec(out_features=8, in_features=6, rank=2, scale=1.0),
    "probe.1": LayerSpec(out_features=7, in_features=10, rank=3, scale=0.5),
}


def probe_strategy(strategy: Strategy) -> Strategy:
    """A float64 copy of ``strategy``'s method and hyperparameters on two small layers."""
    return type(strategy)(
        PROBE_SPECS, seed=strategy.seed, dtype=torch.float64, **dataclasses.asdict(strategy.hyperparameters)
    )


def probe_server(probe: Strategy, generator: torch.Generator) -> tuple[ServerState, dict[str, LowRank]]:
    """The probe's round-0 state with a random head and random pretrained weights (for methods that use them)."""
    return probe.init_server(
        extras={"head": torch.randn(3, generator=generator, dtype=torch.float64)},
        base_weights={n: torch.randn(s.out_features, s.in_features, generator=generator, dtype=torch.float64)
                      for n, s in PROBE_SPECS.items()},
    )  # fmt: skip


def aggregates_weighted_mean(strategy: Strategy) -> bool:
    """Whether ``strategy``'s new server tensors are the weighted mean of the uploaded ones (the rest unchanged) and
    it merges nothing into the backbone."""
    if strategy.merges_into_backbone:
        return False
    probe = probe_strategy(strategy)
    generator = torch.Generator().manual_seed(0)
    state, initial_update = probe_server(probe, generator)
    uploads = [
        Upload(
            client_id=str(client),
            num_samples=client + 1,
            layers={
                name: {key: torch.randn(probe._uploaded_shape(spec, key), generator=generator, dtype=torch.float64)
                       for key in probe.uploaded}
                for name, spec in PROBE_SPECS.items()
            },  # fmt: skip
            extras={"head": torch.randn(3, generator=generator, dtype=torch.float64)},
        )
        for client in range(3)
    ]
    result = probe.aggregate(state, uploads)
    linear = not initial_update and not result.backbone_update
    for name in PROBE_SPECS:
        for key, tensor in result.state.layers[name].items():
            if key in probe.uploaded:
                expected = sum(w * u.layers[name][key] for w, u in zip(result.weights, uploads, strict=True))
            else:
                expected = state.layers[name][key]
            linear = linear and torch.allclose(tensor, expected, rtol=1e-9, atol=1e-12)
    return linear
