"""Hyperspectral scenes and their loaders (.mat, MATLAB v7.3/HDF5, .npy, ENVI, Samson-like folders).

A scene is a cube ``(rows, cols, bands)`` with optional ground truth: endmembers ``(bands, p)`` and
abundances ``(rows, cols, p)``. Loaders take a path chosen by the user; nothing is bundled or downloaded.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "HyperspectralScene",
    "load_array",
    "load_cube",
    "load_scene",
    "load_scene_folder",
]

# Variable names tried, in order, when a .mat file holds several arrays.
CUBE_VARIABLE_NAMES = ("Y_clean", "Y", "cube", "data", "X", "img", "image")
ABUNDANCE_VARIABLE_NAMES = ("A_true", "A", "abundances", "abundance", "S")
ENDMEMBER_VARIABLE_NAMES = ("E", "M", "endmembers", "endmember", "E_true", "M_true")

# File stems recognised in a Samson-like folder (MiSiCNet layout), each as .mat or .npy.
CUBE_FILE_STEMS = ("Y_clean", "Y")
ABUNDANCE_FILE_STEMS = ("A_true",)
ENDMEMBER_FILE_STEMS = ("E", "E_true")


@dataclass
class HyperspectralScene:
    """A hyperspectral cube and, when known, its ground truth.

    Attributes:
        cube: reflectance, shape ``(rows, cols, bands)``.
        endmembers: reference endmember spectra, shape ``(bands, p)``, or None.
        abundances: reference abundance maps, shape ``(rows, cols, p)``, or None.
        wavelengths: band centres (any unit), shape ``(bands,)``, or None.
        endmember_names: one name per reference endmember, or None.
        name: a label used in plots and results.
        metadata: free-form provenance (source path, generator settings), copied into results.
    """

    cube: np.ndarray
    endmembers: np.ndarray | None = None
    abundances: np.ndarray | None = None
    wavelengths: np.ndarray | None = None
    endmember_names: list[str] | None = None
    name: str = "scene"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cube = np.asarray(self.cube, dtype=np.float64)
        if self.cube.ndim != 3:
            raise ValueError(f"a cube must have shape (rows, cols, bands), got shape {self.cube.shape}")
        if min(self.cube.shape) < 1:
            raise ValueError(f"the cube is empty: shape {self.cube.shape}")
        if not np.all(np.isfinite(self.cube)):
            raise ValueError(
                f"the cube holds {int(np.sum(~np.isfinite(self.cube)))} NaN or infinite values; "
                "mask or interpolate bad bands before unmixing"
            )
        rows, cols, bands = self.cube.shape
        if self.endmembers is not None:
            self.endmembers = np.asarray(self.endmembers, dtype=np.float64)
            if self.endmembers.ndim != 2:
                raise ValueError(
                    f"ground-truth endmembers must be a (bands, p) matrix, got shape {self.endmembers.shape}"
                )
            if self.endmembers.shape[0] != bands:
                if self.endmembers.shape[1] == bands:
                    # Stored as (p, bands): the orientation is unambiguous because only one axis fits.
                    self.endmembers = self.endmembers.T.copy()
                else:
                    raise ValueError(
                        f"ground-truth endmembers of shape {self.endmembers.shape} do not match the cube of "
                        f"shape {self.cube.shape}: expected ({bands}, p)"
                    )
        if self.abundances is not None:
            self.abundances = np.asarray(self.abundances, dtype=np.float64)
            if self.abundances.ndim != 3 or self.abundances.shape[:2] != (rows, cols):
                raise ValueError(
                    f"ground-truth abundances of shape {self.abundances.shape} do not match the cube of "
                    f"shape {self.cube.shape}: expected ({rows}, {cols}, p)"
                )
        if self.endmembers is not None and self.abundances is not None:
            if self.endmembers.shape[1] != self.abundances.shape[2]:
                raise ValueError(
                    f"ground-truth endmembers of shape {self.endmembers.shape} and abundances of shape "
                    f"{self.abundances.shape} disagree on the number of endmembers"
                )
        if self.wavelengths is not None:
            self.wavelengths = np.asarray(self.wavelengths, dtype=np.float64).reshape(-1)
            if self.wavelengths.shape[0] != bands:
                raise ValueError(
                    f"{self.wavelengths.shape[0]} wavelengths given for a cube with {bands} bands "
                    f"(shape {self.cube.shape})"
                )
        if self.endmember_names is not None and self.num_reference_endmembers is not None:
            if len(self.endmember_names) != self.num_reference_endmembers:
                raise ValueError(
                    f"{len(self.endmember_names)} endmember names for {self.num_reference_endmembers} endmembers"
                )
        # A NaN would be scored as a right angle (SAD pi/2) or poison the abundance RMSE without a word.
        if self.endmembers is not None:
            check_finite_endmembers(self.endmembers, "reference endmember", self.endmember_names)
        if self.abundances is not None:
            bad = ~np.isfinite(self.abundances).reshape(-1, self.abundances.shape[2]).all(axis=0)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"reference abundances of {_endmember_label(j, self.endmember_names)} hold "
                    f"{int(np.sum(~np.isfinite(self.abundances[..., j])))} NaN or infinite values; fix the ground truth"
                )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.cube.shape)  # type: ignore[return-value]

    @property
    def num_bands(self) -> int:
        return int(self.cube.shape[2])

    @property
    def num_pixels(self) -> int:
        return int(self.cube.shape[0] * self.cube.shape[1])

    @property
    def pixels(self) -> np.ndarray:
        """The cube as a ``(rows * cols, bands)`` matrix, row-major."""
        return self.cube.reshape(-1, self.num_bands)

    @property
    def num_reference_endmembers(self) -> int | None:
        if self.endmembers is not None:
            return int(self.endmembers.shape[1])
        if self.abundances is not None:
            return int(self.abundances.shape[2])
        return None


def _endmember_label(j: int, names: list[str] | None = None) -> str:
    return f"{names[j]!r} (column {j})" if names is not None and j < len(names) else str(j)


def check_finite_endmembers(
    endmembers: np.ndarray, what: str = "endmember", names: list[str] | None = None
) -> None:
    """A ``ValueError`` naming the first column of ``endmembers`` ``(bands, p)`` that holds a NaN or infinity."""
    finite = np.isfinite(endmembers)
    bad = ~finite.all(axis=0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what} {_endmember_label(j, names)} holds {int(np.sum(~finite[:, j]))} NaN or infinite value(s) "
            f"out of {endmembers.shape[0]} bands; fix or drop it before scoring"
        )


def _mat_variables(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a .mat file; MATLAB v7.3 files (HDF5) go through h5py when it is installed."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        content = scipy.io.loadmat(str(path))
        return {k: np.asarray(v) for k, v in content.items() if not k.startswith("__")}
    except NotImplementedError:
        # scipy raises NotImplementedError for v7.3 files, which are HDF5 containers.
        pass
    except (MatReadError, ValueError, TypeError, EOFError, OSError) as error:
        # Not a MATLAB v4-v7 file (garbage, cut short); it may still be a bare HDF5 container saved as .mat.
        if not _is_hdf5(path):
            raise _unreadable(path, error) from None
    try:
        import h5py
    except ImportError as exc:
        raise ImportError(
            f"{path} is a MATLAB v7.3 (HDF5) file; reading it needs h5py (`pip install h5py`), or re-save it "
            "in MATLAB with save(..., '-v7')"
        ) from exc
    variables = {}
    try:
        with h5py.File(str(path), "r") as handle:
            for key, value in handle.items():
                if isinstance(value, h5py.Dataset) and not key.startswith("#"):
                    # MATLAB writes column-major arrays: HDF5 sees every axis reversed.
                    variables[key] = np.asarray(value[()]).transpose()
    except (OSError, ValueError, TypeError) as error:
        raise _unreadable(path, error) from None
    return variables


def _unreadable(path: Path, error: BaseException) -> ValueError:
    detail = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return ValueError(
        f"{path} is not a readable MATLAB .mat file ({detail}); re-save it in MATLAB with save(..., '-v7') "
        "or as .npy"
    )


def _is_hdf5(path: Path) -> bool:
    signature = b"\x89HDF\r\n\x1a\n"
    with open(path, "rb") as handle:
        head = handle.read(2048 + 8)
    # HDF5 puts its signature at offset 0, 512, 1024 or 2048 (after a user block, as MATLAB v7.3 does).
    return any(head[offset : offset + 8] == signature for offset in (0, 512, 1024, 2048))


def _envi_header(path: Path) -> Path | None:
    if path.suffix.lower() == ".hdr":
        return path
    for candidate in (path.with_suffix(".hdr"), Path(str(path) + ".hdr")):
        if candidate.is_file():
            return candidate
    return None


def load_array(
    path: str | os.PathLike, variable: str | None = None, preferred: tuple[str, ...] = ()
) -> np.ndarray:
    """Read one array from a ``.mat`` (v5/v7 or v7.3), ``.npy``/``.npz`` or ENVI (``.hdr`` + data) file.

    Args:
        path: the file.
        variable: name of the array inside a ``.mat``/``.npz`` file; when None, the file's only array, else
            the first of ``preferred`` that is present.
        preferred: names tried in order when ``variable`` is None and the file holds several arrays.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        variables = _mat_variables(path)
    elif suffix in (".npy", ".npz"):
        try:
            if suffix == ".npy":
                return np.load(path, allow_pickle=False)
            with np.load(path, allow_pickle=False) as content:
                variables = {k: content[k] for k in content.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            detail = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise ValueError(f"{path} is not a readable NumPy {suffix} file ({detail})") from None
    elif _envi_header(path) is not None:
        import spectral

        header = _envi_header(path)
        data_file = None if path.suffix.lower() == ".hdr" else str(path)
        image = (
            spectral.open_image(str(header))
            if data_file is None
            else spectral.envi.open(str(header), data_file)
        )
        return np.asarray(image.load())
    else:
        raise ValueError(
            f"unsupported file {path}: expected .mat, .npy, .npz or an ENVI image with a .hdr header"
        )
    if not variables:
        raise ValueError(f"{path} holds no arrays")
    if variable is not None:
        if variable not in variables:
            raise KeyError(f"{path} has no variable {variable!r}; it holds {sorted(variables)}")
        return variables[variable]
    if len(variables) == 1:
        return next(iter(variables.values()))
    for name in preferred:
        if name in variables:
            return variables[name]
    raise ValueError(f"{path} holds several arrays {sorted(variables)}; name the one to use")


def load_cube(path: str | os.PathLike, variable: str | None = None) -> np.ndarray:
    """Read a ``(rows, cols, bands)`` cube from a file (see :func:`load_array` for the formats)."""
    cube = np.asarray(load_array(path, variable=variable, preferred=CUBE_VARIABLE_NAMES), dtype=np.float64)
    if cube.ndim != 3:
        raise ValueError(
            f"{path}: expected a 3-D cube (rows, cols, bands), got an array of shape {cube.shape}"
        )
    return cube


def _find_file(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in (".mat", ".npy"):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def load_scene_folder(folder: str | os.PathLike) -> HyperspectralScene:
    """Load a Samson-like folder: ``Y_clean.mat`` (cube) with optional ``A_true.mat`` and ``E.mat``.

    Each file may also be ``.npy``. Ground truth whose shape does not fit the cube is rejected with an
    error naming both shapes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    cube_path = _find_file(folder, CUBE_FILE_STEMS)
    if cube_path is None:
        raise FileNotFoundError(
            f"{folder} has no cube: expected one of "
            f"{', '.join(s + '.mat' for s in CUBE_FILE_STEMS)} (or .npy)"
        )
    cube = load_cube(cube_path)
    abundance_path = _find_file(folder, ABUNDANCE_FILE_STEMS)
    endmember_path = _find_file(folder, ENDMEMBER_FILE_STEMS)
    abundances = (
        load_array(abundance_path, preferred=ABUNDANCE_VARIABLE_NAMES) if abundance_path is not None else None
    )
    endmembers = (
        load_array(endmember_path, preferred=ENDMEMBER_VARIABLE_NAMES) if endmember_path is not None else None
    )
    return HyperspectralScene(
        cube=cube,
        endmembers=endmembers,
        abundances=abundances,
        name=folder.name,
        metadata={"source": str(folder)},
    )


def load_scene(path: str | os.PathLike) -> HyperspectralScene:
    """Load a scene from a Samson-like folder or from a single cube file (no ground truth then)."""
    path = Path(path)
    if path.is_dir():
        return load_scene_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return HyperspectralScene(cube=load_cube(path), name=path.stem, metadata={"source": str(path)})
