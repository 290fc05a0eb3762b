import numpy as np
import pytest

from peft_fed.unmixing.fclsu import fclsu, project_to_simplex


@pytest.mark.parametrize("solver", ["nnls", "projected_gradient"])
def test_fclsu_is_exact_on_noiseless_mixtures(solver):
    rng = np.random.default_rng(0)
    endmembers = rng.uniform(0.05, 1.0, size=(50, 4))
    abundances = rng.dirichlet(np.ones(4) * 0.7, size=500)
    abundances[:4] = np.eye(4)  # pure pixels sit on the simplex's vertices, a hard case for active sets
    estimate = fclsu(abundances @ endmembers.T, endmembers, solver=solver)
    tolerance = 1e-8 if solver == "nnls" else 1e-5
    assert np.max(np.abs(estimate - abundances)) < tolerance


@pytest.mark.parametrize("solver", ["nnls", "projected_gradient"])
def test_fclsu_abundances_are_on_the_simplex_for_noisy_data(solver):
    rng = np.random.default_rng(1)
    endmembers = rng.uniform(0.05, 1.0, size=(30, 3))
    pixels = rng.dirichlet(np.ones(3), size=(8, 8)) @ endmembers.T + 0.05 * rng.standard_normal((8, 8, 30))
    estimate = fclsu(pixels, endmembers, solver=solver)
    assert estimate.shape == (8, 8, 3)
    assert estimate.min() >= 0.0
    assert np.allclose(estimate.sum(axis=-1), 1.0)


def test_fclsu_solvers_agree():
    rng = np.random.default_rng(2)
    endmembers = rng.uniform(0.05, 1.0, size=(30, 3))
    pixels = rng.uniform(0.0, 1.0, size=(200, 30))  # mostly outside the simplex: active constraints
    nnls_estimate = fclsu(pixels, endmembers, solver="nnls")
    pg_estimate = fclsu(
        pixels, endmembers, solver="projected_gradient", tolerance=1e-11, max_iterations=20000
    )
    assert np.max(np.abs(nnls_estimate - pg_estimate)) < 1e-4


def test_fclsu_rejects_mismatched_bands():
    with pytest.raises(ValueError, match="endmembers must be"):
        fclsu(np.ones((10, 5)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="unknown FCLSU solver"):
        fclsu(np.ones((10, 5)), np.ones((5, 2)), solver="magic")


def test_project_to_simplex():
    values = np.array([[0.2, 0.3, 0.5], [2.0, 0.0, 0.0], [-1.0, 0.5, 0.5], [0.4, 0.4, 0.4]])
    projected = project_to_simplex(values)
    assert np.allclose(projected[0], values[0])
    assert np.allclose(projected[1], [1.0, 0.0, 0.0])
    assert np.allclose(projected[2], [0.0, 0.5, 0.5])
    assert np.allclose(projected[3], [1 / 3] * 3)
