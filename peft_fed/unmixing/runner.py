"""Run any unmixing method by name, score it, and write its results (used by the CLI and the benchmark)."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .autoencoder import AutoencoderConfig, fit_autoencoder
from .baselines import kmeans_unmixing, nfindr_fclsu, vca_fclsu
from .config import GaussConfig, GaussTrainingConfig
from .data import HyperspectralScene
from .metrics import evaluate_unmixing
from .plotting import plot_abundance_maps, plot_endmembers
from .spatial_autoencoder import SpatialAutoencoderConfig, fit_spatial_autoencoder
from .train import GAUSS_VARIANTS, fit_gauss

__all__ = ["METHODS", "UnmixingResult", "run_method", "save_result"]

METHODS = (
    "gauss",
    "gauss_blind",
    "gauss_prime",
    "vca_fclsu",
    "nfindr_fclsu",
    "kmeans",
    "autoencoder",
    "misicnet",
)


@dataclass
class UnmixingResult:
    """What one method produced on one scene.

    Attributes:
        method: the method's name (one of :data:`METHODS`).
        endmembers: ``(bands, p)`` in the method's own order.
        abundances: ``(rows, cols, p)``, non-negative, summing to one per pixel.
        reconstruction: ``(rows, cols, bands)``, the method's model of the cube.
        wall_time_s: seconds from start to finish of the method.
        settings: every setting that defines the run (configs as dicts).
        timings: optional per-phase seconds.
        stage1: for ``gauss_blind``, the ``gauss`` result of the same run (its stage 1, identical to a
            separate ``gauss`` run with the same seed and settings), so one fit scores both; else ``None``.
    """

    method: str
    endmembers: np.ndarray
    abundances: np.ndarray
    reconstruction: np.ndarray
    wall_time_s: float
    settings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    stage1: UnmixingResult | None = None


def run_method(
    cube: np.ndarray,
    num_endmembers: int,
    method: str,
    seed: int = 0,
    gauss_config: GaussConfig | None = None,
    gauss_training: GaussTrainingConfig | None = None,
    autoencoder_config: AutoencoderConfig | None = None,
    kmeans_abundances: str = "one_hot",
    spatial_autoencoder_config: SpatialAutoencoderConfig | None = None,
) -> UnmixingResult:
    """Unmix a ``(rows, cols, bands)`` cube with the named method.

    ``gauss_training.seed``, ``autoencoder_config.seed`` and ``spatial_autoencoder_config.seed`` are overridden by ``seed`` so that one number
    fixes the whole run.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cube = np.asarray(cube, dtype=np.float64)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (rows, cols, bands), got shape {cube.shape}")
    rows, cols, bands = cube.shape
    if not 2 <= num_endmembers <= min(bands, rows * cols):
        raise ValueError(
            f"num_endmembers must be between 2 and min(bands, pixels) = {min(bands, rows * cols)}, "
            f"got {num_endmembers}"
        )
    pixels = cube.reshape(-1, bands)
    settings: dict = {"method": method, "seed": seed, "num_endmembers": num_endmembers}
    timings: dict = {}
    stage1 = None
    start = time.perf_counter()
    if method in GAUSS_VARIANTS:
        gauss_config = gauss_config or GaussConfig(num_bands=bands, num_endmembers=num_endmembers)
        gauss_training = gauss_training or GaussTrainingConfig()
        gauss_training = GaussTrainingConfig(**{**gauss_training.to_dict(), "seed": seed})
        fitted = fit_gauss(cube, num_endmembers, method, gauss_config, gauss_training)
        endmembers, abundances, reconstruction = fitted.endmembers, fitted.abundances, fitted.reconstruction
        settings["gauss_config"] = gauss_config.to_dict()
        settings["gauss_training"] = gauss_training.to_dict()
        timings.update(fitted.timings)
        if fitted.stage1 is not None:
            stage1_timings = {
                key: fitted.timings[key] for key in ("pseudo_ground_truth_s", "stage1_s", "stage1_read_out_s")
            }
            stage1 = UnmixingResult(
                method="gauss",
                endmembers=fitted.stage1["endmembers"],
                abundances=fitted.stage1["abundances"],
                reconstruction=fitted.stage1["reconstruction"],
                wall_time_s=sum(stage1_timings.values()),
                settings={**settings, "method": "gauss", "read_from": "the gauss_blind run's stage 1"},
                timings=stage1_timings,
            )
    elif method == "autoencoder":
        autoencoder_config = autoencoder_config or AutoencoderConfig()
        autoencoder_config = AutoencoderConfig(**{**autoencoder_config.to_dict(), "seed": seed})
        endmembers, flat, flat_reconstruction = fit_autoencoder(pixels, num_endmembers, autoencoder_config)
        abundances = flat.reshape(rows, cols, num_endmembers)
        reconstruction = flat_reconstruction.reshape(rows, cols, bands)
        settings["autoencoder_config"] = autoencoder_config.to_dict()
    elif method == "misicnet":
        spatial_config = spatial_autoencoder_config or SpatialAutoencoderConfig()
        spatial_config = SpatialAutoencoderConfig(**{**spatial_config.to_dict(), "seed": seed})
        endmembers, abundances, reconstruction = fit_spatial_autoencoder(cube, num_endmembers, spatial_config)
        settings["spatial_autoencoder_config"] = spatial_config.to_dict()
    else:
        if method == "vca_fclsu":
            endmembers, flat = vca_fclsu(pixels, num_endmembers, seed=seed)
        elif method == "nfindr_fclsu":
            endmembers, flat = nfindr_fclsu(pixels, num_endmembers, seed=seed)
        else:
            endmembers, flat = kmeans_unmixing(
                pixels, num_endmembers, seed=seed, abundances=kmeans_abundances
            )
            settings["kmeans_abundances"] = kmeans_abundances
        abundances = flat.reshape(rows, cols, num_endmembers)
        reconstruction = abundances @ endmembers.T
    wall = time.perf_counter() - start
    return UnmixingResult(
        method=method,
        endmembers=np.asarray(endmembers, dtype=np.float64),
        abundances=np.asarray(abundances, dtype=np.float64),
        reconstruction=np.asarray(reconstruction, dtype=np.float64),
        wall_time_s=wall,
        settings=settings,
        timings=timings,
        stage1=stage1,
    )


