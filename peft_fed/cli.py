"""The ``peft-fed`` command: ``train``, ``compare``, ``export``, ``plot`` and ``unmix``.

    peft-fed train                                   # the offline default run
    peft-fed train --config examples/configs/wordnet_mc_minilm.yaml --method fedit --num_rounds 20
    peft-fed compare --methods fedit fedsmoothlora --seeds 42 43 --output_dir runs/compare
    peft-fed export --run_dir runs/default --max_error 0.01 --output_dir runs/default/export-r
    peft-fed plot runs/fedit runs/fedsmoothlora --output convergence.png
    peft-fed unmix --data path/to/samson --method gauss --output_dir runs/unmix

Flags override the YAML given to ``--config``; both take the settings of
:class:`peft_fed.runtime.pipeline.FederatedRunConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _field_type(hint: Any) -> tuple[Any, bool]:
    """The scalar type behind ``X | None`` and whether the field is a list."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _field_type(args[0])
    if origin is list:
        return typing.get_args(hint)[0], True
    return hint, False


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`FederatedRunConfig` field; unset flags stay ``None`` so YAML values survive."""
    from .runtime.pipeline import FederatedRunConfig

    hints = typing.get_type_hints(FederatedRunConfig)
    parser.add_argument("--config", help="YAML file with run settings (flags override it).")
    for f in dataclasses.fields(FederatedRunConfig):
        kind, is_list = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{help_text} (default: {default})".strip()
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is dict or typing.get_origin(kind) is dict:
            parser.add_argument(f"--{f.name}", type=json.loads, default=None, help=help_text + " JSON object.")
        elif is_list:
            parser.add_argument(f"--{f.name}", nargs="+", type=kind, default=None, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None, help=help_text)


def run_config_from_args(args: argparse.Namespace, **overrides: Any):
    from .runtime.pipeline import FederatedRunConfig

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(FederatedRunConfig)
        if getattr(args, f.name, None) is not None
    }
    given.update(overrides)
    if getattr(args, "config", None):
        return FederatedRunConfig.from_yaml(args.config, **given)
    return FederatedRunConfig.from_dict(given)


def _train(args: argparse.Namespace) -> int:
    from .runtime.pipeline import format_round_table, run_federated

    config = run_config_from_args(args)
    result = run_federated(config)
    if _is_main_process():
        print(format_round_table(result.history))
        last = result.history[-1]
        print(f"\n{config.method}: final eval accuracy {last.get('eval_accuracy')}, "
              f"eval loss {last.get('eval_loss')}, {result.seconds:.0f} s")
        print(f"metrics: {result.output_dir / 'metrics.jsonl'}; plot: {result.output_dir / 'convergence.png'}; "
              f"adapter: {result.final_dir}")
        if result.export_report is not None:
            print(f"exported at rank {result.export_report.rank}, relative error {result.export_report.relative_error:.3g}")
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def summarize_run(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best/final accuracy, final loss, overlap, mean loss jump, bytes and time per round of one run."""
    accuracies = [r["eval_accuracy"] for r in history if r.get("eval_accuracy") is not None]
    from .runtime.trainer import inter_round_loss_jumps

    # recomputed from the per-client losses, so runs written before the absolute form existed summarise too
    jumps = [j for i, row in enumerate(history) for j in inter_round_loss_jumps(history[:i], row)]
    overlaps = [r["basis_overlap"] for r in history if r.get("basis_overlap") is not None]

    def mean(values):
        return sum(values) / len(values) if values else None

    return {
        "best_accuracy": max(accuracies) if accuracies else None,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "final_eval_loss": next((r["eval_loss"] for r in reversed(history) if r.get("eval_loss") is not None), None),
        "basis_overlap": mean(overlaps),
        "mean_loss_jump": mean(jumps),
        "mean_abs_loss_jump": mean([abs(j) for j in jumps]),
        "uplink_bytes_per_round": mean([r["uplink_bytes"] for r in history]),
        "downlink_bytes_per_round": mean([r["downlink_bytes"] for r in history]),
        "seconds_per_round": mean(
            [r.get("round_local_wall_seconds", 0) + r.get("aggregation_seconds", 0) + r.get("eval_seconds", 0) for r in history]
        ),
        "accuracy_curve": accuracies,
    }


