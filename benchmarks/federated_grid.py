"""Quality benchmark: every federated method x seeds x Dirichlet alphas on one real model and task.

Runs the grid with one shared setting (no per-method tuning), resumably, then writes
``OUTPUT/summary.json``, ``OUTPUT/summary.md`` and one figure per claim of the papers:

* ``fedsmoothlora_claims_alpha*.png``: FedSmoothLoRA's accuracy curve, rounds to target and inter-round loss jump
  against FedIT's and FRLoRA's;
* ``subspace_reg_overlap_alpha*.png``: basis overlap of every method, Subspace-Reg against its own
  ``mu = beta = lam = 0`` ablation (the orthonormal-B factorisation alone) and the baselines;
* ``accuracy_curves_alpha*.png``: mean eval accuracy per round of every method.

Encoder grid of issue 4 (all-MiniLM-L6-v2, WordNet multiple choice)::

    python benchmarks/federated_grid.py --output_dir benchmarks/results/encoder_wordnet_mc
    python benchmarks/federated_grid.py --preset minilm_topic --output_dir benchmarks/results/encoder_wordnet_topic

Causal LM (SmolLM2-135M scoring endings by length-normalised log-likelihood; docs/results.md ran its 18 runs
as one process each, ``--shard I/18``, on one 80 GB GPU: 12 at a time fit, 18 at once ran out of memory)::

    python benchmarks/federated_grid.py --preset smollm2 --alphas 0.3 --output_dir benchmarks/results/causal_wordnet_mc

The papers' own regimes (issue 14), each method in the form its official code uses (``--partition iid`` puts
every client on an IID share; ``--alphas`` is then not used)::

    # FedSmoothLoRA with the cosine zeta schedule on non-IID data, against FedIT and FRLoRA
    python benchmarks/federated_grid.py --output_dir benchmarks/results/papers_regimes/fedsmoothlora_noniid \
        --variants fedsmoothlora_paper_cosine fedit frlora --alphas 0.3
    # FedSmoothLoRA with zeta = 1 constant on an IID partition, against FedIT and FRLoRA
    python benchmarks/federated_grid.py --output_dir benchmarks/results/papers_regimes/fedsmoothlora_iid \
        --variants fedsmoothlora_paper_constant fedit frlora --partition iid
    # Subspace-Reg's published comparison at batch 1 x gradient accumulation 8
    python benchmarks/federated_grid.py --output_dir benchmarks/results/papers_regimes/subspace_reg_published \
        --variants fedit flexlora fedsvd subspace_reg_published --alphas 0.3 \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 8

Runs (metrics, final adapters) go to ``--runs_dir`` (default ``runs/benchmarks/PRESET``, not committed).
Split a grid over processes with ``--shard 0/2`` and ``--shard 1/2`` (same output folder), or start several
processes over the same jobs (e.g. ``--seeds 44 43 42`` beside ``--seeds 42 43 44``): a run another process has
claimed (``RUN/.grid-claim``) is skipped. Finished runs
(a ``metrics.jsonl`` with every round) are skipped, so an interrupted grid resumes where it stopped.
``--summarize_only`` re-reads the runs and rewrites the summary and figures.

``--stored_summary PATH --stored_variants fedit frlora`` adds runs of an earlier grid's ``summary.json`` (same
preset, partition and seeds, so the same client data and sampling) to the comparison instead of running them
again, cut to this grid's ``--num_rounds`` (their curves and per-round jumps; their other means cover all their
rounds and are left out). This is only sound where nothing in those runs depends on the run's length (a
constant learning rate, no schedule over rounds) and the code has not changed their results; check one run's
first evaluations against a fresh run before relying on it.

Loss jump: for each client that trains again, its first-step loss minus its last-step loss of its previous
round (one batch each); "local progress" is the mean first-step minus last-step loss within a round, and
"abs. jump / progress" relates the two as the ratio of their seed means (a method whose clients barely learn
also barely jumps); it is n/a where the seed-mean progress is not above zero by more than its standard error.

Rounds to target: the first evaluated round at which a run's accuracy reaches 95 % of the best final
accuracy of any method on the same seed and alpha (same partition and client sampling); runs that never reach
it count as "not reached" and are left out of the mean. The dotted line in the curves is 95 % of the best
seed-mean final accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

# name -> (method, hyperparameters): every method of the library, plus Subspace-Reg's regulariser ablation.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedit": ("fedit", {}),
    "ffa_lora": ("ffa_lora", {}),
    "fedsa_lora": ("fedsa_lora", {}),
    "flora": ("flora", {}),
    "fedex_lora": ("fedex_lora", {}),
    "flexlora": ("flexlora", {}),
    "fedsvd": ("fedsvd", {}),
    "frlora": ("frlora", {}),
    "fedsmoothlora": ("fedsmoothlora", {}),
    "subspace_reg": ("subspace_reg", {}),
    "subspace_reg_no_reg": ("subspace_reg", {"mu": 0.0, "beta": 0.0, "lam": 0.0}),
    # The official code's forms (docs/methods.md): FedSmoothLoRA's image-classification code (a classifier here
    # too) splits SVDs as U sqrt(S) / sqrt(S) V^T and estimates a small client's gradient from the batches it
    # has; zeta decays from 1 to 0 on non-IID data and stays 1 on IID data. Subspace-Reg's server puts sqrt(c)
    # on both factors.
    "fedsmoothlora_paper_cosine": ("fedsmoothlora", {
        "zeta": 1.0, "zeta_schedule": "cosine", "zeta_min": 0.0, "svd_factor_split": "balanced",
        "small_client_gradient_batches": "available"}),
    "fedsmoothlora_paper_constant": ("fedsmoothlora", {
        "zeta": 1.0, "zeta_schedule": "constant", "svd_factor_split": "balanced",
        "small_client_gradient_batches": "available"}),
    "subspace_reg_published": ("subspace_reg", {"restore_norm_into": "both"}),
}  # fmt: skip

# One shared setting per model (no per-method tuning). local_steps=4 with batch 8 is the published
# Subspace-Reg budget (about 4 optimizer steps of 8 examples per client per round).
PRESETS: dict[str, dict[str, Any]] = {
    "minilm": dict(
        model="all-MiniLM-L6-v2", dataset="wordnet_mc", task_type="mc_encoder", num_clients=10,
        clients_per_round=3, num_rounds=20, local_steps=4, per_device_train_batch_size=8, r=8, lora_alpha=16,
        lora_dropout=0.05, learning_rate=1e-3, max_length=48, max_eval_samples=200, eval_every=1,
    ),
    "smollm2": dict(
        model="SmolLM2-135M-Instruct", dataset="wordnet_mc", task_type="mc_causal", num_clients=10,
        clients_per_round=3, num_rounds=20, local_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        r=8, lora_alpha=16, lora_dropout=0.05, learning_rate=5e-4, max_length=64, max_eval_samples=120,
        eval_every=1,
    ),
}  # fmt: skip
# The second encoder task (gloss -> one of 10 lexicographer categories, Dirichlet skew over the label)
# in the same setting as the multiple-choice one.
PRESETS["minilm_topic"] = dict(PRESETS["minilm"], dataset="wordnet_topic", task_type="seq_cls")
CAUSAL_VARIANTS = ["fedit", "flexlora", "fedsvd", "subspace_reg", "frlora", "fedsmoothlora"]
# Subspace-Reg's published clipping thresholds per model family (keyed by the presets' model).
CLIP_NORM = {"all-MiniLM-L6-v2": 15.0, "SmolLM2-135M-Instruct": 25.0}


def partition_label(alpha: float | None) -> str:
    """How a partition is named in run folders and summaries: the Dirichlet alpha, or "iid" (``None``)."""
    return "iid" if alpha is None else f"{alpha:g}"


def run_dir(root: Path, alpha: float | None, variant: str, seed: int) -> Path:
    folder = "iid" if alpha is None else f"alpha-{alpha:g}"
    return root / folder / variant / f"seed-{seed}"


def partition_alphas(args: argparse.Namespace) -> list[float | None]:
    """The grid's partitions: one Dirichlet alpha each, or the single IID partition (``None``)."""
    return [None] if args.partition == "iid" else list(args.alphas)


