"""Downlink bytes of returning clients: the per-version backbone updates (before) against the bounded catch-up.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/downlink.py --num_clients 10 100 1000 --clients_per_round 10 \\
        --num_rounds 300 --output_dir benchmarks/results/downlink

Pure tensors, no model, no training: the default run's adapted layers (its model's ``config.json`` read for the
layer count and width, the model family's default LoRA targets, the default rank ``r`` and ``lora_alpha``), the
default method's real ``Strategy.configure`` on a real :class:`~peft_fed.state.ServerState` whose backbone history
grows by one random rank-``r`` update per round (what a merging method adds each round, scale included). Each
round samples ``--clients_per_round`` of N clients as the engine does (``sample_round_clients``: uniformly without
replacement, seeded by ``(seed, round)``); every sampled client is configured from the version it last trained
against (version 0 for a client seen for the first time) and then recorded at the current version, as the engine
records a client that trained. Per sampled client and round:

* ``new``: ``Broadcast.nbytes`` of what ``configure`` returns (what ``downlink_bytes`` in a run's metrics counts):
  the catch-up, each layer the stacked factors or the dense sum, whichever is fewer bytes;
* ``old``: the same broadcast with the per-version list instead (``ServerState.updates_since``: one rank-``r``
  update per missed version per layer), what was sent before the catch-up;
* the bound: one dense ``m x n`` delta per layer.

Every ``--check_every`` rounds the returning client away longest has its catch-up checked against the per-version
sum on one layer (``max |catch-up - sum| / max |sum|``, float32). Writes ``downlink.json`` (per round the mean and
max over the sampled clients, old and new, the number of first-time clients; a summary per N) and ``downlink.png``.
Seconds to run: the catch-up's bytes come from its form and shapes; no dense sum is formed but for the checks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from peft_fed.linalg import LowRank
from peft_fed.state import ClientState, LayerSpec, ServerState, low_rank_dict_nbytes, sample_round_clients
from peft_fed.strategies import get_strategy


def default_run_layers() -> dict[str, Any]:
    """The default run's model, method, rank and adapted layers (shapes from the model's own ``config.json``)."""
    from peft_fed.modeling import DEFAULT_TARGET_MODULES, resolve_model_source
    from peft_fed.runtime.run_arguments import FederatedArguments, LoraArguments, ModelArguments

    model = ModelArguments().model
    lora = LoraArguments()
    source = Path(resolve_model_source(model).source)
    config = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else None
    if config is None:  # not installed: all-MiniLM-L6-v2's published config
        config = {"model_type": "bert", "num_hidden_layers": 6, "hidden_size": 384}
    targets = DEFAULT_TARGET_MODULES[config["model_type"]]
    width = config["hidden_size"]  # BERT's query and value projections are hidden x hidden
    return {
        "model": model,
        "model_type": config["model_type"],
        "method": FederatedArguments().method,
        "rank": lora.r,
        "scale": lora.lora_alpha / lora.r,
        "targets": list(targets),
        "layers": {f"encoder.layer.{i}.attention.self.{t}": [width, width] for i in range(config["num_hidden_layers"]) for t in targets},
    }


def random_update(specs: dict[str, LayerSpec], generator: torch.Generator) -> dict[str, LowRank]:
    """One merged backbone update: a rank-r product per layer, scale included (the values do not change bytes)."""
    return {
        name: LowRank(spec.scale * 0.01 * torch.randn(spec.out_features, spec.rank, generator=generator),
                      0.01 * torch.randn(spec.rank, spec.in_features, generator=generator))
        for name, spec in specs.items()
    }  # fmt: skip


def catch_up_error(state: ServerState, version: int, layer: str) -> float:
    """``max |catch-up - per-version sum| / max |per-version sum|`` of one layer (float32)."""
    catch_up = state.catch_up(version).layers[layer].dense()
    per_version = torch.zeros_like(catch_up)
    for update in state.updates_since(version):
        per_version += update[layer].dense()
    return float((catch_up - per_version).abs().max() / per_version.abs().max())


def measure(num_clients: int, args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    specs = {n: LayerSpec(m, k, run["rank"], run["scale"]) for n, (m, k) in run["layers"].items()}
    strategy = get_strategy(run["method"], specs, seed=args.seed, num_rounds=args.num_rounds)
    if not strategy.merges_into_backbone:
        raise SystemExit(f"the default method {run['method']} does not merge into the backbone: nothing to catch up")
    state, _ = strategy.init_server()
    generator = torch.Generator().manual_seed(args.seed)
    clients = {str(i): ClientState(str(i)) for i in range(num_clients)}
    rounds, errors = [], []
    tic = time.perf_counter()
    for round_index in range(args.num_rounds):
        sampled = [str(c) for c in sample_round_clients(num_clients, args.clients_per_round, args.seed, round_index)]
        old, new, away = [], [], []
        for cid in sampled:
            client = clients[cid]
            broadcast = strategy.configure(state, client)
            per_version = sum(low_rank_dict_nbytes(u) for u in state.updates_since(client.backbone_version))
            new.append(broadcast.nbytes)
            old.append(broadcast.nbytes - broadcast.backbone_catch_up.nbytes + per_version)
            away.append(state.backbone_version - client.backbone_version)
        back = [i for i, cid in enumerate(sampled) if clients[cid].last_round is not None]  # returning clients
        returning = [away[i] for i in back]
        if args.check_every and round_index % args.check_every == args.check_every - 1 and returning:
            longest = max(returning)
            errors.append({"round": round_index + 1, "missed_updates": longest,
                           "relative_error": catch_up_error(state, state.backbone_version - longest, next(iter(specs)))})  # fmt: skip
        rounds.append({
            "round": round_index + 1,
            "mean_old": statistics.fmean(old), "max_old": max(old),
            "mean_new": statistics.fmean(new), "max_new": max(new),
            "mean_missed": statistics.fmean(away), "max_missed": max(away),
            "first_time_clients": len(sampled) - len(back),
            "returning_mean_old": statistics.fmean(old[i] for i in back) if back else None,
            "returning_mean_new": statistics.fmean(new[i] for i in back) if back else None,
            "returning_mean_missed": statistics.fmean(returning) if back else None,
        })  # fmt: skip
        for cid in sampled:  # they trained at this version
            clients[cid] = ClientState(cid, last_round=round_index, backbone_version=state.backbone_version)
        state.backbone_history.append(random_update(specs, generator))
        state.round += 1
    seconds = time.perf_counter() - tic
    dense_bound = sum(4 * s.out_features * s.in_features for s in specs.values())
    return {
        "num_clients": num_clients,
        "participation_rate": args.clients_per_round / num_clients,
        "dense_bound_bytes": dense_bound,
        "update_bytes": low_rank_dict_nbytes(state.backbone_history[0]),
        "rounds": rounds,
        "checks": errors,
        "summary": summarize(rounds, dense_bound),
        "seconds": seconds,
    }


def summarize(rounds: list[dict[str, Any]], dense_bound: int) -> dict[str, Any]:
    def block(rows):
        back = [r for r in rows if r["returning_mean_new"] is not None]
        return {
            "mean_old": statistics.fmean(r["mean_old"] for r in rows),
            "mean_new": statistics.fmean(r["mean_new"] for r in rows),
            "max_old": max(r["max_old"] for r in rows),
            "max_new": max(r["max_new"] for r in rows),
            "mean_missed": statistics.fmean(r["mean_missed"] for r in rows),
            # the per-round means over the returning clients only, averaged over the rounds that had one
            "returning_mean_old": statistics.fmean(r["returning_mean_old"] for r in back) if back else None,
            "returning_mean_new": statistics.fmean(r["returning_mean_new"] for r in back) if back else None,
            "returning_mean_missed": statistics.fmean(r["returning_mean_missed"] for r in back) if back else None,
        }

    last = rounds[-min(100, len(rounds)):]
    return {
        "all_rounds": block(rounds),
        "last_100_rounds": block(last),
        "new_never_above_old": all(r["max_new"] <= r["max_old"] and r["mean_new"] <= r["mean_old"] for r in rounds),
        "new_never_above_dense_bound": all(r["max_new"] <= dense_bound for r in rounds),
        "first_time_clients": sum(r["first_time_clients"] for r in rounds),
    }


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, stat in zip(axes, ("mean", "max"), strict=True):
        for color, (n, result) in zip(colors, results["by_num_clients"].items(), strict=False):
            xs = [r["round"] for r in result["rounds"]]
            label = f"N = {n} ({result['participation_rate']:.0%} per round)"
            ax.plot(xs, [r[f"{stat}_old"] / 2**20 for r in result["rounds"]], color=color, linestyle="--", linewidth=1,
                    label=f"{label}, per-version updates")  # fmt: skip
            ax.plot(xs, [r[f"{stat}_new"] / 2**20 for r in result["rounds"]], color=color, linewidth=1.5,
                    label=f"{label}, catch-up")  # fmt: skip
        bound = next(iter(results["by_num_clients"].values()))["dense_bound_bytes"] / 2**20
        ax.axhline(bound, color="black", linestyle=":", label="one dense delta per layer (the bound)")
        ax.set_yscale("log")
        ax.set_title(f"{stat} downlink per sampled client")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MiB per client")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, frameon=False, fontsize=8)
    run = results["run"]
    fig.suptitle(f"{run['method']} on {run['model']}: {len(run['layers'])} layers, r = {run['rank']}, "
                 f"{results['clients_per_round']} clients per round")  # fmt: skip
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--clients_per_round", type=int, default=10)
    parser.add_argument("--num_rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--check_every", type=int, default=50, help="rounds between exactness checks (0: none)")
    parser.add_argument("--output_dir", default="benchmarks/results/downlink")
    parser.add_argument("--layers", default=None, help="JSON {layer: [out, in]} instead of the default run's (tests)")
    args = parser.parse_args(argv)
    run = default_run_layers()
    if args.layers:
        run["layers"] = json.loads(args.layers)
    results = {
        "command": " ".join(["python", "benchmarks/downlink.py", *(argv if argv is not None else sys.argv[1:])]),
        "run": run,
        "clients_per_round": args.clients_per_round,
        "num_rounds": args.num_rounds,
        "seed": args.seed,
        "torch": torch.__version__,
        "by_num_clients": {},
    }
    for n in args.num_clients:
        results["by_num_clients"][str(n)] = measure(n, args, run)
        summary = results["by_num_clients"][str(n)]["summary"]["all_rounds"]
        print(f"N={n}: mean per client {summary['mean_old'] / 2**20:.2f} MiB before, {summary['mean_new'] / 2**20:.2f} MiB "
              f"now; max {summary['max_old'] / 2**20:.2f} -> {summary['max_new'] / 2**20:.2f} MiB")  # fmt: skip
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "downlink.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, output / "downlink.png")
    return results


if __name__ == "__main__":
    main()
