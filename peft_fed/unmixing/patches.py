"""Neighbourhood windows around pixels, gathered on demand, and tilings of an image into pixel sets.

Windows are gathered per batch from one padded copy of the cube, so memory stays at one cube whatever the
window size; a set of pixel indices (e.g. a federated client's tiles) is all a training loop needs.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PixelWindows", "tile_pixel_indices"]


class PixelWindows:
    """k x k neighbourhoods of the pixels of a ``(rows, cols, bands)`` cube.

    Pixels are numbered row-major (``index = row * cols + col``). Borders are padded by reflection
    (*design choice*, ``padding="reflect"``; ``"replicate"`` repeats the edge pixel instead), so every pixel
    has a full window.
    """

    def __init__(
        self,
        cube: np.ndarray | torch.Tensor,
        window_size: int,
        padding: str = "reflect",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
        if padding not in ("reflect", "replicate"):
            raise ValueError(f"padding must be 'reflect' or 'replicate', got {padding!r}")
        cube_t = torch.as_tensor(np.asarray(cube), dtype=dtype, device=device)
        if cube_t.ndim != 3:
            raise ValueError(f"cube must be (rows, cols, bands), got shape {tuple(cube_t.shape)}")
        self.rows, self.cols, self.bands = cube_t.shape
        self.window_size = window_size
        half = window_size // 2
        if padding == "reflect" and half >= min(self.rows, self.cols):
            raise ValueError(
                f"a {window_size} x {window_size} window needs an image larger than {half} pixels per side "
                f"for reflect padding, got {self.rows} x {self.cols}"
            )
        # torch's pad works on (N, C, H, W): move bands to channels.
        padded = torch.nn.functional.pad(cube_t.permute(2, 0, 1).unsqueeze(0), (half,) * 4, mode=padding)
        self.padded = padded.squeeze(0).permute(1, 2, 0).contiguous()  # (rows + 2h, cols + 2h, bands)
        offsets = torch.arange(window_size, device=device)
        self._row_offsets = offsets.repeat_interleave(window_size)  # row-major window order
        self._col_offsets = offsets.repeat(window_size)
        self.pixels = cube_t.reshape(-1, self.bands)

    @property
    def num_pixels(self) -> int:
        return self.rows * self.cols

    def __call__(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Windows ``(len(indices), k*k, bands)`` of the given row-major pixel indices."""
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.padded.device)
        rows = torch.div(indices, self.cols, rounding_mode="floor")
        cols = indices % self.cols
        # Padded coordinates of the window's top-left corner equal the pixel's own (row, col).
        return self.padded[rows[:, None] + self._row_offsets, cols[:, None] + self._col_offsets]

    def centres(self, indices: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Centre spectra ``(len(indices), bands)``."""
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.pixels.device)
        return self.pixels[indices]


def tile_pixel_indices(rows: int, cols: int, tile_rows: int, tile_cols: int) -> list[np.ndarray]:
    """Split a ``rows x cols`` image into rectangular tiles; each tile as its row-major pixel indices.

    Edge tiles are smaller when the sizes do not divide. Useful to hand each federated client a region.
    """
    if min(rows, cols, tile_rows, tile_cols) < 1:
        raise ValueError("image and tile sizes must be >= 1")
    grid = np.arange(rows * cols).reshape(rows, cols)
    return [
        grid[r : r + tile_rows, c : c + tile_cols].reshape(-1)
        for r in range(0, rows, tile_rows)
        for c in range(0, cols, tile_cols)
    ]
