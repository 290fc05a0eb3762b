"""GAUSS variants vs baselines on the Samson scene (or any Samson-like folder), with fixed seeds.

    python benchmarks/unmixing_samson.py --data /path/to/samson --output_dir benchmarks/results/unmixing
    python benchmarks/unmixing_samson.py --synthetic pure,nopure --seeds 0 \\
        --output_dir benchmarks/results/unmixing/synthetic

Writes, under ``--output_dir``: ``seed<N>/<entry>/results.json`` for every seed and entry (plus PNG plots
for the first seed's non-ablation entries, and their ``endmembers.npy`` and ``abundances.npy`` on a real
scene), ``summary.json`` with every number, ``summary.md`` with the table that ``docs/unmixing.md``
reports, and (with ``--data``) ``reference_check.json``: whether the reference endmembers are pixels of
the cube and the reference abundances FCLSU with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

try:
    import peft_fed  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_fed.unmixing.autoencoder import AutoencoderConfig  # noqa: E402
from peft_fed.unmixing.config import GaussConfig, GaussTrainingConfig  # noqa: E402
from peft_fed.unmixing.data import HyperspectralScene, load_scene  # noqa: E402
from peft_fed.unmixing.fclsu import fclsu  # noqa: E402
from peft_fed.unmixing.runner import run_method, save_result  # noqa: E402
from peft_fed.unmixing.synthetic import SyntheticSceneConfig, generate_scene  # noqa: E402

# A plain reading of the abstract, before our tuning on synthetic scenes: softmax at temperature 1, no
# mixup, an unpenalised non-linear MN without the non-negativity projection.
_PLAIN_MODEL = {"softmax_temperature": 1.0}
_PLAIN_TRAINING = {"mixup_fraction": 0.0, "mn_nonlinear_weight": 0.0, "nonnegative_mixing": False}

# (entry name, method, GaussConfig overrides, GaussTrainingConfig overrides, kmeans abundance mode).
# The first nine are the comparison; the "ablation_" entries each change one design choice of the defaults.
ENTRIES = (
    ("gauss", "gauss", {}, {}, None),
    ("gauss_blind", "gauss_blind", {}, {}, None),
    ("gauss_prime_vca", "gauss_prime", {}, {"prime_extractor": "vca"}, None),
    ("gauss_prime_nfindr", "gauss_prime", {}, {"prime_extractor": "nfindr"}, None),
    ("vca_fclsu", "vca_fclsu", {}, {}, None),
    ("nfindr_fclsu", "nfindr_fclsu", {}, {}, None),
    ("kmeans", "kmeans", {}, {}, "one_hot"),
    ("kmeans_fclsu", "kmeans", {}, {}, "fclsu"),
    ("autoencoder", "autoencoder", {}, {}, None),
    ("ablation_gauss_plain", "gauss", _PLAIN_MODEL, _PLAIN_TRAINING, None),
    ("ablation_gauss_blind_plain", "gauss_blind", _PLAIN_MODEL, _PLAIN_TRAINING, None),
    ("ablation_gauss_normalized_kmeans", "gauss", {}, {"kmeans_features": "normalized"}, None),
    ("ablation_gauss_blind_normalized_kmeans", "gauss_blind", {}, {"kmeans_features": "normalized"}, None),
    ("ablation_gauss_blind_linear_mn", "gauss_blind", {"mn_hidden_dims": ()}, {}, None),
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="Samson-like folder (Y_clean.mat, A_true.mat, E.mat)")
    parser.add_argument(
        "--synthetic",
        default=None,
        help="instead of --data, run on the generated development scenes: 'pure', 'nopure' or 'pure,nopure' "
        "(64 x 64, soil / vegetation / water, 40 dB, generator seed 0)",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--entries", default=",".join(e[0] for e in ENTRIES), help="comma-separated subset of the entries"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and for the BLAS/OpenMP pools (1 avoids oversubscribing a shared machine)",
    )
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument(
        "--reference_check_only",
        action="store_true",
        help="only write reference_check.json (how the scene's ground truth relates to its pixels)",
    )
    return parser.parse_args(argv)


def _stats(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "values": [float(v) for v in values],
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.entries.split(",")
    unknown = set(wanted) - {e[0] for e in ENTRIES}
    if unknown:
        print(f"unknown entries {sorted(unknown)}", file=sys.stderr)
        return 2
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    output_dir = Path(args.output_dir)
    if args.synthetic:
        # The scenes the defaults were chosen on (synthetic development set), for comparison.
        for purity in args.synthetic.split(","):
            if purity not in ("pure", "nopure"):
                print(f"--synthetic takes 'pure' and/or 'nopure', got {purity!r}", file=sys.stderr)
                return 2
            config = SyntheticSceneConfig(rows=64, cols=64, snr_db=40.0, pure_pixels=purity == "pure", seed=0)
            scene = generate_scene(config)
            _run_scene(
                scene, output_dir / f"synthetic_{purity}", seeds, wanted, args, command, config.to_dict()
            )
        return 0
    if args.data is None:
        print("--data is required (or --synthetic)", file=sys.stderr)
        return 2
    scene = load_scene(args.data)
    if scene.endmembers is None or scene.abundances is None:
        print(f"{args.data} has no ground truth (E.mat and A_true.mat are needed)", file=sys.stderr)
        return 2
    output_dir.mkdir(parents=True, exist_ok=True)
    check = _reference_check(scene)
    check["command"] = command
    with open(output_dir / "reference_check.json", "w") as handle:
        json.dump(check, handle, indent=2)
    print(json.dumps(check, indent=2))
    if args.reference_check_only:
        return 0
    _run_scene(scene, output_dir, seeds, wanted, args, command, str(args.data))
    return 0


def _reference_check(scene: HyperspectralScene) -> dict:
    """How the reference was built: is each reference endmember a pixel of the cube, and are the
    reference abundances FCLSU with the reference endmembers?"""
    pixels = scene.pixels
    nearest = []
    for k in range(scene.endmembers.shape[1]):
        distances = np.linalg.norm(pixels - scene.endmembers[:, k], axis=1)
        index = int(np.argmin(distances))
        nearest.append(
            {
                "endmember": k,
                "nearest_pixel_row_col": [index // scene.shape[1], index % scene.shape[1]],
                "distance": float(distances[index]),
                "relative_distance": float(distances[index] / np.linalg.norm(scene.endmembers[:, k])),
            }
        )
    fclsu_abundances = fclsu(pixels, scene.endmembers).reshape(scene.abundances.shape)
    difference = np.abs(fclsu_abundances - scene.abundances)
    return {
        "reference_endmember_nearest_pixels": nearest,
        "fclsu_with_reference_endmembers_vs_reference_abundances": {
            "max_abs_difference": float(difference.max()),
            "rmse": float(np.sqrt(np.mean(difference**2))),
        },
    }


def _run_scene(
    scene: HyperspectralScene,
    output_dir: Path,
    seeds: list[int],
    wanted: list[str],
    args: argparse.Namespace,
    command: str,
    data: str | dict,
) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    p = scene.num_reference_endmembers
    show_progress = not args.no_progress
    start_all = time.perf_counter()
    records: dict[str, list[dict]] = {}
    for seed in seeds:
        for name, method, model_overrides, training_overrides, kmeans_mode in ENTRIES:
            if name not in wanted:
                continue
            result = run_method(
                scene.cube,
                p,
                method,
                seed=seed,
                gauss_config=GaussConfig(num_bands=scene.num_bands, num_endmembers=p, **model_overrides),
                gauss_training=GaussTrainingConfig(show_progress=show_progress, **training_overrides),
                autoencoder_config=AutoencoderConfig(show_progress=show_progress),
                kmeans_abundances=kmeans_mode or "one_hot",
            )
            # Keep the results folder small: plots for the first seed's comparison entries, arrays only
            # for a real scene's; every run still writes its results.json.
            keep = seed == seeds[0] and not name.startswith("ablation_")
            content = save_result(
                result,
                scene,
                output_dir / f"seed{seed}" / name,
                extra={"entry": name, "data": data},
                plots=keep,
                arrays=keep and isinstance(data, str),
            )
            records.setdefault(name, []).append(content)
            print(
                f"{scene.name} seed {seed} {name:38s} SAD {content['sad_mean']:.4f} rad  "
                f"aRMSE {content['armse']:.4f}  recon RMSE {content['reconstruction_rmse']:.4f}  "
                f"{content['wall_time_s']:.1f} s",
                flush=True,
            )
    total = time.perf_counter() - start_all

    summary = {
        "command": command,
        "data": data,
        "scene": scene.name,
        "scene_shape": list(scene.shape),
        "seeds": seeds,
        "total_wall_time_s": total,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "blas_openmp_threads": args.threads,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "entries": {},
    }
    for name, contents in records.items():
        summary["entries"][name] = {
            "sad_mean": _stats([c["sad_mean"] for c in contents]),
            "sad_mean_degrees": _stats([c["sad_mean_degrees"] for c in contents]),
            "sad_per_endmember": [_stats([c["sad_per_endmember"][k] for c in contents]) for k in range(p)],
            "armse": _stats([c["armse"] for c in contents]),
            "reconstruction_rmse": _stats([c["reconstruction_rmse"] for c in contents]),
            "wall_time_s": _stats([c["wall_time_s"] for c in contents]),
        }
    with open(output_dir / "summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)

    lines = [
        f"Scene {scene.name} {tuple(scene.shape)}, seeds {seeds}; mean ± std over seeds "
        f"(SAD per endmember in reference order). Total wall time {total:.0f} s, "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s).",
        "",
        "| method | mean SAD (rad) | mean SAD (deg) | SAD per endmember (rad) | aRMSE | recon. RMSE | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["entries"].items():
        per = " / ".join(f"{e['mean']:.3f}" for e in entry["sad_per_endmember"])
        lines.append(
            f"| {name} | {entry['sad_mean']['mean']:.4f} ± {entry['sad_mean']['std']:.4f} | "
            f"{entry['sad_mean_degrees']['mean']:.2f} | {per} | "
            f"{entry['armse']['mean']:.4f} ± {entry['armse']['std']:.4f} | "
            f"{entry['reconstruction_rmse']['mean']:.4f} | {entry['wall_time_s']['mean']:.1f} |"
        )
    (output_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