def _complete(path: Path, num_rounds: int) -> bool:
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        return False
    return sum(1 for line in metrics.read_text().splitlines() if line.strip()) >= num_rounds


def run_grid(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    from peft_fed.runtime.pipeline import FederatedRunConfig, run_federated

    root = Path(args.runs_dir)
    # seeds outermost: a grid stopped early still has every method at the first seeds
    jobs = [(a, v, s) for a in partition_alphas(args) for s in args.seeds for v in args.variants]
    index, count = args.shard
    for position, (alpha, variant, seed) in enumerate(jobs):
        if position % count != index:
            continue
        out = run_dir(root, alpha, variant, seed)
        if _complete(out, settings["num_rounds"]):
            continue
        claim = _claim(out)
        if claim is None:
            print(f"[{position + 1}/{len(jobs)}] {out} is being run by another process: skipped", flush=True)
            continue
        method, kwargs = VARIANTS[variant]
        kwargs = dict(kwargs)
        if method == "subspace_reg":
            kwargs.setdefault("clip_norm", CLIP_NORM[settings["model"]])
        # flat settings, as in a YAML run file: the method's hyperparameters are top-level keys
        partition = {"partition": "iid"} if alpha is None else {"partition": "dirichlet", "dirichlet_alpha": alpha}
        config = FederatedRunConfig.from_dict({
            **settings, **kwargs, **partition, "method": method, "seed": seed, "output_dir": str(out),
            "export_rank": settings["r"],
        })  # fmt: skip
        started = time.perf_counter()
        print(f"[{position + 1}/{len(jobs)}] partition={partition_label(alpha)} {variant} seed={seed}", flush=True)
        run_federated(config)
        claim.unlink()
        print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)


