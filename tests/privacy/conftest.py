"""Small layers and DP strategies for the privacy tests (pure tensors, float64)."""

from __future__ import annotations

import pytest
import torch

from peft_fed.privacy import ClientLevelDPSettings, ClientLevelDPStrategy
from peft_fed.strategies import get_strategy


@pytest.fixture
def dp_strategy(specs):
    def make(method="fedit", *, num_clients=20, clients_per_round=4, num_rounds=5, specs=specs, **settings):
        settings.setdefault("clip", 1.0)
        if "target_epsilon" not in settings:
            settings.setdefault("noise_multiplier", 1.0)
        inner = get_strategy(method, specs, dtype=torch.float64, seed=7)
        return ClientLevelDPStrategy(
            inner, ClientLevelDPSettings(**settings), num_clients=num_clients, clients_per_round=clients_per_round,
            num_rounds=num_rounds,
        )  # fmt: skip

    return make
