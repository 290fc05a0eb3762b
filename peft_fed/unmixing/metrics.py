"""Unmixing quality metrics: spectral angle distance (SAD), abundance RMSE (aRMSE), reconstruction RMSE.

Every unmixing method returns its endmembers in an arbitrary order and (for the learned ones) an arbitrary
scale, so the estimate is first matched to the reference with the Hungarian algorithm on the SAD cost
matrix (`scipy.optimize.linear_sum_assignment`); SAD is invariant to scale by construction and the matching
makes every metric invariant to order.

Conventions (the ones used by MiSiCNet, EGU-Net and most of the deep-unmixing literature):

- SAD between two spectra ``e`` and ``f`` is ``arccos(<e, f> / (|e| |f|))`` in radians.
- aRMSE is the root mean square error over all pixels and all (matched) endmembers,
  ``sqrt(mean((A_est - A_true) ** 2))``.
- Reconstruction RMSE is ``sqrt(mean((Y_hat - Y) ** 2))`` over all pixels and bands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from .data import check_finite_endmembers

__all__ = [
    "UnmixingMetrics",
    "abundance_rmse",
    "evaluate_unmixing",
    "match_endmembers",
    "reconstruction_rmse",
    "spectral_angle",
    "spectral_angle_matrix",
]


def spectral_angle(estimate: np.ndarray, reference: np.ndarray) -> float | np.ndarray:
    """Spectral angle (radians) between two spectra, or column-wise between two ``(bands, p)`` matrices.

    The angle ignores the scale of either spectrum. A zero spectrum has no direction: its angle to anything
    is reported as ``pi / 2`` rather than NaN so that a degenerate estimate is penalised, not hidden.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if estimate.shape != reference.shape:
        raise ValueError(f"spectral_angle needs equal shapes, got {estimate.shape} and {reference.shape}")
    dot = np.sum(estimate * reference, axis=0)
    norms = np.linalg.norm(estimate, axis=0) * np.linalg.norm(reference, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    angle = np.arccos(np.clip(cosine, -1.0, 1.0))
    return float(angle) if np.ndim(angle) == 0 else angle


def spectral_angle_matrix(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """All pairwise spectral angles: entry ``[i, j]`` is the angle between ``estimate[:, i]`` and ``reference[:, j]``."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if estimate.ndim != 2 or reference.ndim != 2 or estimate.shape[0] != reference.shape[0]:
        raise ValueError(
            f"endmember matrices must be (bands, p) with the same number of bands, got {estimate.shape} "
            f"and {reference.shape}"
        )
    est_norm = np.linalg.norm(estimate, axis=0)
    ref_norm = np.linalg.norm(reference, axis=0)
    denom = np.outer(est_norm, ref_norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(denom > 0, (estimate.T @ reference) / np.where(denom > 0, denom, 1.0), 0.0)
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def match_endmembers(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Order of the estimated endmembers that best matches the reference (minimum total SAD).

    Returns ``order`` such that ``estimate[:, order[j]]`` is matched to ``reference[:, j]``. With more
    estimated than reference endmembers the surplus ones are left out; fewer estimated endmembers is an error
    because some reference endmember would stay unmatched.
    """
    cost = spectral_angle_matrix(estimate, reference)
    if cost.shape[0] < cost.shape[1]:
        raise ValueError(
            f"cannot match {cost.shape[0]} estimated endmembers to {cost.shape[1]} reference endmembers"
        )
    est_idx, ref_idx = linear_sum_assignment(cost)
    order = np.empty(cost.shape[1], dtype=np.int64)
    order[ref_idx] = est_idx
    return order


def abundance_rmse(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Root mean square abundance error over all pixels and endmembers (inputs already matched)."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if estimate.shape != reference.shape:
        raise ValueError(
            f"abundance maps differ in shape: estimate {estimate.shape}, reference {reference.shape}"
        )
    return float(np.sqrt(np.mean((estimate - reference) ** 2)))


def reconstruction_rmse(reconstruction: np.ndarray, cube: np.ndarray) -> float:
    """Root mean square error between the reconstructed and the observed cube, over pixels and bands."""
    reconstruction = np.asarray(reconstruction, dtype=np.float64)
    cube = np.asarray(cube, dtype=np.float64)
    if reconstruction.shape != cube.shape:
        raise ValueError(f"reconstruction shape {reconstruction.shape} differs from the cube's {cube.shape}")
    return float(np.sqrt(np.mean((reconstruction - cube) ** 2)))


@dataclass
class UnmixingMetrics:
    """Scores of one unmixing result against a reference.

    Attributes:
        sad_mean: mean SAD over the matched endmembers, radians (None without reference endmembers).
        sad_per_endmember: SAD of each reference endmember's match, radians, in reference order.
        sad_mean_degrees: ``sad_mean`` in degrees.
        sad_per_endmember_degrees: ``sad_per_endmember`` in degrees.
        armse: abundance RMSE after matching (None without reference abundances).
        armse_per_endmember: RMSE of each matched abundance map.
        reconstruction_rmse: RMSE between the method's reconstruction and the cube (None when not given).
        matching: ``matching[j]`` is the estimated endmember matched to reference endmember ``j``.
    """

    sad_mean: float | None = None
    sad_per_endmember: list[float] | None = None
    sad_mean_degrees: float | None = None
    sad_per_endmember_degrees: list[float] | None = None
    armse: float | None = None
    armse_per_endmember: list[float] | None = None
    reconstruction_rmse: float | None = None
    matching: list[int] | None = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_unmixing(
    endmembers: np.ndarray,
    abundances: np.ndarray,
    reference_endmembers: np.ndarray | None = None,
    reference_abundances: np.ndarray | None = None,
    cube: np.ndarray | None = None,
    reconstruction: np.ndarray | None = None,
) -> UnmixingMetrics:
    """Score estimated endmembers ``(bands, p)`` and abundances ``(rows, cols, p)`` against a reference.

    The matching comes from the endmembers when reference endmembers are given; with reference abundances
    only, it comes from the abundance maps (Hungarian on the per-pair abundance RMSE), so an
    abundance-only ground truth can still be scored. ``reconstruction`` (same shape as ``cube``) defaults to
    the linear model ``abundances @ endmembers.T`` when only ``cube`` is given.
    """
    endmembers = np.asarray(endmembers, dtype=np.float64)
    abundances = np.asarray(abundances, dtype=np.float64)
    metrics = UnmixingMetrics()
    order: np.ndarray | None = None

    if reference_endmembers is not None:
        reference_endmembers = np.asarray(reference_endmembers, dtype=np.float64)
        if reference_endmembers.ndim == 2:
            # a NaN reference would be scored as a right angle (pi/2) without a word
            check_finite_endmembers(reference_endmembers, "reference endmember")
        order = match_endmembers(endmembers, reference_endmembers)
        per = spectral_angle(endmembers[:, order], reference_endmembers)
        per = np.atleast_1d(per)
        metrics.sad_per_endmember = [float(x) for x in per]
        metrics.sad_mean = float(np.mean(per))
        metrics.sad_per_endmember_degrees = [float(np.degrees(x)) for x in per]
        metrics.sad_mean_degrees = float(np.degrees(metrics.sad_mean))

    if reference_abundances is not None:
        reference_abundances = np.asarray(reference_abundances, dtype=np.float64)
        if not np.all(np.isfinite(reference_abundances)):
            raise ValueError(
                f"the reference abundances hold {int(np.sum(~np.isfinite(reference_abundances)))} NaN or "
                "infinite values; fix the ground truth before scoring"
            )
        flat_est = abundances.reshape(-1, abundances.shape[-1])
        flat_ref = reference_abundances.reshape(-1, reference_abundances.shape[-1])
        if flat_est.shape[0] != flat_ref.shape[0]:
            raise ValueError(
                f"abundance maps cover different pixels: estimate {abundances.shape}, "
                f"reference {reference_abundances.shape}"
            )
        if order is None:
            cost = np.sqrt(np.mean((flat_est[:, :, None] - flat_ref[:, None, :]) ** 2, axis=0))
            est_idx, ref_idx = linear_sum_assignment(cost)
            order = np.empty(flat_ref.shape[1], dtype=np.int64)
            order[ref_idx] = est_idx
        matched = flat_est[:, order]
        metrics.armse = abundance_rmse(matched, flat_ref)
        metrics.armse_per_endmember = [float(x) for x in np.sqrt(np.mean((matched - flat_ref) ** 2, axis=0))]

    if order is not None:
        metrics.matching = [int(x) for x in order]

    if cube is not None:
        if reconstruction is None:
            reconstruction = abundances @ endmembers.T
        metrics.reconstruction_rmse = reconstruction_rmse(reconstruction, cube)
    return metrics