def _claim(out: Path) -> Path | None:
    """Mark ``out`` as taken by this process (so that grids started side by side over the same jobs, in any order
    or sharding, never run one twice), or ``None`` when another process holds it. A claim left by a run that died
    stays: remove ``out/.grid-claim`` to run it again."""
    out.mkdir(parents=True, exist_ok=True)
    claim = out / ".grid-claim"
    try:
        with claim.open("x") as handle:
            handle.write(f"{os.getpid()}\n")
    except FileExistsError:
        return None
    return claim


def _mean_sd(values: list[float | None]) -> dict[str, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


# The cancellation ratio and cosines per round, as the mean over layers and on the flattened whole-model update
# (the papers' form; peft_fed/diagnostics.py); a run's value is its mean over rounds.
DIAGNOSTIC_FORMS = (
    "cancellation_ratio", "whole_model_cancellation_ratio", "client_global_cosine",
    "whole_model_client_global_cosine", "pairwise_cosine", "whole_model_pairwise_cosine",
)  # fmt: skip


def _partition_title(label: str) -> str:
    return "IID partition" if label == "iid" else f"Dirichlet alpha = {label}"


def _figure_tag(label: str) -> str:
    return "iid" if label == "iid" else f"alpha{label}"


def _rounds_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((round_number for round_number, acc in curve if acc >= target), None)


def stored_runs(
    summary_path: Path, alpha: float | None, variant: str, seeds: list[int], num_rounds: int
) -> list[dict[str, Any]]:
    """The runs of ``variant`` in an earlier grid's summary, cut to the first ``num_rounds`` rounds."""
    stored = json.loads(Path(summary_path).read_text())
    block = stored["alphas"].get(partition_label(alpha), {}).get("variants", {}).get(variant)
    if block is None:
        raise ValueError(f"{summary_path} has no runs of {variant!r} at partition {partition_label(alpha)}")
    runs = []
    for run in block["runs"]:
        if run["seed"] not in seeds:
            continue
        curve = [(round_number, acc) for round_number, acc in run["curve"] if round_number <= num_rounds]
        accuracies = [acc for _, acc in curve]
        runs.append({
            "seed": run["seed"], "curve": curve, "abs_jump_curve": run["abs_jump_curve"][:num_rounds],
            "best_accuracy": max(accuracies), "final_accuracy": accuracies[-1],
            # means over all the stored rounds: not comparable with a shorter grid
            "final_eval_loss": None, "basis_overlap": None, "mean_loss_jump": None, "mean_abs_loss_jump": None,
            "local_progress": None, "uplink_bytes_per_round": run["uplink_bytes_per_round"],
            "downlink_bytes_per_round": run["downlink_bytes_per_round"], "seconds_per_round": None,
            **{key: None for key in DIAGNOSTIC_FORMS},
        })  # fmt: skip
    return runs


def _round_mean_abs_jump(run: dict[str, Any]) -> float | None:
    """Mean over rounds of each round's mean |inter-round loss jump| (the per-round values a stored run keeps)."""
    values = [v for v in run["abs_jump_curve"] if v is not None]
    return statistics.mean(values) if values else None


def summarize(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    from peft_fed.cli import summarize_run
    from peft_fed.engine.rounds import inter_round_loss_jumps
    from peft_fed.plotting import read_metrics

    root = Path(args.runs_dir)
    summary: dict[str, Any] = {"settings": settings, "preset": args.preset, "alphas": {}}
    for alpha in partition_alphas(args):
        per_variant: dict[str, dict[str, Any]] = {}
        for variant in args.variants:
            runs = []
            for seed in args.seeds:
                path = run_dir(root, alpha, variant, seed)
                if not _complete(path, settings["num_rounds"]):
                    continue
                # a run stopped after more rounds than the grid's is summarised over the grid's rounds
                history = read_metrics(path)[: settings["num_rounds"]]
                run = summarize_run(history)
                run["seed"] = seed
                run["curve"] = [
                    (r["round"], r["eval_accuracy"]) for r in history if r.get("eval_accuracy") is not None
                ]
                # each round's mean |jump|, recomputed from the client losses as summarize_run does
                run["abs_jump_curve"] = [
                    statistics.mean(abs(j) for j in jumps) if jumps else None
                    for jumps in (inter_round_loss_jumps(history[:i], row) for i, row in enumerate(history))
                ]
                # A method whose clients barely learn also barely jumps: relate the jump to the loss a client
                # gains within its round (first-step minus last-step loss, one batch each).
                progress = [
                    r["client_loss_first"][c] - r["client_loss_last"][c]
                    for r in history
                    for c in r["client_loss_first"]
                    if math.isfinite(r["client_loss_first"][c]) and math.isfinite(r["client_loss_last"][c])
                ]
                run["local_progress"] = statistics.mean(progress) if progress else None
                for key in DIAGNOSTIC_FORMS:
                    values = [r[key] for r in history if r.get(key) is not None and not math.isnan(r[key])]
                    run[key] = statistics.mean(values) if values else None
                runs.append(run)
            if runs:
                per_variant[variant] = {"runs": runs, "source": "run by this grid"}
        for variant in args.stored_variants or []:
            if variant in per_variant:
                raise ValueError(f"{variant!r} is both run by this grid and taken from --stored_summary")
            runs = stored_runs(args.stored_summary, alpha, variant, args.seeds, settings["num_rounds"])
            if runs:
                per_variant[variant] = {"runs": runs, "source": f"stored: {args.stored_summary}"}
        if not per_variant:
            continue
        target = 0.95 * max(
            statistics.mean(r["final_accuracy"] for r in v["runs"]) for v in per_variant.values()
        )
        # Per seed: every method sees the same partition and client sampling, but seeds differ in difficulty
        # (a hard seed would keep every method below a target set by the seed mean).
        seed_targets = {
            seed: 0.95
            * max(r["final_accuracy"] for v in per_variant.values() for r in v["runs"] if r["seed"] == seed)
            for seed in {r["seed"] for v in per_variant.values() for r in v["runs"]}
        }
        for entry in per_variant.values():
            runs = entry["runs"]
            for run in runs:
                run["target_accuracy"] = seed_targets[run["seed"]]
                run["rounds_to_target"] = _rounds_to(run["curve"], seed_targets[run["seed"]])
            reached = [r["rounds_to_target"] for r in runs if r["rounds_to_target"] is not None]
            for run in runs:
                run["round_mean_abs_jump"] = _round_mean_abs_jump(run)
            entry.update(
                seeds=[r["seed"] for r in runs],
                best_accuracy=_mean_sd([r["best_accuracy"] for r in runs]),
                final_accuracy=_mean_sd([r["final_accuracy"] for r in runs]),
                final_eval_loss=_mean_sd([r["final_eval_loss"] for r in runs]),
                basis_overlap=_mean_sd([r["basis_overlap"] for r in runs]),
                mean_loss_jump=_mean_sd([r["mean_loss_jump"] for r in runs]),
                mean_abs_loss_jump=_mean_sd([r["mean_abs_loss_jump"] for r in runs]),
                local_progress=_mean_sd([r["local_progress"] for r in runs]),
                rounds_to_target=_mean_sd(reached),
                reached_target=f"{len(reached)}/{len(runs)}",
                uplink_bytes_per_round=_mean_sd([r["uplink_bytes_per_round"] for r in runs]),
                downlink_bytes_per_round=_mean_sd([r["downlink_bytes_per_round"] for r in runs]),
                seconds_per_round=_mean_sd([r["seconds_per_round"] for r in runs]),
                round_mean_abs_jump=_mean_sd([r["round_mean_abs_jump"] for r in runs]),
                **{key: _mean_sd([r[key] for r in runs]) for key in DIAGNOSTIC_FORMS},
            )
            # ratio of the seed means: one seed with almost no local progress would blow up a mean of ratios;
            # clients that end their rounds no better than they began have no progress to relate the jump to
            entry["relative_abs_jump"] = {
                "mean": _jump_over_progress(entry["mean_abs_loss_jump"], entry["local_progress"]),
                "sd": 0.0,
                "n": len(runs),
            }
        summary["alphas"][partition_label(alpha)] = {
            "target_accuracy": target,
            "seed_targets": {str(k): v for k, v in sorted(seed_targets.items())},
            "variants": per_variant,
        }
    return summary


def _jump_over_progress(jump: dict[str, Any], progress: dict[str, Any]) -> float | None:
    """|jump| / local progress, or None where the progress is not told apart from zero.

    Over several seeds the progress must exceed its standard error (sd / sqrt(n)): with a few examples per
    batch (the causal preset's 4 questions) the first- and last-step losses are single noisy mini-batches,
    and a seed mean of 0.009 +- 0.042 would turn into a ratio of 35 that measures nothing.
    """
    if jump["mean"] is None or progress["mean"] is None or progress["mean"] <= 0:
        return None
    if progress["n"] > 1 and progress["mean"] <= progress["sd"] / math.sqrt(progress["n"]):
        return None
    return jump["mean"] / progress["mean"]


def _cell(stat: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f}"


def _forms(variant: dict[str, Any], key: str) -> str:
    """The per-layer and whole-model forms of one diagnostic (runs summarised before the latter existed: '-')."""
    return " / ".join(_cell(variant.get(k, {"mean": None})) for k in (key, f"whole_model_{key}"))


def _ratio(stat: dict[str, Any]) -> str:
    return "-" if stat["mean"] is None else f"{stat['mean']:.2f}"


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    for alpha, block in summary["alphas"].items():
        lines += [
            f"### {_partition_title(alpha)} (targets per seed: "
            + ", ".join(f"{seed}: {t:.3f}" for seed, t in block["seed_targets"].items())
            + ")",
            "",
            "| method | seeds | best acc | final acc | final eval loss | basis overlap | abs. loss jump | "
            "signed jump | local progress | abs. jump / progress | rounds to target (reached) | up kB/round | "
            "down kB/round | s/round | cancellation per layer / whole model | pairwise cosine per layer / whole model | "
            "mean over rounds of the round's abs. jump | source |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, v in block["variants"].items():
            lines.append(
                f"| {variant} | {len(v['seeds'])} | {_cell(v['best_accuracy'])} | {_cell(v['final_accuracy'])} | "
                f"{_cell(v['final_eval_loss'])} | {_cell(v['basis_overlap'], 4)} | "
                f"{_cell(v['mean_abs_loss_jump'])} | {_cell(v['mean_loss_jump'])} | {_cell(v['local_progress'])} | "
                f"{_ratio(v['relative_abs_jump'])} | "
                f"{_cell(v['rounds_to_target'], 1)} ({v['reached_target']}) | "
                f"{_cell(v['uplink_bytes_per_round'], 1, 1e-3)} | {_cell(v['downlink_bytes_per_round'], 1, 1e-3)} | "
                f"{_cell(v['seconds_per_round'], 1)} | "
                f"{_forms(v, 'cancellation_ratio')} | {_forms(v, 'pairwise_cosine')} | "
                f"{_cell(v.get('round_mean_abs_jump', {'mean': None}))} | {v.get('source', '-')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _mean_curve(runs: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    by_round: dict[int, list[float]] = {}
    for run in runs:
        for round_number, acc in run["curve"]:
            by_round.setdefault(round_number, []).append(acc)
    rounds = sorted(by_round)
    return rounds, [statistics.mean(by_round[r]) for r in rounds]


def plot(summary: dict[str, Any], output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for alpha, block in summary["alphas"].items():
        variants = block["variants"]
        fig, ax = plt.subplots(figsize=(8, 5))
        for variant, v in variants.items():
            rounds, accs = _mean_curve(v["runs"])
            ax.plot(rounds, accs, marker="o", markersize=3, label=variant,
                    linewidth=2.5 if variant.startswith(("fedsmoothlora", "subspace_reg")) else 1.2)  # fmt: skip
        ax.axhline(block["target_accuracy"], color="grey", linestyle=":", label="target (95% of best final)")
        ax.set(xlabel="round", ylabel=f"eval accuracy (mean of {len(next(iter(variants.values()))['seeds'])} seeds)",
               title=f"{summary['settings']['model']} on {summary['settings']['dataset']}, {_partition_title(alpha)}")  # fmt: skip
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        path = output_dir / f"accuracy_curves_{_figure_tag(alpha)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        claim = [v for v in variants if v.startswith("fedsmoothlora")] + [v for v in ("fedit", "frlora") if v in variants]
        if len(claim) == sum(v in variants for v in ("fedit", "frlora")):
            claim = []  # no FedSmoothLoRA run: no claim to draw
        if claim:
            fedsmooth_colours = iter(["tab:blue", "tab:purple", "tab:cyan", "tab:brown"])
            colours = {v: {"fedit": "tab:orange", "frlora": "tab:green"}.get(v) or next(fedsmooth_colours) for v in claim}
            fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
            for variant in claim:
                rounds, accs = _mean_curve(variants[variant]["runs"])
                axes[0].plot(rounds, accs, marker="o", markersize=3, label=variant, color=colours[variant])
            axes[0].axhline(block["target_accuracy"], color="grey", linestyle=":")
            axes[0].set(xlabel="round", ylabel="eval accuracy (seed mean)", title="accuracy")
            axes[0].legend()
            for ax, key, title in (
                (axes[1], "rounds_to_target", "rounds to target (lower is faster)"),
                (axes[2], "round_mean_abs_jump", "mean over rounds of |loss jump| (lower is smoother)"),
                (axes[3], "relative_abs_jump", "|jump| / local progress per round"),
            ):
                # a method that never reached the target gets a pale bar at the last round, labelled 0/N; a
                # missing jump ratio (no local progress) gets no bar, labelled n/a
                never = [variants[v][key]["mean"] is None for v in claim]
                placeholder = summary["settings"]["num_rounds"] if key == "rounds_to_target" else 0.0
                means = [
                    placeholder if n else variants[v][key]["mean"] for v, n in zip(claim, never, strict=True)
                ]
                sds = [0.0 if n else variants[v][key]["sd"] for v, n in zip(claim, never, strict=True)]
                bars = ax.bar(
                    claim,
                    means,
                    yerr=sds,
                    capsize=4,
                    color=[colours[v] for v in claim],
                )
                for i, v in enumerate(claim):
                    if never[i]:
                        bars[i].set_alpha(0.3)
                        bars[i].set_hatch("//")
                    if key == "rounds_to_target":
                        label = f"reached {variants[v]['reached_target']}"
                        ax.text(i, means[i], label, ha="center", va="bottom", fontsize=8)
                    elif never[i]:
                        ax.text(i, 0.0, "n/a", ha="center", va="bottom", fontsize=8)
                ax.set_ylim(bottom=0.0)  # counts, magnitudes and ratios: a panel of n/a alone has no scale
                ax.set_title(title)
                plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
            fig.suptitle(f"FedSmoothLoRA claim, {_partition_title(alpha)} (mean ± sd over seeds)")
            fig.tight_layout()
            path = output_dir / f"fedsmoothlora_claims_{_figure_tag(alpha)}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)

        names = [v for v in variants if variants[v]["basis_overlap"]["mean"] is not None]
        if names:
            fig, ax = plt.subplots(figsize=(9, 4))
            means = [variants[v]["basis_overlap"]["mean"] for v in names]
            sds = [variants[v]["basis_overlap"]["sd"] for v in names]
            colours = ["tab:red" if v.startswith("subspace_reg") else "tab:grey" for v in names]
            ax.bar(names, means, yerr=sds, capsize=3, color=colours)
            low = min(m - s for m, s in zip(means, sds, strict=True))
            # room below the shortest bar for its value, written inside the bar
            ax.set_ylim(max(0.0, low - 0.08), 1.0005)
            for i, m in enumerate(means):
                ax.text(
                    i, m - 0.003, f"{m:.4f}", ha="center", va="top", fontsize=7, rotation=90, color="white"
                )
            ax.set_ylabel("mean basis overlap ||Q_c^T Q_g||_F / sqrt(r)")
            ax.set_title(f"Subspace-Reg claim: basis overlap, {_partition_title(alpha)}")
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
            fig.tight_layout()
            path = output_dir / f"subspace_reg_overlap_{_figure_tag(alpha)}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def _shard(text: str) -> tuple[int, int]:
    index, count = (int(x) for x in text.split("/"))
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard wants I/N with 0 <= I < N, got {text}")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="minilm")
    parser.add_argument("--output_dir", required=True, help="Where the summary and figures go.")
    parser.add_argument("--runs_dir", help="Where the runs go (default: runs/benchmarks/PRESET).")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="Default: every method (causal preset: the issue's six).")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.3, 0.1])
    parser.add_argument("--partition", choices=("dirichlet", "iid"), default="dirichlet",
                        help="dirichlet: one partition per --alphas value; iid: one IID partition.")  # fmt: skip
    parser.add_argument("--num_rounds", type=int, help="Override the preset's rounds.")
    parser.add_argument("--local_steps", type=int, help="Override the preset's local steps.")
    parser.add_argument("--max_eval_samples", type=int, help="Override the preset's eval set size.")
    parser.add_argument("--eval_every", type=int, help="Override the preset's evaluation interval.")
    parser.add_argument("--per_device_train_batch_size", type=int, help="Override the preset's batch size.")
    parser.add_argument("--gradient_accumulation_steps", type=int, help="Override the preset's accumulation.")
    parser.add_argument(
        "--shard", type=_shard, default=(0, 1), help="Run every N-th job starting at I (I/N)."
    )
    parser.add_argument("--summarize_only", action="store_true")
    parser.add_argument("--stored_summary", type=Path, help="An earlier grid's summary.json to take runs from.")
    parser.add_argument("--stored_variants", nargs="+", choices=sorted(VARIANTS), default=[],
                        help="Variants taken from --stored_summary instead of being run.")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stored_variants and args.stored_summary is None:
        parser.error("--stored_variants needs --stored_summary")
    if args.variants is None:
        args.variants = CAUSAL_VARIANTS if args.preset == "smollm2" else list(VARIANTS)
    args.runs_dir = args.runs_dir or f"runs/benchmarks/{args.preset}"
    settings = dict(PRESETS[args.preset])
    overridable = ("num_rounds", "local_steps", "max_eval_samples", "eval_every", "per_device_train_batch_size",
                   "gradient_accumulation_steps")  # fmt: skip
    for key in overridable:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        run_grid(args, settings)
    summary = summarize(args, settings)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (output_dir / "summary.md").write_text(markdown(summary) + "\n")
    for path in plot(summary, output_dir):
        print(f"wrote {path}")
    print(markdown(summary))


if __name__ == "__main__":
    main()
