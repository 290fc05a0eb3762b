"""Fixtures shared by the test folders."""

from __future__ import annotations

import pytest

from peft_fed.state import LayerSpec


@pytest.fixture
def specs() -> dict[str, LayerSpec]:
    return {
        "layer.0.query": LayerSpec(out_features=12, in_features=10, rank=2, scale=2.0),
        "layer.1.value": LayerSpec(out_features=8, in_features=14, rank=3, scale=0.5),
    }
