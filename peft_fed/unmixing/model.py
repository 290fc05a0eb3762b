"""The GAUSS networks: approximation (AN), unmixing (UN) and mixing (MN) networks.

Ranasinghe et al., "GAUSS: Guided Encoder-Decoder Architecture for Hyperspectral Unmixing with Spatial
Smoothness", arXiv:2204.07713. Data flow for one pixel with neighbourhood ``window`` (k x k spectra):

    approximation = AN(window)                 # approximated centre spectrum (spatial smoothing)
    abundances    = softmax(UN(approximation)) # non-negative, sum to one
    reconstruction = MN(abundances)            # target: approximation
    endmember k    = MN(e_k)                   # e_k one-hot

All learned maps are built from plain ``nn.Linear`` layers with stable names so that PEFT's LoRA can target
them (e.g. ``target_modules=["hidden", "output", "layers.0", "linear"]``). The model works in a scaled
space (reflectance divided by ``data_scale``) and returns spectra in the data's own units.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import GaussConfig

__all__ = [
    "ApproximationNetwork",
    "GaussModel",
    "MLP",
    "MixingNetwork",
    "UnmixingNetwork",
    "make_activation",
]


def make_activation(name: str) -> nn.Module:
    """The hidden-layer non-linearity named in :class:`GaussConfig`."""
    activations = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
    }
    if name not in activations:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(activations)}")
    return activations[name]()


class MLP(nn.Module):
    """Stack of ``nn.Linear`` layers (``layers.0``, ``layers.1``, ...) with an activation between them."""

    def __init__(self, dims: list[int] | tuple[int, ...], activation: str, bias: bool = True) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"an MLP needs at least input and output widths, got {dims}")
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=bias) for i in range(len(dims) - 1))
        self.activation = make_activation(activation)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = inputs
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index < len(self.layers) - 1:
                hidden = self.activation(hidden)
        return hidden


class ApproximationNetwork(nn.Module):
    """AN: the spectra of a k x k neighbourhood -> an approximation of the centre spectrum.

    Output = mean of the neighbourhood spectra + a learned correction ``output(act(hidden(flat window)))``.
    The correction layer starts at zero, so the untrained AN is a box filter, and training moves it toward
    the centre pixel only as far as the neighbourhood supports; the mean path keeps it a smoother.
    """

    def __init__(self, num_bands: int, num_inputs: int, hidden_dim: int, activation: str) -> None:
        super().__init__()
        self.num_bands = num_bands
        self.num_inputs = num_inputs
        self.hidden = nn.Linear(num_inputs * num_bands, hidden_dim)
        self.output = nn.Linear(hidden_dim, num_bands)
        self.activation = make_activation(activation)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """``window``: ``(batch, num_inputs, bands)`` -> ``(batch, bands)``."""
        correction = self.output(self.activation(self.hidden(window.flatten(1))))
        return window.mean(dim=1) + correction


class UnmixingNetwork(nn.Module):
    """UN: spectrum -> abundance logits; :meth:`GaussModel.forward` applies the softmax."""

    def __init__(
        self, num_bands: int, num_endmembers: int, hidden_dims: tuple[int, ...], activation: str
    ) -> None:
        super().__init__()
        self.mlp = MLP([num_bands, *hidden_dims, num_endmembers], activation)

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        return self.mlp(spectrum)


class MixingNetwork(nn.Module):
    """MN: abundances -> spectrum. ``linear(a)`` (bias-free linear mixing) plus an optional MLP correction.

    With no hidden layers it is exactly the linear mixing model ``E a`` (``linear.weight`` is ``E``).
    """

    def __init__(
        self,
        num_endmembers: int,
        num_bands: int,
        hidden_dims: tuple[int, ...],
        activation: str,
        linear_skip: bool,
    ) -> None:
        super().__init__()
        self.num_endmembers = num_endmembers
        self.num_bands = num_bands
        self.mlp = MLP([num_endmembers, *hidden_dims, num_bands], activation) if hidden_dims else None
        self.linear = (
            nn.Linear(num_endmembers, num_bands, bias=False) if (linear_skip or not hidden_dims) else None
        )

    def components(self, abundances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear-mixing part and the non-linear correction (zeros when absent) of the output."""
        zeros = abundances.new_zeros(abundances.shape[:-1] + (self.num_bands,))
        linear = self.linear(abundances) if self.linear is not None else zeros
        nonlinear = self.mlp(abundances) if self.mlp is not None else zeros
        return linear, nonlinear

    def forward(self, abundances: torch.Tensor) -> torch.Tensor:
        linear, nonlinear = self.components(abundances)
        return linear + nonlinear