def _environment() -> dict:
    import scipy
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit_learn": sklearn.__version__,
        "torch": torch.__version__,
    }


def save_result(
    result: UnmixingResult,
    scene: HyperspectralScene,
    output_dir: str | os.PathLike,
    extra: dict | None = None,
    plots: bool = True,
    arrays: bool = True,
) -> dict:
    """Score ``result`` against the scene's ground truth (when present) and write it to ``output_dir``.

    Writes ``results.json`` (metrics, wall time, settings, environment), ``endmembers.npy`` ``(bands, p)``
    and ``abundances.npy`` ``(rows, cols, p)`` (both in the reference's endmember order when there is a
    reference; skipped with ``arrays=False``), and ``abundances.png`` / ``endmembers.png`` (skipped with
    ``plots=False``). Returns the ``results.json`` content.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_unmixing(
        result.endmembers,
        result.abundances,
        reference_endmembers=scene.endmembers,
        reference_abundances=scene.abundances,
        cube=scene.cube,
        reconstruction=result.reconstruction,
    )
    endmembers, abundances = result.endmembers, result.abundances
    if metrics.matching is not None:
        order = np.asarray(metrics.matching)
        endmembers, abundances = endmembers[:, order], abundances[..., order]
    if arrays:
        np.save(output_dir / "endmembers.npy", endmembers)
        np.save(output_dir / "abundances.npy", abundances)
    content = {
        "method": result.method,
        "scene": scene.name,
        "scene_shape": list(scene.shape),
        "num_endmembers": int(result.endmembers.shape[1]),
        **metrics.to_dict(),
        "wall_time_s": result.wall_time_s,
        "timings": result.timings,
        "endmember_order": "reference" if metrics.matching is not None else "method",
        "settings": result.settings,
        "environment": _environment(),
    }
    if extra:
        content.update(extra)
    if plots:
        title = result.method
        if metrics.sad_mean is not None:
            title += f": mean SAD {metrics.sad_mean:.4f} rad"
        if metrics.armse is not None:
            title += f", aRMSE {metrics.armse:.4f}"
        plot_abundance_maps(
            abundances,
            output_dir / "abundances.png",
            reference=scene.abundances,
            names=scene.endmember_names,
            title=title,
        )
        plot_endmembers(
            endmembers,
            output_dir / "endmembers.png",
            reference=scene.endmembers,
            wavelengths=scene.wavelengths,
            names=scene.endmember_names,
            sad=metrics.sad_per_endmember,
            title=title,
        )
        content["plots"] = ["abundances.png", "endmembers.png"]
    with open(output_dir / "results.json", "w") as handle:
        json.dump(content, handle, indent=2, default=_json_default)
    return content


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
