"""The command line: flags and YAML become a run config, the comparison table, plots, bad settings."""

from __future__ import annotations

import json

import pytest

from peft_fed.cli import build_parser, comparison_table, main, run_config_from_args, summarize_run
from peft_fed.plotting import plot_runs
from peft_fed.runtime.pipeline import FederatedRunConfig, format_round_table


def _args(*argv):
    return build_parser().parse_args(["train", *argv])


def test_no_flags_give_the_offline_default():
    config = run_config_from_args(_args())
    assert config == FederatedRunConfig()
    assert (config.model, config.dataset, config.method, config.num_clients) == ("all-MiniLM-L6-v2", "wordnet_mc", "fedsmoothlora", 10)
    assert (config.partition, config.dirichlet_alpha) == ("dirichlet", 0.3)


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: fedit\nnum_rounds: 7\nmethod_kwargs: {clip_norm: 3.0}\ntarget_modules: [query]\n")
    config = run_config_from_args(_args("--config", str(path), "--num_rounds", "2", "--resume", "--seed", "5"))
    assert (config.method, config.num_rounds, config.resume, config.seed) == ("fedit", 2, True, 5)
    assert config.method_kwargs == {"clip_norm": 3.0} and config.target_modules == ["query"]


def test_json_and_list_flags():
    config = run_config_from_args(_args("--method_kwargs", '{"zeta": 0.5}', "--target_modules", "query", "value"))
    assert config.method_kwargs == {"zeta": 0.5} and config.target_modules == ["query", "value"]


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("methd: fedit\n")
    with pytest.raises(ValueError, match=r"unknown run setting\(s\) \['methd'\]"):
        run_config_from_args(_args("--config", str(path)))


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        run_config_from_args(_args("--config", str(path)))


def _history(method, accs, losses):
    """Rows of a run where client "0" trains every round with the given (first, last) step losses."""
    return [
        {"round": i + 1, "method": method, "eval_accuracy": a, "eval_loss": 1.0 - a, "inter_round_loss_jump": None,
         "basis_overlap": 0.9, "uplink_bytes": 1000, "downlink_bytes": 2000, "train_loss": 1.0,
         "round_local_wall_seconds": 1.0, "aggregation_seconds": 0.5, "eval_seconds": 0.5,
         "client_loss_first": {"0": first}, "client_loss_last": {"0": last}}
        for i, (a, (first, last)) in enumerate(zip(accs, losses, strict=True))
    ]


def test_summary_and_table():
    summary = summarize_run(_history("fedit", [0.3, 0.5, 0.4], [(1.0, 0.8), (1.0, 0.7), (0.6, 0.5)]))
    assert summary["best_accuracy"] == 0.5 and summary["final_accuracy"] == 0.4
    assert summary["mean_loss_jump"] == pytest.approx(0.05)  # jumps 1.0 - 0.8 and 0.6 - 0.7
    assert summary["mean_abs_loss_jump"] == pytest.approx(0.15)
    assert summary["seconds_per_round"] == pytest.approx(2.0)
    table = comparison_table({"fedit": {"42": summary, "43": summary}})
    assert "| fedit | 2 | 0.5000 ± 0.0000 | 0.4000 ± 0.0000 |" in table
    assert "-" in format_round_table(_history("fedit", [0.3], [(1.0, 0.9)]))


def test_plot_command(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rows = _history(name, [0.3, 0.4], [(1.0, 0.9), (0.8, 0.7)])
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_folder_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_runs([tmp_path], tmp_path / "x.png")
