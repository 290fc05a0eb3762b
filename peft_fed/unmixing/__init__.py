"""Hyperspectral unmixing with GAUSS and the baselines it is compared with.

GAUSS (arXiv:2204.07713): an approximation network (AN) turns each pixel's k x k neighbourhood into an
approximated centre spectrum, an unmixing network (UN) maps it to softmax abundances guided by a pseudo
ground truth (one-hot k-means labels), and a mixing network (MN) maps abundances back to the spectrum;
endmember k is ``MN(e_k)``. Variants: ``gauss`` (guided stage only), ``gauss_blind`` (then UN and MN
trained jointly on the reconstruction) and ``gauss_prime`` (FCLSU abundances on VCA/N-FINDR endmembers as
pseudo ground truth). Baselines: VCA, N-FINDR, FCLSU, k-means, a linear-decoder autoencoder and a
MiSiCNet-style spatial convolutional autoencoder (:mod:`.spatial_autoencoder`).

Everything here is plain numpy / scipy / scikit-learn / torch; the networks use ``nn.Linear`` layers with
stable names so PEFT's LoRA can adapt them, and :func:`train_stage` trains any such (wrapped) model on a
given set of pixels for a given number of steps. :mod:`.federated` adapts a trained GAUSS model to another
scene with LoRA: federated over clients holding tiles of it (any method of ``peft_fed.strategies``),
local-only, or centralised.
"""

from .autoencoder import AutoencoderConfig, LinearUnmixingAutoencoder, fit_autoencoder
from .baselines import kmeans_clustering, kmeans_unmixing, merge_clusters_by_angle, nfindr_fclsu, vca_fclsu
from .config import GaussConfig, GaussTrainingConfig
from .data import HyperspectralScene, load_array, load_cube, load_scene, load_scene_folder
from .extraction import estimate_snr_db, nfindr, vca
from .fclsu import fclsu, project_to_simplex
from .federated import (
    DEFAULT_RANK_PATTERN,
    DEFAULT_TARGET_MODULES,
    AdaptationResult,
    FederatedUnmixingConfig,
    adapt_gauss_model,
    evaluate_gauss_model,
    run_centralised,
    run_federated_unmixing,
    run_local_only,
)
from .metrics import (
    UnmixingMetrics,
    abundance_rmse,
    evaluate_unmixing,
    match_endmembers,
    reconstruction_rmse,
    spectral_angle,
    spectral_angle_matrix,
)
from .model import ApproximationNetwork, GaussModel, MixingNetwork, UnmixingNetwork
from .patches import PixelWindows, tile_pixel_indices
from .runner import METHODS, UnmixingResult, run_method, save_result
from .spatial_autoencoder import (
    MinimumSimplexConvAutoencoder,
    SpatialAutoencoderConfig,
    fit_spatial_autoencoder,
)
from .synthetic import SyntheticSceneConfig, generate_scene, load_material_spectrum
from .train import (
    GAUSS_VARIANTS,
    GaussResult,
    fit_gauss,
    gauss_losses,
    predict,
    pseudo_ground_truth,
    train_stage,
)

__all__ = [
    "DEFAULT_RANK_PATTERN",
    "DEFAULT_TARGET_MODULES",
    "GAUSS_VARIANTS",
    "METHODS",
    "AdaptationResult",
    "ApproximationNetwork",
    "AutoencoderConfig",
    "FederatedUnmixingConfig",
    "GaussConfig",
    "GaussModel",
    "GaussResult",
    "GaussTrainingConfig",
    "HyperspectralScene",
    "LinearUnmixingAutoencoder",
    "MinimumSimplexConvAutoencoder",
    "MixingNetwork",
    "PixelWindows",
    "SpatialAutoencoderConfig",
    "SyntheticSceneConfig",
    "UnmixingMetrics",
    "UnmixingNetwork",
    "UnmixingResult",
    "abundance_rmse",
    "adapt_gauss_model",
    "estimate_snr_db",
    "evaluate_gauss_model",
    "evaluate_unmixing",
    "fclsu",
    "fit_autoencoder",
    "fit_gauss",
    "fit_spatial_autoencoder",
    "gauss_losses",
    "generate_scene",
    "kmeans_clustering",
    "kmeans_unmixing",
    "load_array",
    "load_cube",
    "load_material_spectrum",
    "load_scene",
    "load_scene_folder",
    "match_endmembers",
    "merge_clusters_by_angle",
    "nfindr",
    "nfindr_fclsu",
    "predict",
    "project_to_simplex",
    "pseudo_ground_truth",
    "reconstruction_rmse",
    "run_centralised",
    "run_federated_unmixing",
    "run_local_only",
    "run_method",
    "save_result",
    "spectral_angle",
    "spectral_angle_matrix",
    "tile_pixel_indices",
    "train_stage",
    "vca",
    "vca_fclsu",
]
