"""Pure-pixel endmember extraction: VCA and N-FINDR.

Implemented here rather than taken from ``pysptools`` (the maintained-library candidate): its last release
(0.15.0) uses ``np.int``/``np.float`` (removed in numpy 1.24) and ``scipy.linalg._flinalg`` (removed in
scipy 1.11), so it does not run on numpy 2 / current scipy.

Both functions take pixels as a ``(num_pixels, bands)`` matrix and return the chosen pixel indices and their
spectra as a ``(bands, p)`` matrix, so the endmembers are always pixels of the data.
"""

from __future__ import annotations

import numpy as np

__all__ = ["estimate_snr_db", "nfindr", "vca"]


def _principal_subspace(centred: np.ndarray, dim: int) -> np.ndarray:
    """The leading ``dim`` left singular vectors of ``centred.T`` (``bands x dim``), sign-fixed for determinism."""
    # SVD of the (bands x bands) scatter matrix is cheaper than of the (pixels x bands) data.
    scatter = centred.T @ centred / centred.shape[0]
    eigvals, eigvecs = np.linalg.eigh(scatter)
    basis = eigvecs[:, np.argsort(eigvals)[::-1][:dim]]
    signs = np.sign(basis[np.argmax(np.abs(basis), axis=0), np.arange(dim)])
    return basis * np.where(signs == 0, 1.0, signs)


def estimate_snr_db(pixels: np.ndarray, num_endmembers: int) -> float:
    """SNR estimate of VCA (Nascimento & Bioucas-Dias 2005, eq. 13) from the signal-subspace energy.

    Args:
        pixels: ``(num_pixels, bands)``.
        num_endmembers: dimension of the signal subspace.
    """
    num_pixels, bands = pixels.shape
    mean = pixels.mean(axis=0)
    basis = _principal_subspace(pixels - mean, num_endmembers)
    projected = (pixels - mean) @ basis
    power_total = np.sum(pixels**2) / num_pixels
    power_signal = np.sum(projected**2) / num_pixels + mean @ mean
    noise = power_total - power_signal
    signal = power_signal - num_endmembers / bands * power_total
    if noise <= 0:
        return float("inf")
    if signal <= 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


