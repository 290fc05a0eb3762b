"""Convergence plots of one or more federated runs (reads their ``metrics.jsonl``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("train_loss", "train loss (clients' mean)"),
    ("eval_loss", "eval loss (global model)"),
    ("eval_accuracy", "eval accuracy (global model)"),
    ("inter_round_loss_jump", "inter-round loss jump"),
    ("basis_overlap", "basis overlap"),
    ("cancellation_ratio", "cancellation ratio"),
)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (or of the file itself when given a file)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: is this the output_dir of a peft-fed run?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(
    runs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    panels: Sequence[tuple[str, str]] = PANELS,
    title: str | None = None,
) -> Path:
    """Draw one panel per metric, one line per run, and save a PNG; returns its path.

    Example:
        >>> plot_runs(["runs/fedit", "runs/fedsmoothlora"], "convergence.png")  # doctest: +SKIP
    """
    if not runs:
        raise ValueError("plot_runs needs at least one run directory")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    histories = [read_metrics(run) for run in runs]
    labels = list(labels) if labels is not None else [
        f"{h[0]['method']} ({Path(r).name})" if h else Path(r).name for h, r in zip(histories, runs, strict=True)
    ]
    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (key, name) in zip(axes.flat, panels, strict=False):
        for history, label in zip(histories, labels, strict=True):
            points = [(row["round"], row[key]) for row in history if row.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
