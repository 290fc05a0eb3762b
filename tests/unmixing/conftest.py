"""Shared fixtures for the unmixing tests: small scenes that make every test fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_fed.unmixing.data import HyperspectralScene


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    # The suite runs on a shared 2-core machine; one thread per process avoids oversubscription.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_linear_scene(
    rows: int = 20,
    cols: int = 20,
    bands: int = 30,
    p: int = 3,
    seed: int = 0,
    pure_per_endmember: int = 2,
    noise: float = 0.0,
) -> tuple[HyperspectralScene, np.ndarray]:
    """A noiseless (by default) linear-mixing scene with random positive endmembers and known pure pixels.

    Returns the scene and, for each endmember, the row-major indices of its pure pixels ``(p, n)``.
    """
    rng = np.random.default_rng(seed)
    endmembers = rng.uniform(0.05, 1.0, size=(bands, p))
    abundances = rng.dirichlet(np.ones(p), size=rows * cols)
    pure = rng.choice(rows * cols, size=(p, pure_per_endmember), replace=False)
    for k in range(p):
        abundances[pure[k]] = np.eye(p)[k]
    cube = (abundances @ endmembers.T).reshape(rows, cols, bands)
    if noise > 0:
        cube = cube + noise * rng.standard_normal(cube.shape)
    scene = HyperspectralScene(cube=cube, endmembers=endmembers, abundances=abundances.reshape(rows, cols, p))
    return scene, pure


@pytest.fixture
def linear_scene_factory():
    """The :func:`make_linear_scene` builder (a fixture, so test modules need not import conftest)."""
    return make_linear_scene
