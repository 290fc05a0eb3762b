"""Baseline: the standard unmixing autoencoder with a single linear decoder.

Encoder: an MLP from a pixel spectrum to softmax abundances (non-negative, sum to one). Decoder: one
bias-free ``nn.Linear(p, bands)`` whose weight matrix is the endmember matrix, kept non-negative by
projection after every step. Trained to reconstruct each pixel; no spatial information and no guidance.
This is the architecture GAUSS relaxes (Palsson et al., "Hyperspectral unmixing using a neural network
autoencoder", IEEE Access 6, 2018; Ozkan et al., "EndNet", IEEE TGRS 57(1), 2019).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .baselines import kmeans_clustering
from .extraction import vca
from .model import MLP

__all__ = ["AutoencoderConfig", "LinearUnmixingAutoencoder", "fit_autoencoder"]


@dataclass
class AutoencoderConfig:
    """Linear-decoder autoencoder settings.

    Attributes:
        hidden_dims: encoder hidden widths.
        activation: encoder non-linearity (see :func:`~peft_fed.unmixing.model.make_activation`).
        decoder_init: initial endmembers: ``"vca"`` (the common practice), ``"kmeans"`` (cluster means) or
            ``"random"`` (random pixels).
        loss: ``"mse"`` or ``"sad"`` (mean spectral angle between pixel and reconstruction).
        steps: optimisation steps.
        batch_size: pixels per step.
        learning_rate: Adam learning rate.
        seed: seeds initialisation and batch sampling.
        show_progress: tqdm progress bar.
    """

    hidden_dims: tuple[int, ...] = (128, 64)
    activation: str = "leaky_relu"
    decoder_init: str = "vca"
    loss: str = "mse"
    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(int(d) for d in self.hidden_dims)
        if self.decoder_init not in ("vca", "kmeans", "random"):
            raise ValueError(f"decoder_init must be 'vca', 'kmeans' or 'random', got {self.decoder_init!r}")
        if self.loss not in ("mse", "sad"):
            raise ValueError(f"loss must be 'mse' or 'sad', got {self.loss!r}")
        if self.steps < 0 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and learning_rate > 0")

    def to_dict(self) -> dict:
        return asdict(self)


class LinearUnmixingAutoencoder(nn.Module):
    """``encoder`` (MLP + softmax) and ``decoder`` (bias-free linear layer, weight = endmembers)."""

    def __init__(
        self, num_bands: int, num_endmembers: int, hidden_dims: tuple[int, ...], activation: str
    ) -> None:
        super().__init__()
        self.encoder = MLP([num_bands, *hidden_dims, num_endmembers], activation)
        self.decoder = nn.Linear(num_endmembers, num_bands, bias=False)

    def forward(self, spectra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abundances = torch.softmax(self.encoder(spectra), dim=-1)
        return abundances, self.decoder(abundances)


def _initial_endmembers(pixels: np.ndarray, p: int, config: AutoencoderConfig) -> np.ndarray:
    if config.decoder_init == "vca":
        return vca(pixels, p, seed=config.seed)[1]
    if config.decoder_init == "kmeans":
        return kmeans_clustering(pixels, p, seed=config.seed)[1]
    rng = np.random.default_rng(config.seed)
    return pixels[rng.choice(len(pixels), size=p, replace=False)].T


def fit_autoencoder(
    pixels: np.ndarray, num_endmembers: int, config: AutoencoderConfig | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train the autoencoder on ``(num_pixels, bands)`` pixels.

    Returns:
        ``(endmembers (bands, p), abundances (num_pixels, p), reconstruction (num_pixels, bands))``.
    """
    config = config or AutoencoderConfig()
    pixels = np.asarray(pixels, dtype=np.float64)
    num_pixels, bands = pixels.shape
    # One global scale: inputs of order one without changing the mixing geometry.
    scale = float(np.max(np.abs(pixels))) or 1.0
    data = torch.as_tensor(pixels / scale, dtype=torch.float32)
    torch.manual_seed(config.seed)
    model = LinearUnmixingAutoencoder(bands, num_endmembers, config.hidden_dims, config.activation)
    with torch.no_grad():
        init = _initial_endmembers(pixels, num_endmembers, config) / scale
        model.decoder.weight.copy_(torch.as_tensor(np.maximum(init, 0.0), dtype=torch.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, num_pixels)
    model.train()
    for _ in tqdm(range(config.steps), desc="autoencoder", disable=not config.show_progress, leave=False):
        batch = data[torch.randint(num_pixels, (batch_size,), generator=generator)]
        _, reconstruction = model(batch)
        if config.loss == "mse":
            loss = torch.mean((reconstruction - batch) ** 2)
        else:
            cosine = nn.functional.cosine_similarity(reconstruction, batch, dim=-1, eps=1e-8)
            loss = torch.mean(torch.arccos(torch.clamp(cosine, -1 + 1e-7, 1 - 1e-7)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.decoder.weight.clamp_(min=0.0)  # endmembers are reflectances
    model.eval()
    with torch.no_grad():
        abundances, reconstruction = model(data)
    endmembers = model.decoder.weight.detach().double().numpy() * scale
    return endmembers, abundances.double().numpy(), reconstruction.double().numpy() * scale
