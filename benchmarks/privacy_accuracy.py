"""Utility cost of client-level DP: final accuracy against epsilon for DP-FedIT and DP-FFA-LoRA.

The setting is ``federated_grid.py``'s ``minilm`` preset (all-MiniLM-L6-v2, WordNet multiple choice, 10 clients,
3 per round, Dirichlet alpha 0.3), with the rounds and evaluation given here. Each method runs at these privacy
levels:

* ``none``: the method itself (sample-count weighted, no clipping, no noise);
* ``clip``: the DP aggregation without noise (unweighted mean of clipped updates, z = 0): the cost of clipping alone;
* ``eps=E``: ``dp_target_epsilon = E`` (z calibrated to spend exactly E over the planned rounds).

::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/privacy_accuracy.py --num_rounds 10 --seeds 42 43 \\
        --levels none clip eps=8 eps=1 --output_dir benchmarks/results/privacy

Runs go to ``--runs_dir`` (default ``runs/benchmarks/privacy``); finished runs are skipped, so an interrupted grid
resumes. ``--summarize_only`` rewrites ``summary.json``, ``summary.md`` and ``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated_grid import PRESETS, _complete, _mean_sd  # noqa: E402  (the shared benchmark settings and helpers)

CHANCE_ACCURACY = 0.25  # WordNet multiple choice has 4 options


def level_settings(level: str, clip: float) -> dict[str, Any]:
    """The ``dp_*`` run settings of a privacy level (``none``, ``clip``, ``eps=E``)."""
    if level == "none":
        return {}
    if level == "clip":
        return {"dp_clip": clip, "dp_noise_multiplier": 0.0}
    if level.startswith("eps="):
        return {"dp_clip": clip, "dp_target_epsilon": float(level.removeprefix("eps="))}
    raise ValueError(f"unknown privacy level {level!r}: none, clip or eps=E")


def run_dir(root: Path, method: str, level: str, seed: int) -> Path:
    return root / method / level / f"seed-{seed}"


def run_grid(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    from peft_fed.runtime.pipeline import FederatedRunConfig, run_federated

    root = Path(args.runs_dir)
    jobs = [(s, m, lv) for s in args.seeds for m in args.methods for lv in args.levels]
    for position, (seed, method, level) in enumerate(jobs):
        out = run_dir(root, method, level, seed)
        if _complete(out, settings["num_rounds"]):
            continue
        config = FederatedRunConfig.from_dict({
            **settings, **level_settings(level, args.clip), "method": method, "partition": "dirichlet",
            "dirichlet_alpha": args.alpha, "seed": seed, "output_dir": str(out), "export_rank": settings["r"],
            "overwrite_output_dir": True,
        })  # fmt: skip
        started = time.perf_counter()
        print(f"[{position + 1}/{len(jobs)}] {method} {level} seed={seed}", flush=True)
        run_federated(config)
        print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)


def summarize(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    from peft_fed.plotting import read_metrics

    root = Path(args.runs_dir)
    rows = []
    for method in args.methods:
        for level in args.levels:
            runs = [
                read_metrics(run_dir(root, method, level, seed))
                for seed in args.seeds
                if _complete(run_dir(root, method, level, seed), settings["num_rounds"])
            ]
            if not runs:
                continue
            last = [history[-1] for history in runs]
            rows.append({
                "method": method, "level": level, "seeds": len(runs),
                "final_accuracy": _mean_sd([row["eval_accuracy"] for row in last]),
                "epsilon": last[0].get("dp_epsilon"),
                "delta": last[0].get("dp_delta"),
                "noise_multiplier": last[0].get("dp_noise_multiplier"),
                "clipped_fraction": _mean_sd([
                    sum(r["dp_clipped_clients"] for r in h) / sum(len(r["clients"]) for r in h) for h in runs
                    if "dp_clipped_clients" in h[-1]
                ]),
                "median_update_norm": _mean_sd([
                    statistics.median(r["dp_median_update_norm"] for r in h) for h in runs
                    if "dp_median_update_norm" in h[-1]
                ]),
                "seconds_per_run": _mean_sd([
                    sum(r.get("round_local_wall_seconds", 0) + r.get("aggregation_seconds", 0) for r in h) for h in runs
                ]),
            })  # fmt: skip
    if args.reference_summary:
        rows = _reference_rows(Path(args.reference_summary), args, settings["num_rounds"]) + rows
    summary = {"settings": settings, "clip": args.clip, "alpha": args.alpha, "seeds": args.seeds, "rows": rows}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(_markdown(summary))
    _plot(summary, out / "accuracy_vs_epsilon.png")
    return summary


def _reference_rows(path: Path, args: argparse.Namespace, num_rounds: int) -> list[dict[str, Any]]:
    """No-DP rows read from ``federated_grid.py``'s summary of the same preset: each seed's accuracy at round
    ``num_rounds`` of its evaluated curve (the runs are deterministic, so this is what a ``none`` run here gives)."""
    variants = json.loads(path.read_text())["alphas"][f"{args.alpha:g}"]["variants"]
    rows = []
    for method in args.methods:
        accuracies = [
            accuracy for run in variants.get(method, {}).get("runs", []) if run["seed"] in args.seeds
            for round_number, accuracy in run["curve"] if round_number == num_rounds
        ]  # fmt: skip
        if accuracies:
            rows.append({
                "method": method, "level": "none", "seeds": len(accuracies), "final_accuracy": _mean_sd(accuracies),
                "epsilon": None, "delta": None, "noise_multiplier": None, "source": str(path),
                "clipped_fraction": _mean_sd([]), "median_update_norm": _mean_sd([]), "seconds_per_run": _mean_sd([]),
            })  # fmt: skip
    return rows


def _cell(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    lines = [
        f"{s['model']}, {s['dataset']}, {s['num_clients']} clients ({s['clients_per_round']} per round, Dirichlet "
        f"alpha {summary['alpha']}), {s['num_rounds']} rounds, {s['local_steps']} local steps of batch "
        f"{s['per_device_train_batch_size']}, clip {summary['clip']}; seeds {summary['seeds']}.",
        "",
        "| method | privacy | seeds | final accuracy | epsilon | delta | z | clipped updates | median update norm | train s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        level = row["level"] + (f" (from {row['source']})" if "source" in row else "")
        epsilon = "-" if row["level"] == "none" else ("inf" if row["epsilon"] is None else f"{row['epsilon']:.3g}")
        lines.append(
            f"| {row['method']} | {level} | {row['seeds']} | {_cell(row['final_accuracy'])} | {epsilon} | "
            f"{_number(row['delta'])} | {_number(row['noise_multiplier'])} | "
            f"{_cell(row['clipped_fraction'], 2)} | {_cell(row['median_update_norm'], 3)} | "
            f"{_cell(row['seconds_per_run'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in dict.fromkeys(row["method"] for row in summary["rows"]):
        rows = [r for r in summary["rows"] if r["method"] == method and r["final_accuracy"]["mean"] is not None]
        private = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["epsilon"])
        line = ax.errorbar(
            [r["epsilon"] for r in private], [r["final_accuracy"]["mean"] for r in private],
            yerr=[r["final_accuracy"]["sd"] for r in private], marker="o", capsize=3, label=f"DP-{method}",
        )  # fmt: skip
        for row in rows:
            if row["level"] in ("none", "clip"):
                style = "-" if row["level"] == "none" else ":"
                ax.axhline(row["final_accuracy"]["mean"], color=line[0].get_color(), linestyle=style, linewidth=1,
                           label=f"{method} ({'no DP' if row['level'] == 'none' else 'clip only, z=0'})")  # fmt: skip
    ax.axhline(CHANCE_ACCURACY, color="grey", linestyle="--", linewidth=1, label="chance (4-way)")
    if any(row["epsilon"] is not None for row in summary["rows"]):  # (a grid of clip-only runs has no epsilon axis)
        ax.set_xscale("log")
    s = summary["settings"]
    ax.set_title(f"{s['num_clients']} clients, {s['clients_per_round']} per round, {s['num_rounds']} rounds, "
                 f"C = {summary['clip']:g}, {len(summary['seeds'])} seeds", fontsize=9)  # fmt: skip
    ax.set_xlabel("epsilon after the run")
    ax.set_ylabel("final eval accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["fedit", "ffa_lora"])
    parser.add_argument("--levels", nargs="+", default=["none", "clip", "eps=8", "eps=1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--num_rounds", type=int, default=PRESETS["minilm"]["num_rounds"])
    parser.add_argument("--eval_every", type=int, default=0, help="0: evaluate the final model only")
    parser.add_argument("--clip", type=float, default=1.0, help="dp_clip of every private level")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--runs_dir", default="runs/benchmarks/privacy")
    parser.add_argument("--output_dir", default="benchmarks/results/privacy")
    parser.add_argument("--summarize_only", action="store_true")
    parser.add_argument(
        "--reference_summary", default=None,
        help="federated_grid.py summary.json of the same preset: its runs' accuracy at --num_rounds is the no-DP row",
    )  # fmt: skip
    args = parser.parse_args()
    settings = dict(PRESETS["minilm"], num_rounds=args.num_rounds, eval_every=args.eval_every)
    if not args.summarize_only:
        run_grid(args, settings)
    summary = summarize(args, settings)
    print(_markdown(summary))


if __name__ == "__main__":
    main()