def vca(
    pixels: np.ndarray,
    num_endmembers: int,
    seed: int | None = 0,
    snr_db: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Vertex Component Analysis.

    J. M. P. Nascimento and J. M. Bioucas-Dias, "Vertex component analysis: a fast algorithm to unmix
    hyperspectral data", IEEE Trans. Geosci. Remote Sens. 43(4):898-910, 2005. Follows the authors' MATLAB
    reference: project onto the signal subspace (projective projection at high SNR, an affine (p-1)-dim
    subspace plus a constant coordinate at low SNR), then repeatedly pick the pixel with the largest
    projection onto a random direction orthogonal to the span of the endmembers found so far.

    Args:
        pixels: ``(num_pixels, bands)`` data.
        num_endmembers: p, the number of endmembers.
        seed: seeds the random directions (the algorithm is randomised).
        snr_db: the data SNR; estimated from the data when None.

    Returns:
        ``(indices, endmembers)``: the chosen pixel indices ``(p,)`` and their spectra ``(bands, p)``.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    num_pixels, bands = pixels.shape
    p = int(num_endmembers)
    if not 1 <= p <= min(bands, num_pixels):
        raise ValueError(
            f"num_endmembers must be in [1, min(bands, pixels)] = [1, {min(bands, num_pixels)}], got {p}"
        )
    rng = np.random.default_rng(seed)
    if snr_db is None:
        snr_db = estimate_snr_db(pixels, p)
    snr_threshold = 15 + 10 * np.log10(p)

    if snr_db < snr_threshold:
        # Low SNR: affine projection to p-1 dims; the extra constant row makes the cone "pointed".
        mean = pixels.mean(axis=0)
        basis = _principal_subspace(pixels - mean, max(p - 1, 1))[:, : p - 1]
        coords = (pixels - mean) @ basis  # (N, p-1)
        scale = np.sqrt(np.max(np.sum(coords**2, axis=1))) if p > 1 else 1.0
        projected = np.concatenate([coords, np.full((num_pixels, 1), scale)], axis=1).T  # (p, N)
    else:
        # High SNR: projective projection onto the p-dim subspace through the origin.
        basis = _principal_subspace(pixels, p)
        coords = pixels @ basis  # (N, p)
        direction = coords.mean(axis=0)
        denom = coords @ direction
        denom = np.where(np.abs(denom) < 1e-12, 1e-12, denom)
        projected = (coords / denom[:, None]).T  # (p, N)

    indices = np.zeros(p, dtype=np.int64)
    vertices = np.zeros((p, p))
    vertices[-1, 0] = 1.0
    for i in range(p):
        w = rng.random(p)  # uniform, as in the authors' MATLAB code
        # Direction orthogonal to the subspace spanned by the vertices chosen so far.
        f = w - vertices @ (np.linalg.pinv(vertices) @ w)
        f /= max(np.linalg.norm(f), 1e-300)
        scores = np.abs(f @ projected)
        indices[i] = int(np.argmax(scores))
        vertices[:, i] = projected[:, indices[i]]
    return indices, pixels[indices].T.copy()


def _simplex_volume(vertices: np.ndarray) -> float:
    """Unnormalised volume |det([1; V])| of the simplex with columns ``vertices`` ((p-1) x p)."""
    p = vertices.shape[1]
    return float(abs(np.linalg.det(np.vstack([np.ones((1, p)), vertices]))))


def nfindr(
    pixels: np.ndarray,
    num_endmembers: int,
    seed: int | None = 0,
    max_iterations: int | None = None,
    num_restarts: int = 1,
    initial_indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """N-FINDR: the p pixels spanning the simplex of maximum volume.

    M. E. Winter, "N-FINDR: an algorithm for fast autonomous spectral end-member determination in
    hyperspectral data", Proc. SPIE 3753, Imaging Spectrometry V, 1999. Data are reduced to p-1 dims by PCA;
    starting from p random pixels, each vertex in turn is replaced by the pixel that maximises the volume
    ``|det([1 ... 1; e_1 ... e_p])|``, sweeping until a full pass changes nothing. The determinant is linear
    in the replaced column, so one cofactor vector scores every pixel at once (exact, vectorised).

    Args:
        pixels: ``(num_pixels, bands)`` data.
        num_endmembers: p.
        seed: seeds the random initial pixels.
        max_iterations: cap on full sweeps (default ``3 * p``, as in the reference implementations).
        num_restarts: independent random starts; the largest final volume wins.
        initial_indices: start from these pixels instead (e.g. VCA's); then ``num_restarts`` is ignored.

    Returns:
        ``(indices, endmembers)``: pixel indices ``(p,)`` and spectra ``(bands, p)``.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    num_pixels, bands = pixels.shape
    p = int(num_endmembers)
    if not 2 <= p <= min(bands + 1, num_pixels):
        raise ValueError(f"num_endmembers must be in [2, {min(bands + 1, num_pixels)}], got {p}")
    if num_restarts < 1:
        raise ValueError(f"num_restarts must be >= 1, got {num_restarts}")
    max_iterations = 3 * p if max_iterations is None else int(max_iterations)
    mean = pixels.mean(axis=0)
    reduced = (pixels - mean) @ _principal_subspace(pixels - mean, p - 1)  # (N, p-1)
    augmented = np.concatenate([np.ones((num_pixels, 1)), reduced], axis=1)  # rows [1, x_i]
    rng = np.random.default_rng(seed)

    starts = (
        [np.asarray(initial_indices, dtype=np.int64)]
        if initial_indices is not None
        else [rng.choice(num_pixels, size=p, replace=False) for _ in range(num_restarts)]
    )
    best_indices, best_volume = None, -1.0
    for start in starts:
        if start.shape != (p,):
            raise ValueError(f"initial_indices must hold {p} pixel indices, got shape {start.shape}")
        indices = start.copy()
        for _ in range(max_iterations):
            changed = False
            for k in range(p):
                matrix = augmented[indices].T  # (p, p): column j is [1; x_{indices[j]}]
                # Cofactors of column k: det(matrix with column k := z) = cofactors @ z for every z.
                cofactors = np.array(
                    [
                        (-1) ** (j + k) * np.linalg.det(np.delete(np.delete(matrix, j, axis=0), k, axis=1))
                        for j in range(p)
                    ]
                )
                volumes = np.abs(augmented @ cofactors)
                candidate = int(np.argmax(volumes))
                # Only move for a strict gain, so ties cannot make the sweep cycle.
                if volumes[candidate] > volumes[indices[k]] * (1 + 1e-12) and candidate not in indices:
                    indices[k] = candidate
                    changed = True
            if not changed:
                break
        volume = _simplex_volume(reduced[indices].T)
        if volume > best_volume:
            best_indices, best_volume = indices.copy(), volume
    assert best_indices is not None
    return best_indices, pixels[best_indices].T.copy()
