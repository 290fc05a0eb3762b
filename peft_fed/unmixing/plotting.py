"""PNG plots of unmixing results: abundance maps and endmember spectra, next to the ground truth when known.

Uses matplotlib's Agg backend (no display needed). Pass estimates already matched to the reference order
(see :func:`~peft_fed.unmixing.metrics.match_endmembers`) so that columns line up.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_abundance_maps", "plot_endmembers"]


def _names(count: int, names: list[str] | None) -> list[str]:
    if names is not None and len(names) == count:
        return [str(n) for n in names]
    return [f"endmember {k + 1}" for k in range(count)]


def plot_abundance_maps(
    abundances: np.ndarray,
    path: str | os.PathLike,
    reference: np.ndarray | None = None,
    names: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Abundance maps ``(rows, cols, p)``, one column per endmember; a second row shows ``reference``."""
    p = abundances.shape[-1]
    rows = 2 if reference is not None else 1
    fig, axes = plt.subplots(rows, p, figsize=(2.4 * p + 0.8, 2.5 * rows), squeeze=False)
    labels = _names(p, names)
    for k in range(p):
        image = axes[0, k].imshow(
            abundances[..., k], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest"
        )
        axes[0, k].set_title(f"{labels[k]}\nestimate", fontsize=9)
        if reference is not None:
            axes[1, k].imshow(reference[..., k], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            axes[1, k].set_title("ground truth", fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_endmembers(
    endmembers: np.ndarray,
    path: str | os.PathLike,
    reference: np.ndarray | None = None,
    wavelengths: np.ndarray | None = None,
    names: list[str] | None = None,
    sad: list[float] | None = None,
    title: str | None = None,
) -> Path:
    """Endmember spectra ``(bands, p)``, one panel each, with the reference spectrum dashed when given."""
    bands, p = endmembers.shape
    x = np.arange(bands) if wavelengths is None else np.asarray(wavelengths)
    fig, axes = plt.subplots(1, p, figsize=(3.6 * p, 3.0), squeeze=False)
    labels = _names(p, names)
    for k in range(p):
        axis = axes[0, k]
        axis.plot(x, endmembers[:, k], color="tab:red", label="estimate")
        if reference is not None:
            axis.plot(x, reference[:, k], color="black", linestyle="--", label="ground truth")
        heading = labels[k]
        if sad is not None:
            heading += f"\nSAD {sad[k]:.3f} rad"
        axis.set_title(heading, fontsize=9)
        axis.set_xlabel("band" if wavelengths is None else "wavelength")
    axes[0, 0].set_ylabel("reflectance")
    axes[0, -1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
