"""Signal-processing baselines: VCA + FCLSU, N-FINDR + FCLSU and k-means.

Each returns ``(endmembers (bands, p), abundances (num_pixels, p))`` on a ``(num_pixels, bands)`` pixel
matrix; abundances are non-negative and sum to one. They also provide GAUSS's pseudo ground truths.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from .extraction import nfindr, vca
from .fclsu import fclsu

__all__ = ["kmeans_clustering", "kmeans_unmixing", "nfindr_fclsu", "vca_fclsu"]


def kmeans_clustering(
    pixels: np.ndarray,
    num_clusters: int,
    seed: int = 0,
    features: str = "raw",
    restarts: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means on the pixels: labels ``(num_pixels,)`` and cluster-mean spectra ``(bands, k)``.

    Args:
        features: ``"raw"`` clusters the spectra themselves (Euclidean); ``"normalized"`` clusters unit-norm
            spectra, i.e. by spectral shape, so brightness differences (shade, dark water) do not split or
            merge materials. The returned means are always of the raw spectra.
        restarts: scikit-learn ``n_init``; the run with the lowest inertia wins.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    if features == "raw":
        inputs = pixels
    elif features == "normalized":
        norms = np.linalg.norm(pixels, axis=1, keepdims=True)
        inputs = pixels / np.where(norms > 0, norms, 1.0)
    else:
        raise ValueError(f"features must be 'raw' or 'normalized', got {features!r}")
    kmeans = KMeans(n_clusters=num_clusters, n_init=restarts, random_state=seed).fit(inputs)
    labels = kmeans.labels_.astype(np.int64)
    # Relabel clusters by their first member so the numbering does not depend on k-means internals.
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    relabel = np.empty(num_clusters, dtype=np.int64)
    relabel[order] = np.arange(len(order))
    labels = relabel[labels]
    means = np.stack([pixels[labels == k].mean(axis=0) for k in range(num_clusters)], axis=1)
    return labels, means


def kmeans_unmixing(
    pixels: np.ndarray,
    num_endmembers: int,
    seed: int = 0,
    features: str = "raw",
    restarts: int = 10,
    abundances: str = "one_hot",
) -> tuple[np.ndarray, np.ndarray]:
    """k-means as an unmixing method: cluster means as endmembers.

    Args:
        abundances: ``"one_hot"`` (hard cluster membership, which is GAUSS's pseudo ground truth) or
            ``"fclsu"`` (FCLSU on the cluster means).
    """
    labels, means = kmeans_clustering(pixels, num_endmembers, seed=seed, features=features, restarts=restarts)
    if abundances == "one_hot":
        return means, np.eye(num_endmembers)[labels]
    if abundances == "fclsu":
        return means, fclsu(pixels, means)
    raise ValueError(f"abundances must be 'one_hot' or 'fclsu', got {abundances!r}")


def vca_fclsu(pixels: np.ndarray, num_endmembers: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """VCA endmembers, FCLSU abundances."""
    _, endmembers = vca(pixels, num_endmembers, seed=seed)
    return endmembers, fclsu(pixels, endmembers)


def nfindr_fclsu(pixels: np.ndarray, num_endmembers: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N-FINDR endmembers, FCLSU abundances."""
    _, endmembers = nfindr(pixels, num_endmembers, seed=seed)
    return endmembers, fclsu(pixels, endmembers)
