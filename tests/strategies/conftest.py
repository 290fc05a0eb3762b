"""Fixtures for strategy tests: layer specs, fresh client states, strategies in float64."""

from __future__ import annotations

import pytest
import torch

from peft_fed.state import ClientState, LayerSpec
from peft_fed.strategies import get_strategy


@pytest.fixture
def specs() -> dict[str, LayerSpec]:
    return {
        "layer.0.query": LayerSpec(out_features=12, in_features=10, rank=2, scale=2.0),
        "layer.1.value": LayerSpec(out_features=8, in_features=14, rank=3, scale=0.5),
    }


@pytest.fixture
def new_clients():
    def make(n):
        return {str(i): ClientState(client_id=str(i)) for i in range(n)}

    return make


@pytest.fixture
def build():
    def make(name, specs, **kw):
        kw.setdefault("dtype", torch.float64)
        return get_strategy(name, specs, **kw)

    return make
