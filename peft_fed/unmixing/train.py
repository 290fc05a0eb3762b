"""Training GAUSS: pseudo ground truth, one reusable training stage, and the full GAUSS / blind / prime fits.

:func:`train_stage` runs a given number of steps on a given set of pixels. It only calls the model's
forward, so it also trains a PEFT-wrapped (e.g. LoRA) GAUSS model, which is what federated unmixing needs:
each client calls it on its own pixels, with its own pseudo ground truth, for its local steps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import peft_bridge
from .baselines import kmeans_clustering, merge_clusters_by_angle, nfindr_fclsu, vca_fclsu
from .config import GaussConfig, GaussTrainingConfig
from .model import GaussModel
from .patches import PixelWindows

__all__ = [
    "GAUSS_VARIANTS",
    "GaussResult",
    "fit_gauss",
    "gauss_losses",
    "predict",
    "pseudo_ground_truth",
    "train_stage",
    "train_with_early_stopping",
]

GAUSS_VARIANTS = ("gauss", "gauss_blind", "gauss_prime")


def pseudo_ground_truth(
    pixels: np.ndarray,
    num_endmembers: int,
    source: str = "kmeans",
    seed: int = 0,
    kmeans_features: str = "raw",
    kmeans_restarts: int = 10,
    kmeans_clusters_per_endmember: int = 1,
) -> np.ndarray:
    """Pseudo ground-truth abundances ``(num_pixels, p)`` that guide the UN in stage 1.

    Args:
        pixels: ``(num_pixels, bands)``.
        source: ``"kmeans"`` (one-hot cluster labels, k = p: GAUSS needs no other unmixing method),
            ``"vca_fclsu"`` or ``"nfindr_fclsu"`` (GAUSS_prime: a signal-processing method's abundances).
        kmeans_clusters_per_endmember: with ``"kmeans"``, k = this x p clusters, merged back to p groups by
            the spectral angle of their means (:func:`~peft_fed.unmixing.baselines.merge_clusters_by_angle`);
            1 is plain k-means with k = p.
    """
    if source == "kmeans":
        labels, means = kmeans_clustering(
            pixels,
            num_endmembers * kmeans_clusters_per_endmember,
            seed=seed,
            features=kmeans_features,
            restarts=kmeans_restarts,
        )
        if kmeans_clusters_per_endmember > 1:
            labels, _ = merge_clusters_by_angle(pixels, labels, means, num_endmembers)
        return np.eye(num_endmembers)[labels]
    if source == "vca_fclsu":
        return vca_fclsu(pixels, num_endmembers, seed=seed)[1]
    if source == "nfindr_fclsu":
        return nfindr_fclsu(pixels, num_endmembers, seed=seed)[1]
    raise ValueError(f"unknown pseudo ground truth source {source!r}")


def _data_scale(model: nn.Module) -> float:
    # Works for a bare GaussModel and for a PEFT wrapper, which forwards attribute access to it.
    return float(model.data_scale)


def gauss_losses(
    outputs: dict[str, torch.Tensor],
    centres: torch.Tensor,
    pseudo_targets: torch.Tensor | None,
    config: GaussTrainingConfig,
    blind: bool,
    data_scale: float = 1.0,
    mixing: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted GAUSS losses of one batch and their sum (``"total"``).

    - approximation: ``mean |AN(window) - centre|^2`` (scaled units), trains the AN;
    - pseudo: UN abundances vs the pseudo ground truth (soft-target cross-entropy or MSE);
    - reconstruction: ``MN(abundances)`` vs the (detached) AN output, MSE, relative MSE or spectral angle;
    - mixing_nonlinear: ``mean(correction^2)`` of the MN's non-linear part, when weighted.

    - volume (blind stage, when ``blind_volume_weight > 0`` and the MN is given as ``mixing``):
      ``mean((MN(e_k) - batch mean spectrum)^2)``, the minimum-volume pull of the endmembers toward the data.

    Stage 1 uses ``pseudo_weight``; the blind stage uses ``blind_pseudo_weight`` instead.
    """
    approximation = outputs["approximation"] / data_scale
    reconstruction = outputs["reconstruction"] / data_scale
    losses: dict[str, torch.Tensor] = {}
    losses["approximation"] = torch.mean((approximation - centres / data_scale) ** 2)
    target = approximation.detach()
    if config.reconstruction_loss == "mse":
        losses["reconstruction"] = torch.mean((reconstruction - target) ** 2)
    elif config.reconstruction_loss == "relative_mse":
        # Squared error relative to each pixel's energy: dark materials (water, shade) weigh as much as
        # bright ones, which an absolute MSE would let their spectral shape be sacrificed for.
        energy = torch.mean(target**2, dim=-1).clamp_min(1e-12)
        losses["reconstruction"] = torch.mean(torch.mean((reconstruction - target) ** 2, dim=-1) / energy)
    else:
        cosine = nn.functional.cosine_similarity(reconstruction, target, dim=-1, eps=1e-8)
        losses["reconstruction"] = torch.mean(torch.arccos(torch.clamp(cosine, -1 + 1e-7, 1 - 1e-7)))
    pseudo_weight = config.blind_pseudo_weight if blind else config.pseudo_weight
    if pseudo_targets is not None and pseudo_weight > 0:
        if config.pseudo_loss == "cross_entropy":
            log_probs = torch.log_softmax(outputs["logits"], dim=-1)
            losses["pseudo"] = -torch.mean(torch.sum(pseudo_targets * log_probs, dim=-1))
        else:
            losses["pseudo"] = torch.mean((outputs["abundances"] - pseudo_targets) ** 2)
    total = (
        config.approximation_weight * losses["approximation"]
        + config.reconstruction_weight * losses["reconstruction"]
    )
    if config.mn_nonlinear_weight > 0 and "mixing_nonlinear" in outputs:
        losses["mixing_nonlinear"] = torch.mean(outputs["mixing_nonlinear"] ** 2)
        total = total + config.mn_nonlinear_weight * losses["mixing_nonlinear"]
    if "pseudo" in losses:
        total = total + pseudo_weight * losses["pseudo"]
    if blind and config.blind_volume_weight > 0 and mixing is not None:
        num_endmembers = outputs["abundances"].shape[-1]
        identity = torch.eye(num_endmembers, dtype=reconstruction.dtype, device=reconstruction.device)
        endmembers = mixing(identity)
        data_mean = torch.mean(centres / data_scale, dim=0)
        losses["volume"] = torch.mean((endmembers - data_mean) ** 2)
        total = total + config.blind_volume_weight * losses["volume"]
    losses["total"] = total
    return losses


def train_stage(
    model: nn.Module,
    windows: PixelWindows,
    steps: int,
    config: GaussTrainingConfig,
    pixel_indices: np.ndarray | None = None,
    pseudo_targets: np.ndarray | torch.Tensor | None = None,
    blind: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    learning_rate: float | None = None,
    generator: torch.Generator | None = None,
    description: str = "GAUSS",
) -> list[dict[str, float]]:
    """Run ``steps`` optimisation steps of one GAUSS stage on a set of pixels.

    Args:
        model: a :class:`~peft_fed.unmixing.model.GaussModel`, or a wrapper (e.g. a PEFT model) whose
            forward takes the same arguments; only parameters with ``requires_grad`` are optimised.
        windows: the neighbourhood source of the image.
        steps: number of optimisation steps (mini-batches sampled with replacement).
        config: loss weights, batch size, learning rates, progress bar switch.
        pixel_indices: row-major indices of the pixels to train on (default: all pixels), e.g. a client's
            tiles.
        pseudo_targets: pseudo ground truth aligned with ``pixel_indices`` (``(len(pixel_indices), p)``);
            required in stage 1 when ``pseudo_weight > 0``.
        blind: False for stage 1 (the MN's input is detached, so the UN learns only from the pseudo ground
            truth); True for the GAUSS_blind stage (UN and MN joined, reconstruction back-propagated into
            the UN).
        optimizer: reuse an optimizer (e.g. to keep Adam moments across federated rounds); by default a
            fresh Adam over the trainable parameters.
        learning_rate: learning rate of a fresh optimizer (default: the stage's rate from ``config``).
        generator: torch generator for batch sampling (default: seeded from ``config.seed``).
        description: progress bar label.

    Returns:
        one dict of float losses per step.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = windows.padded.device
    if pixel_indices is None:
        pixel_indices = np.arange(windows.num_pixels)
    pixel_indices = torch.as_tensor(np.asarray(pixel_indices), dtype=torch.long, device=device)
    if pixel_indices.numel() == 0:
        raise ValueError("train_stage needs at least one pixel")
    targets = None
    if pseudo_targets is not None:
        targets = torch.as_tensor(np.asarray(pseudo_targets), dtype=windows.padded.dtype, device=device)
        if targets.shape[0] != pixel_indices.shape[0]:
            raise ValueError(
                f"pseudo_targets has {targets.shape[0]} rows for {pixel_indices.shape[0]} pixels"
            )
    pseudo_weight = config.blind_pseudo_weight if blind else config.pseudo_weight
    if targets is None and pseudo_weight > 0:
        raise ValueError(
            "pseudo_targets are required when the pseudo ground-truth loss has a non-zero weight"
        )
    if optimizer is None:
        parameters = [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("the model has no trainable parameters")
        rate = (
            learning_rate
            if learning_rate is not None
            else (config.blind_learning_rate if blind else config.learning_rate)
        )
        optimizer = torch.optim.Adam(parameters, lr=rate, weight_decay=config.weight_decay)
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(config.seed + (1 if blind else 0))
    scale = _data_scale(model)
    # A PEFT wrapper forwards attribute access to the GaussModel, so its (adapted) MN is reached the same way.
    mixing = model.mixing
    batch_size = min(config.batch_size, pixel_indices.shape[0])
    history: list[dict[str, float]] = []
    model.train()
    progress = tqdm(range(steps), desc=description, disable=not config.show_progress, leave=False)
    for _ in progress:
        batch = torch.randint(pixel_indices.shape[0], (batch_size,), generator=generator).to(device)
        indices = pixel_indices[batch]
        window_batch, centre_batch = windows(indices), windows.centres(indices)
        target_batch = targets[batch] if targets is not None else None
        if config.mixup_fraction > 0 and not blind:
            window_batch, centre_batch, target_batch = _mixup(
                window_batch, centre_batch, target_batch, config.mixup_fraction, generator
            )
        outputs = model(window_batch, detach_un_input=config.detach_un_input, detach_mn_input=not blind)
        losses = gauss_losses(
            outputs, centre_batch, target_batch, config, blind=blind, data_scale=scale, mixing=mixing
        )
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        if config.nonnegative_mixing and hasattr(model, "clamp_mixing_weights_"):
            model.clamp_mixing_weights_()
        record = {name: float(value.detach()) for name, value in losses.items()}
        history.append(record)
        progress.set_postfix(loss=f"{record['total']:.4g}", refresh=False)
    model.eval()
    return history


def _mixup(
    windows: torch.Tensor,
    centres: torch.Tensor,
    targets: torch.Tensor | None,
    fraction: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace the first ``fraction`` of a batch by convex mixtures of two batch members (same weight for
    windows, centres and pseudo targets: the linear mixing model maps mixed spectra to mixed abundances)."""
    count = int(round(fraction * windows.shape[0]))
    if count == 0:
        return windows, centres, targets
    partners = torch.randint(windows.shape[0], (count,), generator=generator).to(windows.device)
    weights = torch.rand(count, generator=generator).to(device=windows.device, dtype=windows.dtype)
    windows, centres = windows.clone(), centres.clone()
    windows[:count] = (
        weights[:, None, None] * windows[:count] + (1 - weights[:, None, None]) * windows[partners]
    )
    centres[:count] = weights[:, None] * centres[:count] + (1 - weights[:, None]) * centres[partners]
    if targets is not None:
        targets = targets.clone()
        targets[:count] = weights[:, None] * targets[:count] + (1 - weights[:, None]) * targets[partners]
    return windows, centres, targets


@torch.no_grad()
def predict(
    model: nn.Module, windows: PixelWindows, pixel_indices: np.ndarray | None = None, batch_size: int = 4096
) -> dict[str, np.ndarray]:
    """Abundances, approximations and reconstructions of the given pixels (default: all), as numpy arrays."""
    model.eval()
    if pixel_indices is None:
        pixel_indices = np.arange(windows.num_pixels)
    outputs: dict[str, list[np.ndarray]] = {"abundances": [], "approximation": [], "reconstruction": []}
    for start in range(0, len(pixel_indices), batch_size):
        batch = model(windows(pixel_indices[start : start + batch_size]))
        for key in outputs:
            outputs[key].append(batch[key].double().cpu().numpy())
    return {key: np.concatenate(value, axis=0) for key, value in outputs.items()}


@dataclass
class GaussResult:
    """Outcome of :func:`fit_gauss`.

    Attributes:
        model: the trained :class:`GaussModel`.
        endmembers: ``(bands, p)``, column k = ``MN(e_k)``.
        abundances: ``(rows, cols, p)`` from the UN on the AN's approximations.
        reconstruction: ``(rows, cols, bands)``, ``MN(abundances)``.
        approximation: ``(rows, cols, bands)``, the AN's output.
        pseudo_targets: ``(rows * cols, p)`` pseudo ground truth used in stage 1.
        history: per-stage lists of per-step losses; with early stopping also ``"blind_checks"``, the
            held-out reconstruction error at every check (``step``, ``error``, ``kept``).
        timings: seconds spent per phase.
        stage1: for ``gauss_blind``, the same model's ``endmembers``, ``abundances`` and ``reconstruction``
            after stage 1, which is exactly what ``gauss`` returns with the same data and settings (the two
            share the pseudo ground truth and stage 1); ``None`` otherwise.
    """

    model: nn.Module
    endmembers: np.ndarray
    abundances: np.ndarray
    reconstruction: np.ndarray
    approximation: np.ndarray
    pseudo_targets: np.ndarray
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stage1: dict[str, np.ndarray] | None = None


def fit_gauss(
    cube: np.ndarray,
    num_endmembers: int,
    variant: str = "gauss",
    model_config: GaussConfig | None = None,
    training_config: GaussTrainingConfig | None = None,
) -> GaussResult:
    """Train GAUSS, GAUSS_blind or GAUSS_prime on a cube ``(rows, cols, bands)`` and unmix it.

    - ``"gauss"``: stage 1 with one-hot k-means pseudo ground truth (k = p, or more clusters merged back to p);
    - ``"gauss_blind"``: the same stage 1, then ``blind_steps`` steps with UN and MN joined;
    - ``"gauss_prime"``: stage 1 with FCLSU abundances on VCA or N-FINDR endmembers as pseudo ground truth.

    Deterministic given ``training_config.seed`` (single-threaded CPU kernels aside).
    """
    if variant not in GAUSS_VARIANTS:
        raise ValueError(f"variant must be one of {GAUSS_VARIANTS}, got {variant!r}")
    cube = np.asarray(cube, dtype=np.float64)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (rows, cols, bands), got shape {cube.shape}")
    rows, cols, bands = cube.shape
    training_config = training_config or GaussTrainingConfig()
    model_config = model_config or GaussConfig(num_bands=bands, num_endmembers=num_endmembers)
    if model_config.num_bands != bands or model_config.num_endmembers != num_endmembers:
        raise ValueError(
            f"model_config is for {model_config.num_bands} bands and {model_config.num_endmembers} endmembers, "
            f"the data have {bands} bands and {num_endmembers} endmembers were asked for"
        )
    timings: dict[str, float] = {}
    pixels = cube.reshape(-1, bands)

    start = time.perf_counter()
    source = "kmeans" if variant != "gauss_prime" else f"{training_config.prime_extractor}_fclsu"
    targets = pseudo_ground_truth(
        pixels,
        num_endmembers,
        source=source,
        seed=training_config.seed,
        kmeans_features=training_config.kmeans_features,
        kmeans_restarts=training_config.kmeans_restarts,
        kmeans_clusters_per_endmember=training_config.kmeans_clusters_per_endmember,
    )
    timings["pseudo_ground_truth_s"] = time.perf_counter() - start

    torch.manual_seed(training_config.seed)
    # One global scale keeps the mixing linear (per-band standardisation would not).
    data_scale = float(np.max(np.abs(cube))) or 1.0
    model = GaussModel(model_config, data_scale=data_scale).to(training_config.device)
    windows = PixelWindows(cube, model_config.window_size, device=training_config.device)

    history: dict[str, list[dict[str, float]]] = {}
    start = time.perf_counter()
    history["stage1"] = train_stage(
        model,
        windows,
        training_config.stage1_steps,
        training_config,
        pseudo_targets=targets,
        blind=False,
        description=f"{variant} stage 1",
    )
    timings["stage1_s"] = time.perf_counter() - start
    stage1 = None
    if variant == "gauss_blind":
        start = time.perf_counter()
        stage1 = _read_out(model, windows, rows, cols)
        timings["stage1_read_out_s"] = time.perf_counter() - start
    if variant == "gauss_blind" and training_config.blind_steps > 0:
        start = time.perf_counter()
        frozen = list(model.mixing.parameters()) if training_config.blind_freeze_mixing else []
        with peft_bridge.parameters_frozen(frozen):
            if training_config.blind_holdout_fraction > 0:
                history["blind"], history["blind_checks"] = _blind_stage_stopped_early(
                    model, windows, pixels, targets, training_config, description=f"{variant} blind stage"
                )
            else:
                history["blind"] = train_stage(
                    model,
                    windows,
                    training_config.blind_steps,
                    training_config,
                    pseudo_targets=targets if training_config.blind_pseudo_weight > 0 else None,
                    blind=True,
                    description=f"{variant} blind stage",
                )
        timings["blind_s"] = time.perf_counter() - start

    final = _read_out(model, windows, rows, cols)
    return GaussResult(
        model=model,
        endmembers=final["endmembers"],
        abundances=final["abundances"],
        reconstruction=final["reconstruction"],
        approximation=final["approximation"],
        pseudo_targets=targets,
        history=history,
        timings=timings,
        stage1=stage1,
    )


def train_with_early_stopping(
    model: nn.Module,
    train_chunk: Callable[[int], list[dict[str, float]]],
    validation_error: Callable[[], float],
    steps: int,
    check_every: int,
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Train ``steps`` steps in chunks of ``check_every``, measuring ``validation_error`` before the first and
    after every chunk, and leave ``model`` with the parameters of the lowest error (the starting point
    included, so a stage that only hurts is undone).

    Returns the per-step history of ``train_chunk`` and the checks (``step``, ``error``, ``kept``).
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    best_error = float(validation_error())
    best_state = copy.deepcopy(model.state_dict())
    checks = [{"step": 0.0, "error": best_error}]
    history: list[dict[str, float]] = []
    while len(history) < steps:
        history.extend(train_chunk(min(check_every, steps - len(history))))
        error = float(validation_error())
        checks.append({"step": float(len(history)), "error": error})
        if error < best_error:
            best_error, best_state = error, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    for check in checks:
        check["kept"] = float(check["error"] == best_error)
    return history, checks


def _blind_stage_stopped_early(
    model: GaussModel,
    windows: PixelWindows,
    pixels: np.ndarray,
    targets: np.ndarray,
    config: GaussTrainingConfig,
    description: str,
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The blind stage on all pixels but a seeded held-out share, stopped where the held-out pixels'
    reconstruction error (scaled units) was lowest."""
    permutation = np.random.default_rng(config.seed).permutation(len(pixels))
    held_out_count = max(1, int(round(config.blind_holdout_fraction * len(pixels))))
    held_out, training = np.sort(permutation[:held_out_count]), np.sort(permutation[held_out_count:])
    scale = _data_scale(model)
    held_out_pixels = pixels[held_out] / scale
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.blind_learning_rate,
        weight_decay=config.weight_decay,
    )
    # One optimizer and one batch generator across the chunks: without the checks it is one uninterrupted stage.
    generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)

    def train_chunk(steps: int) -> list[dict[str, float]]:
        return train_stage(
            model,
            windows,
            steps,
            config,
            pixel_indices=training,
            pseudo_targets=targets[training] if config.blind_pseudo_weight > 0 else None,
            blind=True,
            optimizer=optimizer,
            generator=generator,
            description=description,
        )

    def held_out_error() -> float:
        reconstruction = predict(model, windows, held_out)["reconstruction"] / scale
        return float(np.mean((reconstruction - held_out_pixels) ** 2))

    return train_with_early_stopping(model, train_chunk, held_out_error, config.blind_steps, config.blind_check_every)


def _read_out(model: GaussModel, windows: PixelWindows, rows: int, cols: int) -> dict[str, np.ndarray]:
    """Endmembers ``MN(e_k)`` and the image's abundances, reconstruction and approximation, image-shaped."""
    outputs = predict(model, windows)
    with torch.no_grad():
        endmembers = model.endmembers().double().cpu().numpy()
    return {
        "endmembers": endmembers,
        **{key: value.reshape(rows, cols, -1) for key, value in outputs.items()},
    }
