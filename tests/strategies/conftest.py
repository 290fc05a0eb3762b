"""Fixtures for strategy tests: layer specs, fresh client states, strategies in float64."""

from __future__ import annotations

import pytest
import torch

from peft_fed.state import ClientState
from peft_fed.strategies import get_strategy


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
