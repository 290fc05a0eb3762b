"""Summarise finished runs (their metrics.jsonl) into one JSON file, a markdown table and a plot.

    python benchmarks/summarize_runs.py runs/default runs/default-fedit \
        --output benchmarks/results/default_fedsmoothlora_vs_fedit

Per run: best/final eval accuracy, final eval loss, mean basis overlap, mean signed and absolute
inter-round loss jump (recomputed from the per-client first/last step losses), bytes and seconds per round.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft_fed.cli import comparison_table, summarize_run
from peft_fed.plotting import plot_runs, read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--output", required=True, help="Path prefix: writes PREFIX.json, PREFIX.md, PREFIX.png.")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    for run in args.runs:
        history = read_metrics(run)
        config_path = Path(run) / "run_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        summary = summarize_run(history)
        summary["run_dir"] = run
        summary["config"] = config
        results.setdefault(history[0]["method"], {})[str(config.get("seed", "?"))] = summary
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = comparison_table(results)
    prefix.with_suffix(".md").write_text(table + "\n")
    plot_runs(args.runs, prefix.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
