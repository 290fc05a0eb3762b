"""Fully constrained least squares unmixing (FCLSU): non-negative abundances that sum to one.

D. C. Heinz and C.-I Chang, "Fully constrained least squares linear spectral mixture analysis method for
material quantification in hyperspectral imagery", IEEE Trans. Geosci. Remote Sens. 39(3):529-545, 2001.

Two solvers, both exact at convergence:

- ``"nnls"`` (default): the sum-to-one constraint becomes an extra, heavily weighted row
  ``delta * 1^T a = delta`` appended to the endmember matrix (Heinz & Chang's trick), and each pixel is a
  non-negative least-squares problem solved by Lawson-Hanson active sets (``scipy.optimize.nnls``). The
  augmented matrix is reduced once by a thin QR to a ``p x p`` triangle, so each pixel's NNLS is tiny.
- ``"projected_gradient"``: accelerated projected gradient (FISTA) on the probability simplex, all pixels
  at once; useful for very large images.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

__all__ = ["fclsu", "project_to_simplex"]


def project_to_simplex(values: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the probability simplex (Duchi et al., ICML 2008)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    sorted_desc = -np.sort(-values, axis=-1)
    cumulative = np.cumsum(sorted_desc, axis=-1) - 1.0
    ranks = np.arange(1, n + 1)
    positive = sorted_desc - cumulative / ranks > 0
    rho = n - 1 - np.argmax(positive[..., ::-1], axis=-1)  # last index where the condition holds
    theta = np.take_along_axis(cumulative, rho[..., None], axis=-1) / (rho[..., None] + 1)
    return np.maximum(values - theta, 0.0)


def _fclsu_nnls(pixels: np.ndarray, endmembers: np.ndarray, delta: float) -> np.ndarray:
    bands, p = endmembers.shape
    # Scale the sum-to-one row to the endmembers' magnitude so "delta" is unitless.
    weight = delta * np.linalg.norm(endmembers, ord=2)
    augmented = np.vstack([endmembers, weight * np.ones((1, p))])
    q, r = np.linalg.qr(augmented)  # ||G a - b|| = ||R a - Q^T b|| + const, so NNLS on the p x p R
    targets = np.concatenate([pixels, np.full((pixels.shape[0], 1), weight)], axis=1) @ q  # (N, p)
    abundances = np.empty((pixels.shape[0], p))
    for i, target in enumerate(targets):
        abundances[i] = nnls(r, target, maxiter=50 * p)[0]
    return abundances


def _fclsu_projected_gradient(
    pixels: np.ndarray, endmembers: np.ndarray, max_iterations: int, tolerance: float
) -> np.ndarray:
    gram = endmembers.T @ endmembers
    correlation = pixels @ endmembers  # (N, p)
    step = 1.0 / max(np.linalg.eigvalsh(gram)[-1], 1e-12)
    p = endmembers.shape[1]
    current = np.full((pixels.shape[0], p), 1.0 / p)
    momentum_point, t = current.copy(), 1.0
    for _ in range(max_iterations):
        gradient = momentum_point @ gram - correlation
        updated = project_to_simplex(momentum_point - step * gradient)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        momentum_point = updated + ((t - 1) / t_next) * (updated - current)
        change = np.max(np.abs(updated - current))
        current, t = updated, t_next
        if change < tolerance:
            break
    return current


def fclsu(
    pixels: np.ndarray,
    endmembers: np.ndarray,
    solver: str = "nnls",
    delta: float = 1e3,
    max_iterations: int = 5000,
    tolerance: float = 1e-9,
) -> np.ndarray:
    """Fully constrained least squares abundances.

    Args:
        pixels: ``(num_pixels, bands)`` or a cube ``(rows, cols, bands)``.
        endmembers: ``(bands, p)``.
        solver: ``"nnls"`` (exact active-set, per pixel) or ``"projected_gradient"`` (batched FISTA).
        delta: weight of the sum-to-one row relative to the endmembers' spectral norm (``"nnls"`` only);
            large values enforce the constraint tightly; the result is renormalised to sum exactly to one.
        max_iterations: iteration cap of ``"projected_gradient"``.
        tolerance: stopping threshold on the largest abundance change (``"projected_gradient"``).

    Returns:
        abundances of shape ``(num_pixels, p)`` (or ``(rows, cols, p)`` for a cube input), each row
        non-negative and summing to one.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    endmembers = np.asarray(endmembers, dtype=np.float64)
    cube_shape = pixels.shape[:-1] if pixels.ndim == 3 else None
    flat = pixels.reshape(-1, pixels.shape[-1])
    if endmembers.ndim != 2 or endmembers.shape[0] != flat.shape[1]:
        raise ValueError(f"endmembers must be (bands={flat.shape[1]}, p), got shape {endmembers.shape}")
    if solver == "nnls":
        abundances = _fclsu_nnls(flat, endmembers, delta)
    elif solver == "projected_gradient":
        abundances = _fclsu_projected_gradient(flat, endmembers, max_iterations, tolerance)
    else:
        raise ValueError(f"unknown FCLSU solver {solver!r}; use 'nnls' or 'projected_gradient'")
    abundances = np.maximum(abundances, 0.0)
    sums = abundances.sum(axis=1, keepdims=True)
    p = endmembers.shape[1]
    abundances = np.where(sums > 0, abundances / np.where(sums > 0, sums, 1.0), 1.0 / p)
    return abundances.reshape(*cube_shape, p) if cube_shape is not None else abundances
