"""Baseline: a spatial-spectral convolutional unmixing autoencoder in the style of MiSiCNet.

B. Rasti, B. Koirala, P. Scheunders and P. Ghamisi, "MiSiCNet: Minimum Simplex Convolutional Network for
Deep Hyperspectral Unmixing", IEEE Trans. Geosci. Remote Sens. 60, 2022 (5522815). The whole image is one
sample:

    encoder  3x3 conv (L -> width) + BN + LeakyReLU(0.1)          a 1x1 conv skip (L -> skip_width) + BN + LReLU
             concatenated -> 3x3 conv (-> width) + BN + LReLU -> 3x3 conv (-> p) + BN -> softmax over channels
    decoder  a bias-free linear map p -> L per pixel; its weight is the endmember matrix E, clipped to
             [0, 1] (scaled reflectance) after every step, initialised with VCA's endmembers
    loss     0.5 ||Y - E A||_F^2 + lambda ||E - y_mean 1^T||_F^2,   lambda = volume_weight_per_pixel x pixels

The second term is the paper's minimum-simplex-volume penalty: it pulls every endmember toward the data's
mean spectrum, so the simplex does not grow past the data. The paper's lambda = 100 is for a whole-image sum of
squares on Samson's 95 x 95 pixels; the data term grows with the number of pixels and the penalty does not, so
a fixed lambda is 3.6 times stronger per pixel on a 50 x 50 image. Scaling lambda with the pixel count keeps
the paper's balance on every image size. ``Y`` is the cube projected onto its ``p``
leading singular vectors (the paper's denoising step), divided by one global scale. The abundances are the
softmax of the last encoder layer, hence non-negative and summing to one by construction; the reported ones
are the exponential moving average of the per-step outputs (``abundance_ema``), as in the authors' code.

Deliberate differences from the paper, for a CPU benchmark: hidden width 64 instead of 256 and 500
instead of 8,000 full-image steps (both settings), and the network reads the projected image rather than a
fixed noise image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .extraction import vca

__all__ = [
    "PAPER_VOLUME_WEIGHT_PER_PIXEL",
    "MinimumSimplexConvAutoencoder",
    "SpatialAutoencoderConfig",
    "fit_spatial_autoencoder",
    "minimum_simplex_loss",
]

PAPER_VOLUME_WEIGHT_PER_PIXEL = 100.0 / (95 * 95)


@dataclass
class SpatialAutoencoderConfig:
    """MiSiCNet-style autoencoder settings.

    Attributes:
        width: channels of the 3x3 convolutions (the paper: 256).
        skip_width: channels of the 1x1 skip branch (the paper: 4).
        volume_weight_per_pixel: lambda of the minimum-simplex-volume penalty divided by the image's pixel
            count (the paper's lambda = 100 on Samson's 95 x 95 pixels gives the default 100 / 9025).
        steps: full-image Adam steps (the paper: 8,000).
        learning_rate: Adam learning rate (the paper: 1e-3).
        abundance_ema: weight of the running average of the abundance maps over steps (the paper's code: 0.99;
            0 reports the last step's output).
        seed: seeds the initial weights and VCA.
        device: torch device string.
        show_progress: tqdm progress bar.
    """

    width: int = 64
    skip_width: int = 4
    volume_weight_per_pixel: float = PAPER_VOLUME_WEIGHT_PER_PIXEL
    steps: int = 500
    learning_rate: float = 1e-3
    abundance_ema: float = 0.99
    seed: int = 0
    device: str = "cpu"
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("width", "skip_width", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.volume_weight_per_pixel >= 0:
            raise ValueError(f"volume_weight_per_pixel must be >= 0, got {self.volume_weight_per_pixel}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.abundance_ema < 1.0:
            raise ValueError(f"abundance_ema must be in [0, 1), got {self.abundance_ema}")

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReflectionPad2d(kernel_size // 2),
        nn.Conv2d(in_channels, out_channels, kernel_size),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1),
    )


class MinimumSimplexConvAutoencoder(nn.Module):
    """The encoder (convolutions + softmax over endmembers) and the linear decoder ``decoder.weight`` = E."""

    def __init__(self, num_bands: int, num_endmembers: int, width: int, skip_width: int) -> None:
        super().__init__()
        self.spatial = _conv_block(num_bands, width, 3)
        self.skip = _conv_block(num_bands, skip_width, 1)
        self.merge = _conv_block(width + skip_width, width, 3)
        self.to_abundances = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, num_endmembers, 3), nn.BatchNorm2d(num_endmembers)
        )
        self.decoder = nn.Linear(num_endmembers, num_bands, bias=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` ``(1, bands, rows, cols)`` -> abundances ``(1, p, rows, cols)`` and the reconstruction
        ``(rows * cols, bands)``."""
        hidden = self.merge(torch.cat([self.spatial(image), self.skip(image)], dim=1))
        abundances = torch.softmax(self.to_abundances(hidden), dim=1)
        per_pixel = abundances.flatten(2)[0].T
        return abundances, self.decoder(per_pixel)


def _signal_subspace_projection(pixels: np.ndarray, num_endmembers: int) -> np.ndarray:
    # The paper's denoising: keep the p leading singular directions of the (bands x pixels) data.
    _, _, right = np.linalg.svd(pixels, full_matrices=False)
    basis = right[:num_endmembers].T
    return pixels @ basis @ basis.T


def minimum_simplex_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    endmembers: torch.Tensor,
    data_mean: torch.Tensor,
    volume_weight_per_pixel: float,
) -> torch.Tensor:
    """MiSiCNet's loss ``0.5 ||Y - E A||^2 + lambda ||E - y_mean 1^T||^2`` with lambda scaled to the image:
    ``reconstruction`` and ``target`` ``(pixels, bands)``, ``endmembers`` ``(bands, p)``, ``data_mean``
    ``(bands,)``; lambda = ``volume_weight_per_pixel`` x pixels."""
    volume_weight = volume_weight_per_pixel * target.shape[0]
    return 0.5 * torch.sum((reconstruction - target) ** 2) + volume_weight * torch.sum(
        (endmembers - data_mean[:, None]) ** 2
    )


