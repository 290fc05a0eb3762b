"""The benchmark scripts as modules (they live in ``benchmarks/``, outside the package): loading one runs nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grid() -> ModuleType:
    return load_benchmark("federated_grid")


@pytest.fixture(scope="module")
def downlink() -> ModuleType:
    return load_benchmark("downlink")


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    return load_benchmark("peers")