def _compare(args: argparse.Namespace) -> int:
    from .plotting import plot_runs
    from .runtime.pipeline import run_federated

    root = Path(args.output_dir or "runs/compare")
    results: dict[str, dict[str, Any]] = {}
    run_dirs: list[Path] = []
    for method in args.methods:
        for seed in args.seeds:
            out = root / method / f"seed-{seed}"
            config = run_config_from_args(args, method=method, seed=seed, output_dir=str(out))
            result = run_federated(config)
            results.setdefault(method, {})[str(seed)] = summarize_run(result.history)
            run_dirs.append(out)
    if not _is_main_process():
        return 0
    (root / "comparison.json").write_text(json.dumps(results, indent=1))
    table = comparison_table(results)
    (root / "comparison.md").write_text(table + "\n")
    print(table)
    plot_runs(run_dirs, root / "comparison.png", title="peft-fed compare")
    print(f"\nwrote {root / 'comparison.json'}, {root / 'comparison.md'} and {root / 'comparison.png'}")
    return 0


def comparison_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown table: mean ± sd over seeds per method."""
    import statistics

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    keys = ("best_accuracy", "final_accuracy", "final_eval_loss", "basis_overlap", "mean_loss_jump", "mean_abs_loss_jump")
    lines = ["| method | seeds | " + " | ".join(keys) + " | uplink kB/round | s/round |",
             "|---" * (len(keys) + 4) + "|"]
    for method, by_seed in results.items():
        runs = list(by_seed.values())
        cells = [stat([r[k] for r in runs]) for k in keys]
        up = stat([r["uplink_bytes_per_round"] / 1e3 for r in runs])
        sec = stat([r["seconds_per_round"] for r in runs])
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {up} | {sec} |")
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from . import peft_bridge
    from .export import FederatedRunInfo, export_adapter, export_merged, push_to_hub
    from .modeling import load_model_and_tokenizer

    run_dir = Path(args.run_dir)
    config = json.loads((run_dir / "run_config.json").read_text())
    final = run_dir / "final"
    if not (final / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{final} holds no adapter: is {run_dir} a finished peft-fed run?")
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    base, tokenizer = load_model_and_tokenizer(config["model"], config["task_type"])
    model = PeftModel.from_pretrained(base, final)
    original = peft_bridge.base_weights(model)
    output = Path(args.output_dir)
    if args.merged:
        export_merged(model, output, tokenizer=tokenizer, overwrite=args.overwrite)
        print(f"merged model written to {output}")
    else:
        info = FederatedRunInfo(method=config["method"], rounds=config["num_rounds"], num_clients=config["num_clients"],
                                clients_per_round=config.get("clients_per_round"), seed=config["seed"],
                                base_model=adapter_config.get("base_model_name_or_path"), dataset=config["dataset"])
        report = export_adapter(model, original, output, rank=args.rank, max_relative_error=args.max_error,
                                run_info=info, tokenizer=tokenizer, overwrite=args.overwrite)
        print(f"adapter written to {output}: rank {report.rank}, relative error {report.relative_error:.4g}")
    if args.push_to_hub:
        url = push_to_hub(output, args.push_to_hub, private=args.private)
        print(f"pushed to {url}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plotting import plot_runs

    path = plot_runs(args.runs, args.output, labels=args.labels, title=args.title)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-fed", description="Federated LoRA fine-tuning for Hugging Face PEFT.")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="Run one federated training (offline default with no arguments).")
    add_run_arguments(train)
    train.set_defaults(handler=_train)

    compare = sub.add_parser("compare", help="Run methods x seeds; write a table and a plot.")
    add_run_arguments(compare)
    compare.add_argument("--methods", nargs="+", required=True)
    compare.add_argument("--seeds", nargs="+", type=int, default=[42])
    compare.set_defaults(handler=_compare)

    export = sub.add_parser("export", help="Re-export a finished run's adapter (other rank, merged, Hub).")
    export.add_argument("--run_dir", required=True)
    export.add_argument("--output_dir", required=True)
    group = export.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int)
    group.add_argument("--max_error", type=float, help="Smallest rank with relative error below this.")
    group.add_argument("--merged", action="store_true", help="Write the merged full model instead.")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument("--push_to_hub", metavar="REPO_ID")
    export.add_argument("--private", action="store_true")
    export.set_defaults(handler=_export)

    plot = sub.add_parser("plot", help="Convergence curves of one or more runs to PNG.")
    plot.add_argument("runs", nargs="+", help="Run output folders (or metrics.jsonl files).")
    plot.add_argument("--output", default="convergence.png")
    plot.add_argument("--labels", nargs="+")
    plot.add_argument("--title")
    plot.set_defaults(handler=_plot)

    unmix = sub.add_parser("unmix", help="Hyperspectral unmixing (GAUSS and baselines).", add_help=False)
    unmix.set_defaults(handler=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "unmix":
        from .unmixing.cli import main as unmix_main

        return unmix_main(argv[1:])
    if not argv:
        argv = ["train"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.handler is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