class GaussModel(nn.Module):
    """AN + UN + MN, operating on neighbourhood windows ``(batch, k*k, bands)`` in data units.

    Submodules: ``approximation`` (AN), ``unmixing`` (UN), ``mixing`` (MN). ``data_scale`` (a buffer)
    divides inputs and multiplies outputs, so the networks see reflectance of order one whatever the data's
    units.
    """

    def __init__(self, config: GaussConfig, data_scale: float = 1.0) -> None:
        super().__init__()
        if data_scale <= 0:
            raise ValueError(f"data_scale must be > 0, got {data_scale}")
        self.config = config
        area = config.window_size**2
        positions = [i for i in range(area) if config.an_include_centre or i != area // 2]
        self.register_buffer("input_positions", torch.tensor(positions, dtype=torch.long), persistent=False)
        self.register_buffer("data_scale", torch.tensor(float(data_scale)))
        self.approximation = ApproximationNetwork(
            config.num_bands, len(positions), config.an_hidden_dim, config.activation
        )
        self.unmixing = UnmixingNetwork(
            config.num_bands, config.num_endmembers, config.un_hidden_dims, config.activation
        )
        self.mixing = MixingNetwork(
            config.num_endmembers,
            config.num_bands,
            config.mn_hidden_dims,
            config.activation,
            config.mn_linear_skip,
        )

    def forward(
        self,
        window: torch.Tensor,
        detach_un_input: bool = False,
        detach_mn_input: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Run AN -> UN -> MN on a batch of windows ``(batch, k*k, bands)`` (data units).

        Args:
            window: the full k x k neighbourhoods, row-major, centre at index ``k*k // 2``.
            detach_un_input: stop gradients from the UN into the AN.
            detach_mn_input: stop gradients from the MN into the UN (GAUSS stage 1: the UN is trained by
                the pseudo ground truth only).

        Returns:
            ``approximation`` and ``reconstruction`` (data units, ``(batch, bands)``), ``logits`` and
            ``abundances`` (``(batch, p)``), and ``mixing_nonlinear``, the MN's non-linear correction in
            scaled units (zeros for a linear MN), all in the networks' graph.
        """
        scaled = window.index_select(1, self.input_positions) / self.data_scale
        approximation = self.approximation(scaled)
        un_input = approximation.detach() if detach_un_input else approximation
        logits = self.unmixing(un_input) / self.config.softmax_temperature
        abundances = torch.softmax(logits, dim=-1)
        mn_input = abundances.detach() if detach_mn_input else abundances
        linear, nonlinear = self.mixing.components(mn_input)
        return {
            "approximation": approximation * self.data_scale,
            "logits": logits,
            "abundances": abundances,
            "reconstruction": (linear + nonlinear) * self.data_scale,
            "mixing_nonlinear": nonlinear,
        }

    @torch.no_grad()
    def clamp_mixing_weights_(self) -> None:
        """Project the MN's linear-mixing weights (its endmember matrix) onto the non-negative orthant.

        Reflectances are non-negative; without this, blind training can push a dark endmember (water)
        below zero to compensate for the small abundances a softmax leaves on the other endmembers.
        Frozen weights (e.g. under a LoRA adapter) are left alone.
        """
        linear = self.mixing.linear
        if linear is not None and linear.weight.requires_grad:
            linear.weight.clamp_(min=0.0)

    def unmix_spectra(self, spectra: torch.Tensor) -> torch.Tensor:
        """UN on spectra that need no approximation, ``(batch, bands)`` data units -> abundances."""
        logits = self.unmixing(spectra / self.data_scale) / self.config.softmax_temperature
        return torch.softmax(logits, dim=-1)

    def endmembers(self) -> torch.Tensor:
        """Endmember spectra ``(bands, p)`` in data units: column k is ``MN(e_k)``."""
        identity = torch.eye(
            self.config.num_endmembers, device=self.data_scale.device, dtype=self.data_scale.dtype
        )
        return (self.mixing(identity) * self.data_scale).T