def fit_spatial_autoencoder(
    cube: np.ndarray, num_endmembers: int, config: SpatialAutoencoderConfig | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train the MiSiCNet-style autoencoder on a ``(rows, cols, bands)`` cube.

    Returns:
        ``(endmembers (bands, p), abundances (rows, cols, p), reconstruction (rows, cols, bands))``, spectra in
        the cube's units; the abundances are non-negative and sum to one per pixel.
    """
    config = config or SpatialAutoencoderConfig()
    cube = np.asarray(cube, dtype=np.float64)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (rows, cols, bands), got shape {cube.shape}")
    rows, cols, bands = cube.shape
    if not 2 <= num_endmembers <= bands:
        raise ValueError(f"num_endmembers must be between 2 and the {bands} bands, got {num_endmembers}")
    scale = float(np.max(np.abs(cube))) or 1.0
    pixels = cube.reshape(-1, bands) / scale
    projected = _signal_subspace_projection(pixels, num_endmembers)
    device = torch.device(config.device)
    target = torch.as_tensor(projected, dtype=torch.float32, device=device)
    image = target.T.reshape(1, bands, rows, cols).contiguous()
    data_mean = target.mean(dim=0)

    torch.manual_seed(config.seed)
    model = MinimumSimplexConvAutoencoder(bands, num_endmembers, config.width, config.skip_width).to(device)
    initial = np.clip(vca(np.clip(projected, 0.0, 1.0), num_endmembers, seed=config.seed)[1], 0.0, 1.0)
    with torch.no_grad():
        model.decoder.weight.copy_(torch.as_tensor(initial, dtype=torch.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    average = None
    model.train()  # one sample (the whole image): batch norm always normalises with the image's statistics
    for _ in tqdm(range(config.steps), desc="misicnet", disable=not config.show_progress, leave=False):
        abundances, reconstruction = model(image)
        loss = minimum_simplex_loss(
            reconstruction, target, model.decoder.weight, data_mean, config.volume_weight_per_pixel
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.decoder.weight.clamp_(0.0, 1.0)
        current = abundances.detach()
        average = current if average is None else config.abundance_ema * average + (1 - config.abundance_ema) * current
    # A convex combination of simplex points stays on the simplex; renormalise only float rounding.
    abundance_maps = average[0].permute(1, 2, 0).double().cpu().numpy()
    abundance_maps = abundance_maps / abundance_maps.sum(axis=-1, keepdims=True)
    endmembers = model.decoder.weight.detach().double().cpu().numpy()
    reconstruction = (abundance_maps.reshape(-1, num_endmembers) @ endmembers.T).reshape(rows, cols, bands)
    return endmembers * scale, abundance_maps, reconstruction * scale
