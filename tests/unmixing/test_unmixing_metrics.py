import numpy as np
import pytest

from peft_fed.unmixing.metrics import (
    abundance_rmse,
    evaluate_unmixing,
    match_endmembers,
    spectral_angle,
    spectral_angle_matrix,
)


def _endmembers(seed: int = 0, bands: int = 40, p: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 1.0, size=(bands, p))


def test_sad_of_identical_spectra_is_zero():
    endmembers = _endmembers()
    metrics = evaluate_unmixing(endmembers, np.full((5, 5, 4), 0.25), reference_endmembers=endmembers)
    assert metrics.sad_mean == pytest.approx(0.0, abs=1e-7)
    assert np.allclose(metrics.sad_per_endmember, 0.0, atol=1e-7)
    assert metrics.sad_mean_degrees == pytest.approx(0.0, abs=1e-5)


def test_sad_is_invariant_to_endmember_order_and_scale():
    reference = _endmembers(1)
    estimate = _endmembers(2)
    base = evaluate_unmixing(estimate, np.full((3, 3, 4), 0.25), reference_endmembers=reference)
    permutation = np.array([2, 0, 3, 1])
    scales = np.array([0.1, 5.0, 1.0, 42.0])
    shuffled = evaluate_unmixing(
        estimate[:, permutation] * scales, np.full((3, 3, 4), 0.25), reference_endmembers=reference
    )
    assert shuffled.sad_mean == pytest.approx(base.sad_mean, abs=1e-12)
    assert np.allclose(shuffled.sad_per_endmember, base.sad_per_endmember, atol=1e-12)
    # The matching undoes the permutation: estimate[:, perm][:, matching] == estimate[:, base.matching].
    assert np.array_equal(permutation[shuffled.matching], base.matching)
    # Scaling the reference does not matter either.
    scaled_ref = evaluate_unmixing(estimate, np.full((3, 3, 4), 0.25), reference_endmembers=reference * 7.0)
    assert scaled_ref.sad_mean == pytest.approx(base.sad_mean, abs=1e-12)


def test_degrees_match_radians():
    reference = _endmembers(3)
    estimate = reference + 0.05 * _endmembers(4)
    metrics = evaluate_unmixing(estimate, np.full((2, 2, 4), 0.25), reference_endmembers=reference)
    assert metrics.sad_mean_degrees == pytest.approx(np.degrees(metrics.sad_mean))
    assert metrics.sad_mean > 0


def test_spectral_angle_known_value():
    assert spectral_angle(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(np.pi / 4)
    matrix = spectral_angle_matrix(np.eye(2), np.eye(2))
    assert np.allclose(matrix, [[0, np.pi / 2], [np.pi / 2, 0]])


def test_armse_uses_the_endmember_matching():
    rng = np.random.default_rng(0)
    reference = _endmembers(5, p=3)
    abundances = rng.dirichlet(np.ones(3), size=(6, 6))
    permutation = np.array([1, 2, 0])
    metrics = evaluate_unmixing(
        reference[:, permutation],
        abundances[..., permutation],
        reference_endmembers=reference,
        reference_abundances=abundances,
        cube=abundances @ reference.T,
    )
    assert metrics.sad_mean == pytest.approx(0.0, abs=1e-7)
    assert metrics.armse == pytest.approx(0.0, abs=1e-12)
    assert metrics.reconstruction_rmse == pytest.approx(0.0, abs=1e-12)
    assert abundance_rmse(abundances, np.roll(abundances, 1, axis=-1)) > 0.1


def test_abundance_only_reference_is_matched_by_abundances():
    rng = np.random.default_rng(1)
    abundances = rng.dirichlet(np.ones(3), size=(5, 5))
    metrics = evaluate_unmixing(_endmembers(p=3), abundances[..., [2, 0, 1]], reference_abundances=abundances)
    assert metrics.armse == pytest.approx(0.0, abs=1e-12)
    assert metrics.sad_mean is None


def test_matching_rejects_too_few_estimates():
    with pytest.raises(ValueError, match="cannot match 2 estimated endmembers to 3"):
        match_endmembers(_endmembers(p=2), _endmembers(p=3))
