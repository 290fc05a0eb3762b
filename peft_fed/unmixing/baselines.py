"""Signal-processing baselines: VCA + FCLSU, N-FINDR + FCLSU and k-means.

Each returns ``(endmembers (bands, p), abundances (num_pixels, p))`` on a ``(num_pixels, bands)`` pixel
matrix; abundances are non-negative and sum to one. They also provide GAUSS's pseudo ground truths.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from .extraction import nfindr, vca
from .fclsu import fclsu

__all__ = ["kmeans_clustering", "kmeans_unmixing", "merge_clusters_by_angle", "nfindr_fclsu", "vca_fclsu"]


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


def merge_clusters_by_angle(
    pixels: np.ndarray, labels: np.ndarray, means: np.ndarray, num_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge k clusters into ``num_groups`` by average-linkage agglomeration of their mean spectra under the
    spectral angle; returns the merged labels ``(num_pixels,)`` and the groups' mean spectra
    ``(bands, num_groups)``.

    Why this merge (GAUSS's ``kmeans_clusters_per_endmember > 1``): k-means with more clusters than materials
    splits a material along its brightness (illumination, shade) or its mixtures before it separates two
    materials; the spectral angle ignores brightness, so merging the over-segmented clusters by angle puts the
    brightness variants of one material back together and keeps materials of different shape apart. Every pixel
    keeps a label (unlike keeping only the p largest clusters, which would have to relabel or drop the pixels
    of the others, and which favours large mixed clusters over small pure ones). Average linkage, so one
    outlying cluster does not chain two materials together. Reads nothing but the pixels and their clusters.
    Groups are numbered by their first member, as :func:`kmeans_clustering` numbers its clusters.
    """
    from sklearn.cluster import AgglomerativeClustering

    pixels = np.asarray(pixels, dtype=np.float64)
    num_clusters = means.shape[1]
    if not 1 <= num_groups <= num_clusters:
        raise ValueError(f"num_groups must be in [1, {num_clusters}], got {num_groups}")
    if num_groups == num_clusters:
        return labels, means
    unit = means / np.maximum(np.linalg.norm(means, axis=0, keepdims=True), 1e-300)
    angles = np.arccos(np.clip(unit.T @ unit, -1.0, 1.0))
    np.fill_diagonal(angles, 0.0)
    group_of_cluster = AgglomerativeClustering(
        n_clusters=num_groups, metric="precomputed", linkage="average"
    ).fit_predict(angles)
    merged = group_of_cluster[labels]
    _, first = np.unique(merged, return_index=True)
    relabel = np.empty(num_groups, dtype=np.int64)
    relabel[np.argsort(first)] = np.arange(num_groups)
    merged = relabel[merged]
    group_means = np.stack([pixels[merged == g].mean(axis=0) for g in range(num_groups)], axis=1)
    return merged, group_means


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
